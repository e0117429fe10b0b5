"""Daft: ``embed_image`` / ``embed_text`` expressions returning Daft's ``Embedding[Float32, D]``.

>>> import daft, arrowvision.daft as avd
>>> df = daft.read_parquet("shard.parquet")
>>> df = df.with_column("embedding", avd.embed_image(df["image"]["bytes"], "siglip.parquet"))

Over bytes (binary) or path/URL strings: Daft's own ``embed_image`` wants its decoded Image type
and torch; this runs our decoder and model on the raw column, one batch of rows at a time
(``daft.func.batch``). The function carries only the weights path and options, so it pickles
to Daft's worker processes or Ray actors, each of which loads one model (``arrowvision.engine_models``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .engine_models import check_on_error, shared_model


def _embed_batch(column: Any, weights: str, tower: str, backend: str, on_error: str, options: str) -> Any:
    model = shared_model(weights, tower=tower, backend=backend, **json.loads(options))
    return model.embed_arrow(column.to_arrow(), on_error)


def _dim(weights: str | os.PathLike, tower: str) -> int:
    from .model.config import VisionConfig
    from .model.text_config import TextConfig
    from .weights.format import WeightLoader

    loader = WeightLoader(weights)
    config = TextConfig.from_weights(loader) if tower == "text" else VisionConfig.from_weights(loader)
    return int(config.embedding_dim)


def _expression(expr: Any, weights: str | os.PathLike, tower: str, backend: str, on_error: str,
                batch_size: int | None, options: dict[str, Any]) -> Any:
    import daft

    check_on_error(on_error)
    weights = os.path.abspath(os.fspath(weights))  # workers may run elsewhere in the tree
    dtype = daft.DataType.embedding(daft.DataType.float32(), _dim(weights, tower))
    function = daft.func.batch(return_dtype=dtype, batch_size=batch_size)(_embed_batch)
    expr = daft.col(expr) if isinstance(expr, str) else expr
    return function(expr, weights, tower, backend, on_error, json.dumps(options, sort_keys=True))


def embed_image(expr: Any, weights: str | os.PathLike, *, on_error: str = "null", backend: str = "default",
                rows_per_call: int | None = None, **options: Any) -> Any:
    """An expression embedding an image column (bytes, paths, URLs): null where a row fails.

    ``rows_per_call``: rows Daft hands the function at once (Daft's default when None);
    ``options``: batch_size (rows per model call), workers, decode, normalize and the backend's own."""
    return _expression(expr, weights, "vision", backend, on_error, rows_per_call, options)


def embed_text(expr: Any, weights: str | os.PathLike, *, backend: str = "default", rows_per_call: int | None = None,
               **options: Any) -> Any:
    """An expression embedding a string column with the weights' text tower."""
    return _expression(expr, weights, "text", backend, "null", rows_per_call, options)
