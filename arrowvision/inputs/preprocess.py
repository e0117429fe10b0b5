"""Image decoding and model preprocessing (same result as the HF image processors).

Decoding is defensive: every failure (corrupt, truncated, empty, not an image, too many pixels)
becomes an ``ImageError`` naming the input. Preprocessing reproduces ``SiglipImageProcessor``
(bicubic resize to a square, no crop) and ``CLIPImageProcessor`` (bicubic resize of the shortest
edge, center crop) with Pillow, which is what the HF processors use; rescale + normalize is a
per-channel lookup table holding exactly HF's float64-then-float32 arithmetic.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLarge
from ..model.config import VisionConfig

MAX_PIXELS = 50_000_000  # decompression-bomb guard; raise per call with max_pixels=
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode any supported input to an 8-bit RGB PIL image, upright per EXIF."""
    label = name or describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(_array_to_rgb(source, label))
    else:
        image = _open(source, label, max_pixels)
    if image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{label}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels:,}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{label}: image has no pixels")
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data surfaces when pixels load
        raise ImageError(f"{label}: cannot decode image ({exc})") from None


def _open(source: Any, label: str, max_pixels: int) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"{label}: empty input")
        stream: Any = io.BytesIO(source)  # bytes are shared; a memoryview (an Arrow buffer slice) is copied once
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise ImageError(f"{label}: empty file")
        except OSError as exc:
            raise ImageError(f"{label}: cannot read ({exc.strerror})") from None
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            if image.width * image.height > max_pixels:  # header only: nothing decoded yet
                raise ImageTooLarge(f"{label}: {image.width}x{image.height} pixels exceeds the limit of {max_pixels:,}")
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognized format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{label}: decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited on white, 16-bit scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I") and array.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray, label: str) -> np.ndarray:
    if array.size == 0:
        raise ImageError(f"{label}: empty array")
    if array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ImageError(f"{label}: expected a uint8 HWC RGB array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{label}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(array), "RGBA")))
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class Preprocessor:
    """Image -> normalized (3, S, S) float32, as the model's HF image processor does it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: bool  # CLIP: resize shortest edge then crop; SigLIP: resize to a square

    @classmethod
    def from_config(cls, config: VisionConfig) -> Preprocessor:
        return cls(config.image_size, config.image_mean, config.image_std, config.family == "clip")

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """(3, 256) table: HF's rescale (float64 x 1/255 -> float32) then (x - mean) / std in float32."""
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std

    def resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        if not self.center_crop:
            return image.resize((size, size), Image.Resampling.BICUBIC)
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_size = (size, new_long) if width <= height else (new_long, size)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        if left < 0 or top < 0:  # HF pads with zeros when the image is smaller than the crop
            canvas = Image.new("RGB", (max(size, image.width), max(size, image.height)))
            canvas.paste(image, ((canvas.width - image.width + 1) // 2, (canvas.height - image.height + 1) // 2))
            image, left, top = canvas, (canvas.width - size) // 2, (canvas.height - size) // 2
        return image.crop((left, top, left + size, top + size))

    def __call__(self, image: ImageInput, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        return self.pixels(load_image(image, max_pixels=max_pixels))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """An already decoded RGB image (``load_image``'s output) -> (3, S, S) float32."""
        return self.normalize(self.resized(image))

    def resized(self, image: Image.Image) -> np.ndarray:
        """An already decoded RGB image -> (S, S, 3) uint8: what travels to a device, which
        normalizes there (4x fewer bytes than float32)."""
        return np.asarray(self.resize(image))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(S, S, 3) or (N, S, S, 3) uint8 -> (3, S, S) or (N, 3, S, S) float32, exactly as HF."""
        return np.stack([self.lut[c][pixels[..., c]] for c in range(3)], axis=-3)

    def batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        return np.stack([self(image) for image in images]) if images else np.zeros((0, 3, self.image_size, self.image_size), np.float32)



# ------------------------------------------------------------------------------ sketches


def normalize_sketch(image: ImageInput) -> np.ndarray:
    """Canonical form of a sketch: dark strokes on a white background, full contrast, RGB uint8.

    Choices, in order:
    1. Grayscale: color carries no meaning in a sketch.
    2. Polarity: the background is the majority of pixels, so the median gray level is the
       background; if it is darker than mid-gray the image is inverted (chalk on blackboard,
       white-on-black UI canvases become ink on paper).
    3. Denoise: a 3x3 median filter removes salt-and-pepper speckle and scanner dust while
       keeping 1-2 px strokes' edges (a Gaussian would blur them).
    4. Contrast stretch: the 1st and 99th percentiles map to 0 and 255, so faint pencil and bold
       marker sketches land in the same range; a blank image stays white.
    5. Back to 3-channel RGB for the model.
    """
    import cv2

    rgb = np.asarray(load_image(image))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if np.median(gray) < 128:
        gray = 255 - gray
    gray = cv2.medianBlur(gray, 3)
    low, high = np.percentile(gray, (1, 99))
    if high - low < 8:  # no strokes to speak of
        stretched = np.full_like(gray, 255)
    else:
        stretched = np.clip((gray.astype(np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    return cv2.cvtColor(stretched, cv2.COLOR_GRAY2RGB)


def normalize_sketch_image(image: Image.Image) -> Image.Image:
    return Image.fromarray(normalize_sketch(image))
