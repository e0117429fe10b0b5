"""Ray Data: a callable class that embeds a named column of each block, for
``Dataset.map_batches(ColumnEmbedder, batch_format="pyarrow", ...)``.

>>> ds = ray.data.read_parquet("s3://bucket/shards/")
>>> ds = ds.map_batches(ColumnEmbedder, fn_constructor_kwargs=dict(weights="/models/siglip.parquet", column="image"),
...                     batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2)

Each actor loads the model once (with as many inference threads as CPUs Ray gave it) and embeds
every batch through ``encode_arrow``'s column code: bytes, paths/URLs or the Hugging Face struct,
nulls and undecodable rows null, their reasons in ``error_column`` when one is named. The
``embed --column --engine ray`` command runs on it (``details=True`` adds what its dataset
records: ``_width``, ``_height``, ``_sha256``; ``keep_input=False`` leaves the image column
out of what travels back).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..engine_models import default_backend, shared_model


class ColumnEmbedder:
    """Adds ``output_column`` (``FixedSizeList<float32, D>``) to each batch, embedding ``column``."""

    def __init__(self, weights: str | os.PathLike, column: str = "image", output_column: str = "embedding",
                 error_column: str | None = None, backend: str = "default", device: str = "cpu",
                 details: bool = False, keep_input: bool = True, **options: Any):
        from . import threads_option

        backend = default_backend() if backend == "default" else backend
        threads = _assigned_cpus()
        if threads:
            options = {**threads_option(backend, threads), **options}
        self.model = shared_model(weights, backend=backend, device=device, **options)
        self.column, self.output_column, self.error_column = column, output_column, error_column
        self.details, self.keep_input = details, keep_input

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.column not in batch.column_names:
            from ..errors import ArrowVisionError

            raise ArrowVisionError(f"no column {self.column!r} in the batch (columns: {', '.join(batch.column_names)})")
        from ..arrow.columns import embed_sources, image_sources

        result = embed_sources(self.model.encoder, image_sources(batch.column(self.column)), model_lock=self.model.lock,
                               digest=self.details, **self.model.options)
        out = batch if self.keep_input else batch.drop_columns([self.column])
        out = out.append_column(self.output_column, result.to_arrow())
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


def _drop_done(batch: pa.Table, id_column: str, done: frozenset) -> pa.Table:
    """Leave out the rows a previous run embedded (their ids are in ``done``)."""
    import pyarrow.compute as pc

    if not done or batch.num_rows == 0:
        return batch
    ids = pc.cast(batch.column(id_column), pa.string())
    return batch.filter(pc.invert(pc.is_in(ids, value_set=pa.array(sorted(done), pa.string()))))


def embed_table_ray(weights: str | os.PathLike, files: list[str], output: str | os.PathLike, *, column: str,
                    id_column: str, keep_columns: list[str] = (), backend: str = "openvino", device: str = "cpu",
                    backend_options: dict[str, Any] | None = None, batch_size: int = 32, chunk_size: int = 1024,
                    actors: int | None = None, cpus_per_actor: float = 1.0, skip_failed: bool = False,
                    progress: bool = True, address: str | None = None) -> Any:
    """``embed TABLE --column C --id-column ID --engine ray``: Ray reads the row groups, an actor
    pool of ``ColumnEmbedder`` embeds them, the driver writes the same dataset as the local
    engine (resumable by either, keyed by the id column)."""
    import threading
    import time

    from ..util.interrupts import stop_on_signals
    from ..util.progress import progress_bar
    from ..datasets.table import check_columns, total_rows, write_batches
    from ..datasets.writer import ChunkBuffer, EmbeddingWriter, dataset_metadata
    from . import connect
    from .data import RayEmbedStats, describe_model

    copied = check_columns(files, column, id_column, keep_columns)
    weights = str(Path(weights).resolve())
    model = describe_model(weights)
    metadata = {**dataset_metadata(model, sketch=False, normalize=True), "source_column": column}
    with EmbeddingWriter(output, model.embedding_dim, metadata, copied) as writer:  # the folder is this run's until it returns
        chunks = ChunkBuffer(writer, chunk_size, lambda path: path)
        stats = RayEmbedStats()
        done = frozenset(writer.done | (set(writer.failed) if skip_failed else set()))
        ray = connect(address)
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # our own bar below, on the driver
        context.print_on_execution_start = False
        stats.actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        embedder = dict(weights=weights, column=column, error_column="_error", details=True, keep_input=False,
                        backend=backend, device=device, batch_size=batch_size, **(backend_options or {}))
        dataset = (ray.data.read_parquet(files).select_columns(list(dict.fromkeys([column, *(f.name for f in copied)])))
                   .map_batches(_drop_done, fn_kwargs=dict(id_column=id_column, done=done), batch_format="pyarrow")
                   .map_batches(ColumnEmbedder, fn_constructor_kwargs=embedder, batch_format="pyarrow",
                                compute=ActorPoolStrategy(size=stats.actors), num_cpus=cpus_per_actor))
        started, stop = time.perf_counter(), threading.Event()
        bar = progress_bar(total_rows(files) - len(done), progress, "embedding (ray)", "img")
        try:
            with stop_on_signals(stop):
                batches = dataset.iter_batches(batch_format="pyarrow", batch_size=None)
                write_batches((_table_rows(batch, id_column, copied) for batch in batches), chunks, stats, bar, stop)
        finally:
            bar.close()
    stats.skipped = len(writer.done & done)
    stats.seconds = time.perf_counter() - started
    return stats


def _table_rows(batch: pa.Table, id_column: str, copied: list[pa.Field]) -> list[Any]:
    """An embedded batch as the writer's rows (vectors are views into the batch's buffer)."""
    import numpy as np

    from ..datasets.table import TableRow

    extras = batch.select([f.name for f in copied]).to_pylist()
    embeddings = batch.column("embedding").combine_chunks()
    dim = embeddings.type.list_size
    flat = np.asarray(embeddings.values)[embeddings.offset * dim : (embeddings.offset + len(embeddings)) * dim]
    vectors = flat.reshape(-1, dim)
    present = embeddings.is_valid().to_pylist()
    details = zip(*(batch.column(name).to_pylist() for name in ("_error", "_width", "_height", "_sha256")))
    rows = []
    for i, (error, width, height, digest) in enumerate(details):
        value = extras[i][id_column]
        identity = str(value) if value is not None else f"<null {id_column}: {digest or i}>"
        if value is None:
            error = f"{identity}: null {id_column!r}"
        elif not error and not present[i]:
            error = f"{identity}: no image (null)"
        rows.append(TableRow(identity, identity, extras[i], width, height, digest, error, None if error else vectors[i]))
    return rows
