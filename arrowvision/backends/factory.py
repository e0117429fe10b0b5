"""``create``: one backend by name, with its options checked (the entry point of ``backends``)."""

from __future__ import annotations

from typing import Any

from ..errors import BackendError, ConversionError
from ..model.config import VisionConfig
from ..weights.format import WeightLoader
from .base import BACKEND_PRECISIONS, BACKENDS, Backend


def create(name: str, weights: WeightLoader, device: str = "cpu", **options: Any) -> Backend:
    """Build backend ``name`` for ``weights``; options are the backend's own (precision, cache_dir, ...)."""
    precision = options.get("precision", "fp32")
    if name in BACKEND_PRECISIONS and precision not in BACKEND_PRECISIONS[name]:
        raise BackendError(f"precision {precision!r} is not available on the {name} backend; "
                           f"choose from {', '.join(BACKEND_PRECISIONS[name])}")
    if name == "torch" and is_naflex(weights):
        from .naflex_torch import NaFlexTorchBackend

        return NaFlexTorchBackend(weights, device=device, **options)
    if name == "torch":
        from .torch_backend import TorchBackend

        unknown = set(options) - {"precision", "compile", "cuda_graphs", "fused", "min_cosine", "cache_dir"}
        if unknown:
            raise BackendError(f"option(s) {', '.join(sorted(unknown))} do not apply to the torch backend")
        return TorchBackend(weights, device=device, **options)  # precision: fp32 on CPU, bf16/fp16 on CUDA
    if name == "openvino":
        from .openvino_backend import OpenVINOBackend

        return OpenVINOBackend(weights, device=device, **options)
    if name == "onnxruntime":
        from .onnxruntime_backend import ONNXRuntimeBackend

        return ONNXRuntimeBackend(weights, device=device, **options)
    if name == "auto":
        from .auto import create_auto

        return create_auto(weights, device=device, build=create, **options)  # auto measures named backends
    raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def is_naflex(weights: WeightLoader) -> bool:
    """A SigLIP 2 NaFlex file (variable resolution: patches + mask inputs)? Bad configs are left
    to the backends, whose loading names the problem."""
    try:
        return VisionConfig.from_hf(weights.config).naflex
    except ConversionError:
        return False

