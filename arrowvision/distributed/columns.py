"""Ray Data: a callable class that embeds a named column of each block, for
``Dataset.map_batches(ColumnEmbedder, batch_format="pyarrow", ...)``.

>>> ds = ray.data.read_parquet("s3://bucket/shards/")
>>> ds = ds.map_batches(ColumnEmbedder, fn_constructor_kwargs=dict(weights="/models/siglip.parquet", column="image"),
...                     batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2)

Each actor loads the model once (with as many inference threads as CPUs Ray gave it) and embeds
every batch through ``encode_arrow``'s column code: bytes, paths/URLs or the Hugging Face struct,
nulls and undecodable rows null, their reasons in ``error_column`` when one is named. The
``embed --column --engine ray`` command runs on it (``details=True`` adds what its dataset
records: ``_width``, ``_height``, ``_sha256``).
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

from ..arrow.shared import default_backend, shared_model


class ColumnEmbedder:
    """Adds ``output_column`` (``FixedSizeList<float32, D>``) to each batch, embedding ``column``."""

    def __init__(self, weights: str | os.PathLike, column: str = "image", output_column: str = "embedding",
                 error_column: str | None = None, backend: str = "default", device: str = "cpu",
                 details: bool = False, **options: Any):
        from . import threads_option

        backend = default_backend() if backend == "default" else backend
        threads = _assigned_cpus()
        if threads:
            options = {**threads_option(backend, threads), **options}
        self.model = shared_model(weights, backend=backend, device=device, **options)
        self.column, self.output_column, self.error_column = column, output_column, error_column
        self.details = details

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.column not in batch.column_names:
            from ..errors import ArrowVisionError

            raise ArrowVisionError(f"no column {self.column!r} in the batch (columns: {', '.join(batch.column_names)})")
        from ..arrow.columns import embed_sources, image_sources

        result = embed_sources(self.model.encoder, image_sources(batch.column(self.column)), model_lock=self.model.lock,
                               digest=self.details, **self.model.options)
        out = batch.append_column(self.output_column, result.to_arrow())
        if self.error_column:
            out = out.append_column(self.error_column, pa.array([result.errors.get(i) for i in range(len(batch))], pa.string()))
        if self.details:
            out = out.append_column("_width", pa.array(result.sizes[:, 0]))
            out = out.append_column("_height", pa.array(result.sizes[:, 1]))
            out = out.append_column("_sha256", pa.array(result.digests, pa.string()))
        return out


def _assigned_cpus() -> int:
    """The CPUs Ray gave this actor (0 outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return 0
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - not in a Ray worker: leave the backend's default
        return 0
