"""LanceDB: an embedding function registered as ``arrowvision``.

>>> import arrowvision.lancedb  # registers "arrowvision" in LanceDB's embedding registry
>>> from lancedb.embeddings import get_registry
>>> from lancedb.pydantic import LanceModel, Vector
>>> model = get_registry().get("arrowvision").create(weights="siglip.parquet")
>>> class Photo(LanceModel):
...     image: bytes = model.SourceField()                    # or image_uri: str
...     vector: Vector(model.ndims()) = model.VectorField()
>>> table = lancedb.connect("db").create_table("photos", schema=Photo)
>>> table.add([{"image": jpeg_bytes}])                          # embedded here, in batches
>>> table.search("a red car").limit(5).to_pandas()              # text query (weights with a text tower)

LanceDB hands over each batch's source column as Arrow; it is embedded as one column (decoding in
threads, batched model calls), not one image at a time. A row that cannot be decoded gets a null
vector (LanceDB's ``on_bad_vectors`` then decides); the model is shared per process.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from lancedb.embeddings import EmbeddingFunction, register
from PIL import Image

from .arrow.columns import as_array
from .engine_models import SharedModel, has_text_tower, shared_model
from .errors import ArrowVisionError


@register("arrowvision")
class ArrowVisionEmbeddings(EmbeddingFunction):
    """Source: image bytes, paths or URLs (or the Hugging Face struct); queries: text or an image."""

    weights: str
    backend: str = "default"
    precision: str | None = None
    batch_size: int = 32
    workers: int = 2
    decode: str = "exact"
    max_retries: int = 0  # a local model fails the same way twice: LanceDB's retry loop would only wait

    def _model(self, tower: str = "vision") -> SharedModel:
        options: dict[str, Any] = {"precision": self.precision} if self.precision else {}
        column = {"batch_size": self.batch_size} if tower == "text" else {
            "batch_size": self.batch_size, "workers": self.workers, "decode": self.decode}
        return shared_model(self.weights, tower=tower, backend=self.backend, **options, **column)

    def ndims(self) -> int:
        return self._model().dim

    def compute_source_embeddings(self, images: Any, *args: Any, **kwargs: Any) -> list[np.ndarray | None]:
        if isinstance(images, (str, bytes)):
            images = [images]
        result = self._model().embed(as_array(images))
        return [vector if ok else None for vector, ok in zip(result.vectors, result.valid.tolist())]

    def compute_query_embeddings(self, query: Any, *args: Any, **kwargs: Any) -> list[np.ndarray]:
        """A text query (needs weights with a text tower), or an image (bytes, path, PIL image)."""
        if isinstance(query, Image.Image):
            buffer = io.BytesIO()
            query.save(buffer, format="PNG")  # lossless: the model sees the same pixels
            query = buffer.getvalue()
        if isinstance(query, str) and not _looks_like_image(query):
            if not has_text_tower(self.weights):
                raise ArrowVisionError(f"{self.weights}: a text query needs weights with a text tower "
                                       "(convert with --tower all)")
            return [self._model("text").embed(pa.array([query])).vectors[0]]
        result = self._model().embed(as_array([query]))
        if not result.valid[0]:
            raise ArrowVisionError(f"the query image cannot be embedded: {result.errors.get(0, 'null')}")
        return [result.vectors[0]]


def _looks_like_image(text: str) -> bool:
    from .inputs.pathlists import IMAGE_EXTENSIONS

    return any(text.lower().split("?")[0].endswith(suffix) for suffix in IMAGE_EXTENSIONS)
