"""Inference backends. Each takes preprocessed (N, 3, H, W) float32 pixels and returns the
pooled (N, D) float32 embeddings. ``torch`` is the reference; ``openvino`` the CPU fast path."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray: ...


BACKENDS = ("torch", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8-weights", "int8")  # openvino export precisions
