"""The reference backend for SigLIP 2 NaFlex weights: our PyTorch ``NaFlexVisionTransformer``.

It takes a ``NaFlexBatch`` (patches, mask, patch grids; see ``arrowvision.inputs.naflex``) of any
mix of image shapes and returns pooled float32 (N, D). fp32 only for now: the half precisions'
held-out validation is written for fixed-resolution pixels and is not wired up for NaFlex yet.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BackendError
from ..weights.format import WeightLoader
from .base import BackendBase
from .feeds import torch_inputs
from .torch_backend import import_torch, torch_device


class NaFlexTorchBackend(BackendBase):
    name = "torch"

    def __init__(self, weights: WeightLoader, device: str = "cpu", precision: str | None = None, **options: Any):
        self.torch = torch = import_torch()
        from ..model.naflex import NaFlexVisionTransformer

        unknown = set(options) - {"min_cosine", "cache_dir"}
        if unknown:
            raise BackendError(f"option(s) {', '.join(sorted(unknown))} do not apply to NaFlex models on the torch backend")
        if precision not in (None, "fp32"):
            raise BackendError(f"precision {precision!r}: SigLIP 2 NaFlex models run in fp32 on the torch backend for now")
        self.precision = "fp32"
        self.device = torch_device(torch, device)
        self.model = NaFlexVisionTransformer.from_weights(weights, dtype=torch.float32).to(self.device)
        self.config = self.model.config

    def __call__(self, batch: Any) -> np.ndarray:
        """A ``NaFlexBatch`` (any mix of image shapes) -> pooled float32 (N, D)."""
        with self.torch.inference_mode():
            return self.model(*torch_inputs(self.config, batch, self.device)).pooled.float().cpu().numpy()
