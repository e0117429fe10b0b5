"""``VisionEncoder``: images in, L2-normalized embeddings out, on a chosen backend."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from .backends.base import Backend, as_backend
from .backends.factory import create as create_backend
from .bundle.manifest import BundleSource
from .errors import ArrowVisionError
from .inputs.preprocess import ImageInput, Preprocessor, describe, load_image
from .model.config import VisionConfig
from .util.similarity import l2_normalize
from .weights.format import WeightLoader


def is_pixel_batch(images: Any) -> bool:
    """A preprocessed (N, 3, H, W) float batch, as opposed to raw images."""
    shape = getattr(images, "shape", None)
    dtype = str(getattr(images, "dtype", ""))
    return shape is not None and len(shape) == 4 and shape[1] == 3 and "float" in dtype


def as_image_list(images: Any) -> list[ImageInput]:
    """One image (path, bytes, PIL image, HWC/HW array) or an iterable of them -> a list."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    return list(images)  # includes (N, H, W, C) uint8 arrays: one image per row


class VisionEncoder:
    """SigLIP/CLIP image encoder loaded from a Parquet weights file.

    >>> encoder = VisionEncoder.from_parquet("siglip.parquet")            # torch reference
    >>> fast = VisionEncoder.from_parquet("siglip.parquet", backend="openvino")
    >>> fast.encode(["cat.jpg", "dog.png"]).shape
    (2, 768)
    """

    def __init__(self, weights: WeightLoader | BundleSource, backend: Backend, config: VisionConfig):
        self.weights = weights
        self.backend = backend
        self.config = config
        self.preprocessor = Preprocessor.from_config(config)

    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend: Any) -> None:
        """Any backend (or a wrapper of one) becomes a full ``Backend``, so callers read its
        attributes directly."""
        self._backend = as_backend(backend)

    @classmethod
    def from_parquet(
        cls, path: str | os.PathLike, backend: str = "torch", device: str = "cpu", **options: Any
    ) -> VisionEncoder:
        """``backend``: torch (reference), openvino, onnxruntime, or auto (the fastest validated
        backend and precision for this CPU, measured once and cached). ``options`` go to the
        backend: precision, cache_dir, min_cosine, calibration, mode, num_threads."""
        weights = WeightLoader(path)
        impl = create_backend(backend, weights, device=device, **options)
        return cls(weights, impl, impl.config)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike | Any, mode: str = "latency", num_threads: int | None = None,
                    min_cosine: float | None = None) -> VisionEncoder:
        """The image tower of a bundle folder (``arrowvision bundle``; or an opened ``Bundle``), with
        the runtime install alone.
        ``min_cosine`` holds a lossy artifact to a stricter threshold than the bundle was made with."""
        from .bundle.runtime import Bundle, open_bundle

        bundle = path if isinstance(path, Bundle) else open_bundle(path)
        backend = bundle.vision_backend(mode=mode, num_threads=num_threads, min_cosine=min_cosine)
        return cls(bundle.source, backend, bundle.vision_config)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def checksum(self) -> str:
        return self.weights.checksum

    def prepare(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image -> the backend's input row: (S, S, 3) uint8 for backends that
        normalize on their device (torch), else (3, S, S) float32."""
        if self.backend.accepts_uint8:
            return self.preprocessor.resized(image)
        return self.preprocessor.pixels(image)

    def run_prepared(self, batch: np.ndarray) -> np.ndarray:
        """A stack of ``prepare`` rows -> pooled float32 (N, D), not normalized."""
        if batch.dtype == np.uint8:
            return self.backend.embed_uint8(batch)
        return self.backend(batch)

    def _prepare_input(self, image: ImageInput, decode: str) -> np.ndarray:
        if decode == "fast" and isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            from .inputs.decode import open_reduced, read_image_bytes

            data = read_image_bytes(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else bytes(image)
            return self.prepare(open_reduced(data, describe(image), self.config.image_size)[0])
        return self.prepare(load_image(image))

    def _prepare_batch(self, images: Sequence[ImageInput], decode: str, workers: int = 2) -> np.ndarray:
        if len(images) <= 1:
            return np.stack([self._prepare_input(image, decode) for image in images])
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(lambda image: self._prepare_input(image, decode), images)))

    def preprocess(self, images: Sequence[ImageInput], workers: int = 2) -> np.ndarray:
        """Decode + preprocess in threads (Pillow releases the GIL while decoding and resizing)."""
        if len(images) <= 1 or workers <= 1:
            return self.preprocessor.batch(list(images))
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(self.preprocessor, images)))

    def encode(self, images: Iterable[ImageInput] | Any, batch_size: int = 32, normalize: bool = True,
               decode: str = "exact") -> np.ndarray:
        """Embed images: paths, bytes, PIL images, HWC uint8 arrays, or a preprocessed (N,3,H,W) batch.

        ``decode="fast"`` decodes JPEG files and bytes at a reduced size first (see
        ``arrowvision.inputs.decode``); ``gpu`` decoding is for folders (``embed_paths``).
        Returns (N, D) float32, L2-normalized unless ``normalize=False``."""
        if batch_size < 1:
            raise ArrowVisionError(f"batch_size must be >= 1, got {batch_size}")
        if decode not in ("exact", "fast"):
            raise ArrowVisionError(f"decode={decode!r}: encode() takes exact or fast (gpu decoding: embed_paths)")
        if is_pixel_batch(images):
            pixels = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
            batches = (pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size))
            outputs = [self.backend(batch) for batch in batches]
        elif self.backend.accepts_uint8 or decode != "exact":
            items = as_image_list(images)
            outputs = [self.run_prepared(self._prepare_batch(items[i : i + batch_size], decode))
                       for i in range(0, len(items), batch_size)]
        else:
            items = as_image_list(images)
            outputs = [self.backend(self.preprocess(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
        embeddings = np.concatenate(outputs) if outputs else np.zeros((0, self.embedding_dim), np.float32)
        embeddings = embeddings.astype(np.float32, copy=False)
        return l2_normalize(embeddings) if normalize else embeddings

    def encode_arrow(self, column: Any, *, batch_size: int = 32, normalize: bool = True, decode: str = "exact",
                     workers: int = 2, errors: dict[int, str] | None = None) -> Any:
        """Embed an Arrow image column (bytes, paths/URLs, or Hugging Face ``struct<bytes, path>``;
        Array or ChunkedArray) -> ``pyarrow.FixedSizeListArray`` of float32 (N, D), same order,
        null where the input was null or could not be decoded. ``errors``, if given, receives
        row -> reason for each row that failed (see ``arrowvision.arrow.columns``)."""
        from .arrow.columns import embed_image_column

        result = embed_image_column(self, column, batch_size=batch_size, normalize=normalize, decode=decode, workers=workers)
        if errors is not None:
            errors.update(result.errors)
        return result.to_arrow()
