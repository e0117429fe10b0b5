"""``TextEncoder``: texts in, L2-normalized embeddings out; the text counterpart of ``VisionEncoder``.

Tokenization sits in front (``arrowvision.model.tokenizer``, from the files stored in the weights file),
the text tower runs behind a backend that takes (N, L) int64 token ids and returns the pooled
(N, D) float32 vectors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .bundle.manifest import BundleSource
from .errors import ArrowVisionError, BackendError
from .model.text_config import TextConfig
from .model.tokenizer import Tokenizer, load_tokenizer
from .weights.format import WeightLoader

TEXT_BACKENDS = ("torch", "openvino")


class TextBackend(Protocol):
    name: str

    def __call__(self, input_ids: np.ndarray) -> np.ndarray: ...


class TorchTextBackend:
    """The reference: our PyTorch ``TextTransformer`` on the zero-copy Parquet tensors."""

    name = "torch"

    def __init__(self, weights: WeightLoader, device: str = "cpu"):
        from .backends.torch_backend import import_torch

        self.torch = torch = import_torch()  # before .text_model, which imports torch
        from .model.text import TextTransformer

        self.device = torch.device(device.lower())
        self.model = TextTransformer.from_weights(weights).to(self.device)

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            ids = self.torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
            return self.model(ids).pooled.float().cpu().numpy()


def create_text_backend(name: str, weights: WeightLoader, tokenizer: Tokenizer, device: str = "cpu", **options: Any) -> TextBackend:
    """``torch`` (the reference) or ``openvino`` (cached IR, torch-free once cached; options:
    precision, cache_dir, min_cosine, num_threads)."""
    if name == "torch":
        if options.pop("precision", "fp32") != "fp32" or options:
            raise BackendError("the torch text backend runs fp32 only and takes no other options")
        return TorchTextBackend(weights, device=device)
    if name == "openvino":
        from .backends.openvino_text import OpenVINOTextBackend

        return OpenVINOTextBackend(weights, tokenizer, device=device, **options)
    raise BackendError(f"backend {name!r} is not available for the text tower; choose from {', '.join(TEXT_BACKENDS)}")


class TextEncoder:
    """SigLIP/CLIP text encoder loaded from a Parquet file converted with ``--tower all`` (or text).

    >>> encoder = TextEncoder.from_parquet("siglip.parquet")
    >>> encoder.encode(["a photo of a cat", "a photo of a dog"]).shape
    (2, 768)
    """

    def __init__(self, weights: WeightLoader | BundleSource, backend: TextBackend, config: TextConfig, tokenizer: Tokenizer):
        self.weights = weights
        self.backend = backend
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    def from_weights(cls, weights: WeightLoader, backend: str = "torch", device: str = "cpu", **options: Any) -> TextEncoder:
        config = TextConfig.from_weights(weights)  # a clear error for vision-only files
        tokenizer = load_tokenizer(weights.tokenizer_files(), config)
        return cls(weights, create_text_backend(backend, weights, tokenizer, device=device, **options), config, tokenizer)

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, backend: str = "torch", device: str = "cpu", **options: Any) -> TextEncoder:
        """``backend``: torch (reference) or openvino; ``options`` go to the backend (precision,
        cache_dir, min_cosine, num_threads)."""
        return cls.from_weights(WeightLoader(path), backend=backend, device=device, **options)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike | Any, num_threads: int | None = None, min_cosine: float | None = None) -> TextEncoder:
        """The text tower of a bundle made with ``--tower all``, with the runtime install alone."""
        from .bundle.runtime import Bundle, open_bundle

        bundle = path if isinstance(path, Bundle) else open_bundle(path)
        backend = bundle.text_backend(num_threads=num_threads, min_cosine=min_cosine)
        return cls(bundle.source, backend, bundle.text_config, bundle.tokenizer())

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def checksum(self) -> str:
        return self.weights.checksum

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, L) int64 token ids, equal to transformers' ``input_ids`` on the family's standard settings."""
        return self.tokenizer(texts)

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, normalize: bool = True) -> np.ndarray:
        """Embed texts: (N, D) float32, L2-normalized unless ``normalize=False``."""
        if batch_size < 1:
            raise ArrowVisionError(f"batch_size must be >= 1, got {batch_size}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        outputs = [self.backend(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        embeddings = np.concatenate(outputs).astype(np.float32, copy=False) if outputs else np.zeros((0, self.embedding_dim), np.float32)
        if not normalize:
            return embeddings
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)

    def encode_arrow(self, column: Any, batch_size: int = 32, normalize: bool = True) -> Any:
        """Embed an Arrow string column -> ``pyarrow.FixedSizeListArray`` of float32 (N, D), null
        where the input was null."""
        from .arrow.columns import embed_text_column

        return embed_text_column(self, column, batch_size=batch_size, normalize=normalize).to_arrow()
