"""The reference backend: our PyTorch VisionTransformer on the zero-copy Parquet tensors."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from ..format import WeightLoader


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, weights: WeightLoader, device: str = "cpu"):
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install torch==2.13.0") from None
        from ..model import VisionTransformer

        self.torch = torch
        self.device = torch.device(device.lower())
        self.model = VisionTransformer.from_weights(weights).to(self.device)
        self.config = self.model.config

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            pixels = self.torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
            return self.model(pixels).pooled.float().cpu().numpy()
