"""The reference backend: our PyTorch VisionTransformer on the zero-copy Parquet tensors."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..format import WeightLoader


def import_torch():
    """torch, or a BackendError saying how to install the CPU build."""
    try:
        import torch
    except ImportError:
        raise BackendError("the torch backend needs PyTorch: pip install torch==2.13.0") from None
    return torch


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, weights: WeightLoader, device: str = "cpu"):
        self.torch = torch = import_torch()  # before ..model, which imports torch
        from ..model import VisionTransformer

        self.device = torch.device(device.lower())
        self.model = VisionTransformer.from_weights(weights).to(self.device)
        self.config = self.model.config

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            pixels = self.torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
            return self.model(pixels).pooled.float().cpu().numpy()
