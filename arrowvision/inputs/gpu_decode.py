"""``--decode gpu``: JPEGs decoded in batches by nvJPEG (torchvision) and resized on the GPU.

The worker processes only read each file, hash it and check its header (``decode.plain_jpeg``);
this module decodes the plain JPEGs of a batch in one ``torchvision.io.decode_jpeg`` call on the
device and resizes them there with antialiased bicubic interpolation (Pillow's filter), rounded
to uint8 like Pillow's output. Anything nvJPEG refuses goes down the CPU ``exact`` path, so a bad
file still ends as a row in the errors table. Needs torch with CUDA and torchvision.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import ArrowVisionError
from .decode import Decoded, decode_path
from .preprocess import Preprocessor


def resize_on_device(images: list[Any], preprocessor: Preprocessor) -> Any:
    """(3, H, W) uint8 tensors -> (N, 3, S, S) uint8, as the HF processor's resize (SigLIP: a
    square; CLIP: shortest edge to S, then the center crop). Same-sized images go in one call.
    Every image must be at least S on its short side (smaller ones take the CPU path)."""
    import torch
    import torch.nn.functional as F

    size = preprocessor.image_size
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=images[0].device)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    for (height, width), indices in groups.items():
        batch = torch.stack([images[i] for i in indices]).float()
        if preprocessor.center_crop:
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            new_h, new_w = (new_long, size) if width <= height else (size, new_long)
        else:
            new_h, new_w = size, size
        resized = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        resized = resized[:, :, top : top + size, left : left + size]
        out[indices] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


class GpuDecoder:
    """Turns a ``FedBatch`` into (decoded items, a staged device batch) for a CUDA torch backend."""

    def __init__(self, preprocessor: Preprocessor, backend: Any):
        device = backend.device  # a torch.device for the torch backend
        if backend.name != "torch" or getattr(device, "type", "") != "cuda":
            raise ArrowVisionError("--decode gpu needs the torch backend on a CUDA device (--backend torch --device cuda)")
        try:
            import torchvision.io
        except ImportError:
            raise ArrowVisionError("--decode gpu needs torchvision (its nvJPEG decoder): pip install torchvision; "
                                   "or use --decode fast") from None
        import torch

        self.torch, self.io = torch, torchvision.io
        self.preprocessor = preprocessor
        self.backend = backend
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def _decode(self, items: list[Decoded]) -> tuple[list[Decoded], list[Any]]:
        """nvJPEG on the whole list, else one by one; refused files are decoded on the CPU
        (``exact``), which records their error if they are bad."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer on read-only bytes: we never write to them
            data = [self.torch.frombuffer(item.jpeg, dtype=self.torch.uint8) for item in items]
        try:
            return items, self.io.decode_jpeg(data, mode=self.io.ImageReadMode.RGB, device=self.device)
        except Exception:  # noqa: BLE001, S110 - one bad file fails the batch call: find it
            pass
        good, images = [], []
        for item, tensor in zip(items, data):
            try:
                images.append(self.io.decode_jpeg(tensor, mode=self.io.ImageReadMode.RGB, device=self.device))
                good.append(item)
            except Exception:  # noqa: BLE001 - the CPU path names the problem
                fallback = decode_path(item.path, self.preprocessor, "exact")
                item.pixels, item.error = fallback.pixels, fallback.error
        return good, images

    def assemble(self, decoded: list[Decoded], pixels: np.ndarray, jpegs: list[Decoded]) -> tuple[list[Decoded], Any]:
        """CPU-decoded rows plus GPU-decoded JPEGs -> (items in row order, backend.stage(...))."""
        torch = self.torch
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            gpu_items, images = self._decode(jpegs) if jpegs else ([], [])
            late = [item for item in jpegs if item.pixels is not None]  # refused by nvJPEG, decoded on the CPU
            for item in jpegs:
                item.jpeg = None  # the bytes are not needed any more
            parts, items = [], []
            host = np.concatenate([pixels, np.stack([item.pixels for item in late])]) if late else pixels
            if len(host):
                parts.append(torch.from_numpy(np.ascontiguousarray(host)).pin_memory().to(self.device, non_blocking=True)
                             .permute(0, 3, 1, 2))
                items += decoded + late
                for item in late:
                    item.pixels = None
            if images:
                parts.append(resize_on_device(images, self.preprocessor))
                items += gpu_items
            if not parts:
                return [], None
            batch = parts[0] if len(parts) == 1 else torch.cat(parts)
            return items, self.backend.stage(batch)
