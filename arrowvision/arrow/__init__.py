"""Arrow in, Arrow out: image and text columns to ``FixedSizeList<float32, D>`` embeddings.

``columns`` reads any image/text column layout and wraps the model's output; ``shared`` keeps
one model per process for the engine adapters (``arrowvision.duckdb``, ``.polars``,
``.compute``, ``.daft``, ``.lancedb``, ``.distributed.columns``); ``table`` is
``embed --column``. Nothing here imports an engine.
"""

from ..errors import ColumnTypeError
from .columns import ColumnEmbeddings, embed_image_column, embed_text_column, image_sources
from .shared import SharedModel, shared_model

__all__ = ["ColumnEmbeddings", "ColumnTypeError", "SharedModel", "embed_image_column", "embed_text_column",
           "image_sources", "shared_model"]
