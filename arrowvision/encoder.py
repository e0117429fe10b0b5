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
from .errors import ArrowVisionError, OptionError
from .inputs.naflex import DEFAULT_MAX_PATCHES, NaFlexBatch, NaFlexPreprocessor
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

    def __init__(self, weights: WeightLoader | BundleSource, backend: Backend, config: VisionConfig, *,
                 max_num_patches: int | None = None):
        """``max_num_patches``: the patch budget of a SigLIP 2 NaFlex model (64..1024, default 256);
        ``encode`` can change it per call."""
        self.weights = weights
        self.backend = backend
        self.config = config
        if config.naflex:
            self.preprocessor: Preprocessor | NaFlexPreprocessor = NaFlexPreprocessor.from_config(
                config, DEFAULT_MAX_PATCHES if max_num_patches is None else max_num_patches)
        elif max_num_patches is not None:
            raise OptionError(f"max_num_patches applies to SigLIP 2 NaFlex models only; this is a fixed "
                              f"{config.image_size}x{config.image_size} {config.family} model")
        else:
            self.preprocessor = Preprocessor.from_config(config)

    @property
    def max_num_patches(self) -> int | None:
        """The NaFlex patch budget (None for fixed-resolution models)."""
        return self.preprocessor.max_num_patches if self.config.naflex else None

    def _with_budget(self, max_num_patches: int | None) -> Any:
        """The preprocessor for one call's patch budget (the encoder's own when None)."""
        if max_num_patches is None or max_num_patches == self.max_num_patches:
            return self.preprocessor
        if not self.config.naflex:
            raise OptionError("max_num_patches applies to SigLIP 2 NaFlex models only")
        return NaFlexPreprocessor.from_config(self.config, max_num_patches)

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
        cls, path: str | os.PathLike, backend: str = "torch", device: str = "cpu", *,
        max_num_patches: int | None = None, **options: Any
    ) -> VisionEncoder:
        """``backend``: torch (reference), openvino, onnxruntime, or auto (the fastest validated
        backend and precision for this CPU, measured once and cached). ``options`` go to the
        backend: precision, cache_dir, min_cosine, calibration, mode, num_threads.
        ``max_num_patches``: the default patch budget of a SigLIP 2 NaFlex model."""
        weights = WeightLoader(path)
        impl = create_backend(backend, weights, device=device, **options)
        return cls(weights, impl, impl.config, max_num_patches=max_num_patches)

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
        normalize on their device (torch), else (3, S, S) float32; a NaFlex model's record
        (uint8 patches + patch grid, see ``NaFlexPreprocessor.resized``)."""
        if self.backend.accepts_uint8 or self.config.naflex:
            return self.preprocessor.resized(image)
        return self.preprocessor.pixels(image)

    def run_prepared(self, batch: np.ndarray) -> np.ndarray:
        """A stack of ``prepare`` rows -> pooled float32 (N, D), not normalized."""
        if self.config.naflex:  # records: patches + grid
            return self.backend(self.preprocessor.normalize(batch))
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
        if self.config.naflex:
            return self.preprocessor.batch(list(images))
        if len(images) <= 1 or workers <= 1:
            return self.preprocessor.batch(list(images))
        with ThreadPoolExecutor(workers) as pool:
            return np.stack(list(pool.map(self.preprocessor, images)))

    def encode(self, images: Iterable[ImageInput] | Any, batch_size: int = 32, normalize: bool = True,
               decode: str = "exact", max_num_patches: int | None = None) -> np.ndarray:
        """Embed images: paths, bytes, PIL images, HWC uint8 arrays, or a preprocessed (N,3,H,W) batch
        (a ``NaFlexBatch`` for SigLIP 2 NaFlex models).

        ``decode="fast"`` decodes JPEG files and bytes at a reduced size first (see
        ``arrowvision.inputs.decode``); ``gpu`` decoding is for folders (``embed_paths``).
        ``max_num_patches``: this call's NaFlex patch budget (64..1024; default the encoder's).
        Returns (N, D) float32, L2-normalized unless ``normalize=False``."""
        if batch_size < 1:
            raise ArrowVisionError(f"batch_size must be >= 1, got {batch_size}")
        if decode not in ("exact", "fast"):
            raise ArrowVisionError(f"decode={decode!r}: encode() takes exact or fast (gpu decoding: embed_paths)")
        preprocessor = self._with_budget(max_num_patches)
        if self.config.naflex:
            outputs = self._encode_naflex(images, preprocessor, batch_size, decode)
        elif is_pixel_batch(images):
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

    def _encode_naflex(self, images: Any, preprocessor: NaFlexPreprocessor, batch_size: int, decode: str) -> list[np.ndarray]:
        """NaFlex batches: every image of a batch padded to the call's patch budget, whatever its shape."""
        if decode != "exact":
            raise ArrowVisionError(f"decode={decode!r}: SigLIP 2 NaFlex models decode images exactly (decode='exact')")
        if isinstance(images, NaFlexBatch):
            return [self.backend(images.rows(i, i + batch_size)) for i in range(0, len(images), batch_size)]
        if is_pixel_batch(images):
            raise ArrowVisionError("a SigLIP 2 NaFlex model takes images or a NaFlexBatch, not fixed-size (N, 3, H, W) pixels")
        items = as_image_list(images)

        def record(image: ImageInput) -> np.ndarray:
            return preprocessor.resized(load_image(image))

        outputs = []
        with ThreadPoolExecutor(2) as pool:  # Pillow releases the GIL while decoding and resizing
            for i in range(0, len(items), batch_size):
                records = np.stack(list(pool.map(record, items[i : i + batch_size])))
                outputs.append(self.backend(preprocessor.normalize(records)))
        return outputs

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
