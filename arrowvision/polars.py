"""polars: ``embed_image`` / ``embed_text`` expressions returning ``Array(Float32, D)``.

>>> import polars as pl, arrowvision.polars as avp
>>> (pl.scan_parquet("shard.parquet")
...    .with_columns(embedding=avp.embed_image(pl.col("image"), "siglip.parquet"))
...    .sink_parquet("embedded.parquet"))

The expression is elementwise (``map_batches(..., is_elementwise=True)``), so lazy and streaming
queries run it per batch of rows; every batch goes to ``encode_arrow``'s column code as Arrow
(binary, paths, or the Hugging Face ``struct<bytes, path>``) and comes back without a per-row
copy. One model per process serves every expression with the same weights and options.
"""

from __future__ import annotations

import os
from typing import Any

from .engine_models import SharedModel, check_on_error, shared_model


def _expression(expr: Any, model: SharedModel, on_error: str) -> Any:
    import polars as pl

    check_on_error(on_error)
    expr = pl.col(expr) if isinstance(expr, str) else expr

    def embed(series: pl.Series) -> pl.Series:
        return pl.Series(series.name, model.embed_arrow(series.to_arrow(), on_error))

    return expr.map_batches(embed, return_dtype=pl.Array(pl.Float32, model.dim), is_elementwise=True)


def embed_image(expr: Any, weights: str | os.PathLike, *, on_error: str = "null", backend: str = "default",
                **options: Any) -> Any:
    """An expression embedding the image column ``expr`` (an ``Expr`` or a column name).

    ``on_error``: null (rows that cannot be decoded are null, and logged) or raise. ``options``:
    batch_size, workers, decode, normalize and the backend's own (precision, mode, cache_dir...)."""
    return _expression(expr, shared_model(weights, backend=backend, **options), on_error)


def embed_text(expr: Any, weights: str | os.PathLike, *, backend: str = "default", **options: Any) -> Any:
    """An expression embedding the string column ``expr`` with the weights' text tower."""
    return _expression(expr, shared_model(weights, tower="text", backend=backend, **options), "null")
