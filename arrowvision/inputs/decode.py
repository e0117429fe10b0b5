"""Decoding one image file to the model's (S, S, 3) uint8 input, in one of three modes.

- ``exact`` (default): Pillow full decode + the HF processor's resize: bit-identical to
  ``SiglipImageProcessor`` / ``CLIPImageProcessor``.
- ``fast``: JPEGs are decoded at a reduced size in the DCT domain (Pillow ``draft``: 1/2, 1/4 or
  1/8 scale, never below the model's input size) before the same resize; several times less
  work on camera-sized photos, min cosine vs ``exact`` in docs/GPU.md. Other formats as ``exact``.
- ``gpu``: the file is only read here; JPEGs are decoded in batches on the GPU (see
  ``gpu_decode``), everything else takes the ``exact`` path.

Every failure of a file becomes that row's error, never the job's: the functions here run in
worker threads or processes (``feeder``) and must import neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ArrowVisionError, ImageError, ImageTooLarge
from .preprocess import MAX_PIXELS, Preprocessor, load_image

DECODE_MODES = ("exact", "fast", "gpu")
MAX_IMAGE_FILE_BYTES = 1 << 30  # read into memory whole; the pixel limit is checked after
EXIF_ORIENTATION = 0x0112


@dataclass
class Decoded:
    """One input file: its pixels (or JPEG bytes for the GPU decoder) and what the dataset keeps."""

    path: str
    pixels: np.ndarray | None = None  # (S, S, 3) uint8, or None when failed / left to the GPU
    width: int = 0
    height: int = 0
    digest: str = ""
    error: str = ""
    jpeg: bytes | None = None  # gpu mode: a plain JPEG the GPU decodes
    embedding: np.ndarray | None = None  # set by the pipeline after the model ran


def check_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ArrowVisionError(f"decode mode {mode!r}: choose from {', '.join(DECODE_MODES)}")
    return mode


URL_POLICY: list = [None]  # embed_paths sets the UrlPolicy of http(s) inputs (None: SSRF guard on)


def read_image_bytes(path: str) -> bytes:
    """The file's (or remote object's, ``s3://...``, or http(s) URL's, fetched with the SSRF guard
    of ``urlfetch``) bytes; odd paths (NUL byte, FIFO, device, folder, huge) are an ImageError."""
    from .uris import is_remote, read_uri
    from .urlfetch import is_url, shared_fetcher

    if is_url(path):
        return shared_fetcher(URL_POLICY[0]).fetch(path)  # a UrlError is an ImageError

    if "\0" in path:
        raise ImageError(f"{path!r}: path contains a NUL byte")
    try:
        if is_remote(path):  # read through pyarrow's filesystems
            return read_uri(path, MAX_IMAGE_FILE_BYTES)
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):  # a FIFO or device would block or never end
            raise ImageError(f"{path}: not a regular file")
        if status.st_size > MAX_IMAGE_FILE_BYTES:
            raise ImageError(f"{path}: {status.st_size} bytes, larger than the {MAX_IMAGE_FILE_BYTES} allowed")
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None


def open_reduced(data: bytes, label: str, size: int, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode with a JPEG draft: the smallest DCT scale still >= ``size`` on both sides. Returns
    the upright RGB image and the full-size upright (width, height), as ``exact`` records it."""
    if not data:
        raise ImageError(f"{label}: empty input")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognized format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label}: {width}x{height} pixels exceeds the limit of {max_pixels:,}")
    if image.format == "JPEG":
        try:
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways: upright size swaps
                width, height = height, width
        except Exception:  # noqa: BLE001, S110 - unreadable EXIF: load_image ignores it the same way
            pass
        image.draft("RGB", (size, size))
    return load_image(image, max_pixels=max_pixels, name=label), (width, height)


def plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) if the GPU decoder can take these bytes as they are: a complete (EOI marker
    at the end) baseline/progressive RGB or grayscale JPEG with no EXIF rotation; None sends the
    file down the CPU path, where Pillow refuses a truncated file and names the problem."""
    if b"\xff\xd9" not in data[-64:]:  # no end-of-image marker: truncated; nvJPEG would embed a partial image
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        if image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
            return None
        return image.size
    except Exception:  # noqa: BLE001 - anything odd: the CPU path decides and names the problem
        return None


def decode_path(path: str, preprocessor: Preprocessor, mode: str = "exact",
                transform: Callable[[Image.Image], Image.Image] | None = None) -> Decoded:
    """Read, decode, (sketch-normalize,) resize one file to (S, S, 3) uint8. Every failure, of
    any exception type, becomes an error row: a worker that raised would stall the job."""
    try:
        data = read_image_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        if mode == "gpu" and transform is None and len(data) > 0:
            size = plain_jpeg(data)
            if size is not None and min(size) >= preprocessor.image_size:  # small ones: CPU (HF pads them)
                return Decoded(path, None, size[0], size[1], digest, jpeg=data)
        if mode == "fast":
            image, (width, height) = open_reduced(data, path, preprocessor.image_size)
        else:
            image = load_image(data, name=path)
            width, height = image.size
        if transform is not None:
            image = transform(image)
        return Decoded(path, preprocessor.resized(image), width, height, digest)
    except ImageError as exc:
        return Decoded(path, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is this row's failure, not the job's
        return Decoded(path, error=f"{path}: {exc or type(exc).__name__}")


def decode_rows(target: np.ndarray, jobs: list[tuple[int, str, str]], preprocessor: Preprocessor,
                transform: Any = None) -> list[Decoded]:
    """Decode ``jobs`` ((row, path, mode) triples) into rows of ``target`` (N, S, S, 3); the
    returned rows carry no pixels (they are in ``target``), so a process returns only metadata."""
    results = []
    for row, path, mode in jobs:
        item = decode_path(path, preprocessor, mode, transform)
        if item.pixels is not None:
            target[row] = item.pixels
            item.pixels = None
        results.append(item)
    return results


# -- process workers: the target is a shared-memory slot the parent owns -----------------------

_attached: dict[str, Any] = {}


def decode_rows_shared(name: str, shape: tuple[int, ...], jobs: list[tuple[int, str, str]], preprocessor: Preprocessor,
                       transform: Any = None) -> list[Decoded]:
    """``decode_rows`` in a worker process, into the parent's shared memory block ``name``."""
    block = _attached.get(name)
    if block is None:  # attached once per worker; the parent unlinks it (workers share its resource tracker)
        from multiprocessing import shared_memory

        block = _attached[name] = shared_memory.SharedMemory(name=name)
    target = np.ndarray(shape, dtype=np.uint8, buffer=block.buf)
    return decode_rows(target, jobs, preprocessor, transform)


def decode_rows_copied(shape: tuple[int, ...], jobs: list[tuple[int, str, str]], preprocessor: Preprocessor,
                       transform: Any = None) -> tuple[list[Decoded], np.ndarray]:
    """``decode_rows`` in a worker process without shared memory: the rows come back pickled
    (used when /dev/shm is too small for the slots, as in containers with the default 64 MiB)."""
    first = jobs[0][0] if jobs else 0
    local = np.empty((len(jobs), *shape[1:]), dtype=np.uint8)
    items = decode_rows(local, [(row - first, path, mode) for row, path, mode in jobs], preprocessor, transform)
    return items, local


def gpu_cpu_share(workers: int) -> float:
    """In ``gpu`` mode, the share of JPEGs the worker processes decode themselves (``fast``)
    while the GPU decodes the rest: nvJPEG shares the GPU with the model, and the workers would
    otherwise only read files. Proportional to the rates measured on an H200 with 16 cores:
    ~275 img/s per worker in ``fast`` mode, ~6100 img/s for nvJPEG + resize."""
    cpu = 275.0 * max(1, workers)
    return cpu / (cpu + 6100.0)


def row_mode(mode: str, index: int, cpu_share: float) -> str:
    """``gpu`` rows spread evenly between the GPU and (a ``cpu_share`` of them) CPU ``fast`` decoding."""
    if mode != "gpu" or cpu_share <= 0:
        return mode
    return "fast" if int((index + 1) * cpu_share) > int(index * cpu_share) else "gpu"
