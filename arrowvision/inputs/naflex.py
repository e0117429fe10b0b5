"""SigLIP 2 NaFlex preprocessing, equal to transformers' ``Siglip2ImageProcessor``.

Each image is resized (Pillow bilinear, as the HF PIL processor) to the largest size whose sides
are multiples of the patch size, that keeps its aspect ratio and that fits ``max_num_patches``
patches; cut into (p, p, 3) patches in row-major order; padded to ``max_num_patches`` patches.
The model gets the patches (N, L, p*p*3), a mask of the real ones (N, L) and each image's patch
grid (N, 2) as (rows, columns).

For the decoding pipeline (which fills fixed-size uint8 slots) an image travels as one record
(``row_dtype``): its uint8 patches and its grid; ``normalize`` turns a stack of records into the
model's float32 batch with the same exact lookup table as the fixed-resolution ``Preprocessor``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from ..errors import OptionError
from ..model.config import VisionConfig
from .preprocess import MAX_PIXELS, ImageInput, Preprocessor, load_image

DEFAULT_MAX_PATCHES = 256  # what the published NaFlex checkpoints were trained around
MIN_MAX_PATCHES, MAX_MAX_PATCHES = 64, 1024


@dataclass(frozen=True)
class NaFlexBatch:
    """The model input of a NaFlex tower (transformers' names). Iterates over its three arrays;
    ``len`` and slicing are by image, as for an (N, ...) pixel array."""

    pixel_values: np.ndarray  # (N, L, p*p*3) float32, zero at padded patches
    pixel_attention_mask: np.ndarray  # (N, L) int32, 1 for real patches
    spatial_shapes: np.ndarray  # (N, 2) int64, patch rows and columns of each image

    NAMES: ClassVar[tuple[str, str, str]] = ("pixel_values", "pixel_attention_mask", "spatial_shapes")

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.pixel_values, self.pixel_attention_mask, self.spatial_shapes))

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, rows: slice) -> NaFlexBatch:
        if not isinstance(rows, slice):
            raise TypeError(f"NaFlexBatch rows are taken by slice, not {type(rows).__name__}")
        return NaFlexBatch(*(part[rows] for part in self))

    def rows(self, start: int, stop: int) -> NaFlexBatch:
        return self[start:stop]


def check_patch_budget(max_num_patches: object) -> int:
    """``max_num_patches`` if it is an integer in [64, 1024], else an OptionError naming the range."""
    if isinstance(max_num_patches, bool) or not isinstance(max_num_patches, (int, np.integer)):
        raise OptionError(f"max_num_patches must be an integer in [{MIN_MAX_PATCHES}, {MAX_MAX_PATCHES}], "
                          f"got {max_num_patches!r}")
    if not MIN_MAX_PATCHES <= max_num_patches <= MAX_MAX_PATCHES:
        raise OptionError(f"max_num_patches {max_num_patches} is out of range [{MIN_MAX_PATCHES}, {MAX_MAX_PATCHES}]")
    return int(max_num_patches)


def target_size(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(height, width) to resize to: multiples of ``patch_size``, at least one patch each, at most
    ``max_num_patches`` patches, aspect ratio kept. The same bisection over the scale as
    transformers' ``get_image_size_for_max_num_patches`` (its rounding decides equal outputs)."""

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        patches = (scaled(scale, height) / patch_size) * (scaled(scale, width) / patch_size)
        if patches <= max_num_patches:
            low = scale
        else:
            high = scale
    return scaled(low, height), scaled(low, width)


@dataclass(frozen=True)
class NaFlexPreprocessor:
    """Image -> NaFlex patches within a patch budget, as ``Siglip2ImageProcessor`` does it."""

    patch_size: int
    max_num_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, config: VisionConfig, max_num_patches: int = DEFAULT_MAX_PATCHES) -> NaFlexPreprocessor:
        return cls(config.patch_size, check_patch_budget(max_num_patches), config.image_mean, config.image_std)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    @property
    def row_dtype(self) -> np.dtype:
        """One image in a decoding slot: uint8 patches padded to the budget, and its patch grid."""
        return np.dtype([("patches", np.uint8, (self.max_num_patches, self.patch_dim)), ("grid", np.int32, (2,))])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return ()  # one record per image

    @property
    def image_size(self) -> int:
        """The side of a square image of the full budget, in pixels (what size-based code reads)."""
        return math.isqrt(self.max_num_patches) * self.patch_size

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """(3 * 256,) HF's exact rescale + normalize per channel, laid out to index by value + 256 * channel."""
        return Preprocessor(self.image_size, self.mean, self.std, False).lut.reshape(-1)

    @functools.cached_property
    def channel_offsets(self) -> np.ndarray:
        """256 * channel for each value of a flattened (p, p, 3) patch."""
        return np.tile(np.arange(3, dtype=np.int32) * 256, self.patch_size * self.patch_size)

    def resize(self, image: Image.Image) -> Image.Image:
        height, width = target_size(image.height, image.width, self.patch_size, self.max_num_patches)
        return image.resize((width, height), Image.Resampling.BILINEAR)

    def resized(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image -> its record (``row_dtype``): resized, cut into patches, padded."""
        pixels = np.asarray(self.resize(image))
        p = self.patch_size
        rows, columns = pixels.shape[0] // p, pixels.shape[1] // p
        patches = pixels.reshape(rows, p, columns, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * columns, self.patch_dim)
        record = np.zeros((), dtype=self.row_dtype)
        record["patches"][: rows * columns] = patches
        record["grid"] = (rows, columns)
        return record

    def normalize(self, records: np.ndarray) -> NaFlexBatch:
        """A stack of records (N,) (or one record) -> the model's float32 ``NaFlexBatch``."""
        records = np.atleast_1d(records)
        grids = records["grid"].astype(np.int64)
        mask = (np.arange(self.max_num_patches)[None, :] < grids.prod(axis=1)[:, None]).astype(np.int32)
        values = self.lut[records["patches"].astype(np.int32) + self.channel_offsets]
        values *= mask[..., None]  # padded patches are zeros, as transformers pads after normalizing
        return NaFlexBatch(values, mask, grids)

    def pixels(self, image: Image.Image) -> NaFlexBatch:
        """An already decoded RGB image -> a batch of one."""
        return self.normalize(self.resized(image))

    def __call__(self, image: ImageInput, *, max_pixels: int = MAX_PIXELS) -> NaFlexBatch:
        return self.pixels(load_image(image, max_pixels=max_pixels))

    def batch(self, images: Sequence[ImageInput]) -> NaFlexBatch:
        records = np.stack([self.resized(load_image(image)) for image in images]) if images else np.zeros(0, self.row_dtype)
        return self.normalize(records)


def concatenate(batches: Sequence[NaFlexBatch]) -> NaFlexBatch:
    """Batches of one patch budget -> one batch."""
    return NaFlexBatch(*(np.concatenate(parts) for parts in zip(*batches)))


def stack_inputs(items: Sequence[np.ndarray | NaFlexBatch]) -> np.ndarray | NaFlexBatch:
    """Preprocessor outputs of single images -> one model input: stacked (3, S, S) pixels, or
    the NaFlex batches of one concatenated."""
    return concatenate(items) if items and isinstance(items[0], NaFlexBatch) else np.stack(items)
