"""Arrow in, Arrow out: image and text columns to ``FixedSizeList<float32, D>`` embeddings.

``columns`` reads any image/text column layout and wraps the model's output. It sits below the
encoders (``encode_arrow`` calls it) and imports no engine; above them, ``engine_models`` keeps
one model per process for the engine adapters (``arrowvision.duckdb``, ``.polars``, ``.compute``,
``.daft``, ``.lancedb``, ``.distributed.columns``) and ``datasets.table`` is ``embed --column``.
"""

from ..errors import ColumnTypeError
from .columns import ColumnEmbeddings, embed_image_column, embed_text_column, image_sources

__all__ = ["ColumnEmbeddings", "ColumnTypeError", "embed_image_column", "embed_text_column",
           "image_sources"]
