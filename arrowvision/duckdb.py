"""DuckDB: the encoder as vectorized Arrow UDFs returning ``FLOAT[D]``.

>>> import duckdb, arrowvision.duckdb
>>> con = duckdb.connect()
>>> arrowvision.duckdb.register(con, "siglip.parquet")
>>> con.sql("SELECT path, array_cosine_similarity(embed_image(image.bytes), embed_text('a red car')) AS score "
...         "FROM 'shard.parquet' ORDER BY score DESC LIMIT 5")

Registered functions: ``embed_image(BLOB)`` (image bytes; for a Hugging Face image struct pass
``image.bytes``), ``embed_image_path(VARCHAR)`` (paths, ``s3://`` URIs, http(s) URLs) and, when the
weights hold a text tower, ``embed_text(VARCHAR)``. DuckDB hands each UDF a vector of rows at a
time, from several threads: they share one model per process (``arrowvision.engine_models``).
"""

from __future__ import annotations

import os
from typing import Any

from .engine_models import check_on_error, has_text_tower, shared_model


def register(con: Any, weights: str | os.PathLike, name: str = "embed_image", text_name: str | None = "embed_text",
             *, path_name: str | None = None, on_error: str = "null", backend: str = "default",
             **options: Any) -> list[str]:
    """Register the UDFs on connection ``con``; returns the names registered.

    ``path_name`` defaults to ``{name}_path``; ``text_name=None`` (or a vision-only weights file)
    registers no text function. ``on_error``: null (a row that cannot be decoded is NULL, and
    logged) or raise (the query fails naming the rows). ``options``: batch_size, workers, decode,
    normalize and the backend's own (precision, mode, cache_dir...)."""
    import duckdb

    try:
        from duckdb.sqltypes import BLOB, FLOAT, VARCHAR
    except ImportError:  # duckdb < 1.4
        from duckdb.typing import BLOB, FLOAT, VARCHAR

    check_on_error(on_error)
    vision = shared_model(weights, backend=backend, **options)
    vector = duckdb.array_type(FLOAT, vision.dim)

    def embed(column: Any) -> Any:
        return vision.embed_arrow(column, on_error)

    registered = []
    for function_name, parameter in ((name, BLOB), (path_name or f"{name}_path", VARCHAR)):
        con.create_function(function_name, embed, [parameter], vector, type="arrow", null_handling="special")
        registered.append(function_name)
    if text_name and has_text_tower(weights):
        text = shared_model(weights, tower="text", backend=backend, **options)
        con.create_function(text_name, lambda column: text.embed_arrow(column), [VARCHAR],
                            duckdb.array_type(FLOAT, text.dim), type="arrow", null_handling="special")
        registered.append(text_name)
    return registered
