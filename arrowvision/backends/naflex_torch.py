"""The reference backend for SigLIP 2 NaFlex weights: our PyTorch ``NaFlexVisionTransformer``.

It takes a ``NaFlexBatch`` (patches, mask, patch grids; see ``arrowvision.inputs.naflex``) of any
mix of image shapes and returns pooled float32 (N, D), on the CPU or a CUDA GPU, in fp32 or a
half precision validated on the held-out kinds like the fixed-resolution ``TorchBackend``'s.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import BackendError
from ..weights.format import WeightLoader
from .base import BackendBase
from .feeds import torch_inputs
from .torch_backend import HALF_PRECISIONS, TORCH_PRECISIONS, default_precision, import_torch, torch_device, validated_report


class NaFlexTorchBackend(BackendBase):
    name = "torch"

    def __init__(self, weights: WeightLoader, device: str = "cpu", precision: str | None = None, *,
                 min_cosine: float | None = None, cache_dir: str | os.PathLike | None = None, **options: Any):
        self.torch = torch = import_torch()
        from ..model.naflex import NaFlexVisionTransformer

        if options:
            raise BackendError(f"option(s) {', '.join(sorted(options))} do not apply to NaFlex models on the torch backend")
        self.device = torch_device(torch, device)
        self.precision = precision or default_precision(torch, self.device)
        if self.precision not in TORCH_PRECISIONS:
            raise BackendError(f"precision {self.precision!r} is not available on the torch backend; "
                               f"choose from {', '.join(TORCH_PRECISIONS)}")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.model = NaFlexVisionTransformer.from_weights(weights, dtype=self.dtype).to(self.device)
        self.config = self.model.config
        self.report: dict[str, Any] = {}
        if self.precision in HALF_PRECISIONS:
            from .validation import DEFAULT_MIN_COSINE

            self.report = validated_report(self, weights, DEFAULT_MIN_COSINE if min_cosine is None else min_cosine, cache_dir)

    def __call__(self, batch: Any) -> np.ndarray:
        """A ``NaFlexBatch`` (any mix of image shapes) -> pooled float32 (N, D)."""
        inputs = [t.to(self.dtype) if t.is_floating_point() else t for t in torch_inputs(self.config, batch, self.device)]
        with self.torch.inference_mode():
            return self.model(*inputs).pooled.float().cpu().numpy()
