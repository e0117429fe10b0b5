"""The one interface every vision backend offers, and a base class with its defaults.

A backend takes preprocessed (N, 3, H, W) float32 pixels and returns pooled (N, D) float32
embeddings. Backends that normalize on their own device (torch) also take resized uint8
(N, S, S, 3) rows: ``accepts_uint8`` says so, and ``stage``/``launch``/``embed_uint8`` run them.
Callers read every attribute directly: the defaults live here, not in ``getattr`` fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from ..errors import BackendError

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16", "int8-weights", "int8")  # every precision some backend offers
BACKEND_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "openvino": PRECISIONS, "onnxruntime": ("fp32", "int8")}
# The torch (eager, CPU) and ONNX Runtime backends run a large batch in chunks of about this many
# tokens: their activations, and the arena ORT keeps at its high-water mark, grow with the batch,
# while GEMMs of 8 x 196 rows are already as fast. SigLIP-B/16 batch 32 on 2 cores, whole vs chunks
# of 8: torch fp32 1045-1082 vs 724-803 MB peak RSS; ORT int8 965 vs 476-494 MB (2.6-2.8 vs 2.5 s);
# ORT fp32 1425 vs 915 MB (6.5-7.1 vs 6.2-6.5 s). OpenVINO plans its own memory and is left whole.
CPU_CHUNK_TOKENS = 2048


def rows_per_chunk(height: int, width: int, patch_size: int) -> int:
    """Images of this size per chunk (at least one)."""
    tokens = max(1, (height // patch_size) * (width // patch_size))
    return max(1, CPU_CHUNK_TOKENS // tokens)


class Backend(Protocol):
    """What the encoder, the pipeline, the service and the CLI use of a backend."""

    name: str  # torch, openvino, onnxruntime
    precision: str  # one of PRECISIONS
    device: Any  # "cpu"/"CPU"/"GPU", or a torch.device
    config: Any  # the VisionConfig of the model it runs
    accepts_uint8: bool  # takes resized uint8 rows and normalizes on its device
    cache_hit: bool  # False when this load had to export (and validate) the model first
    report: Mapping[str, Any]  # the held-out validation report of a lossy precision ({} if none)

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def stage(self, pixels: Any) -> Any: ...  # uint8 rows -> staged on the device (accepts_uint8 only)

    def launch(self, staged: Any) -> Any: ...  # staged rows -> a pending result with .result()

    def embed_uint8(self, pixels: Any) -> np.ndarray: ...

    def inference_threads(self) -> int | None: ...  # threads the runtime really uses, if it says


class BackendBase:
    """Defaults for the optional parts of ``Backend``: a float32-only CPU backend at fp32 that
    reports no validation and no thread count."""

    name = "?"
    precision = "fp32"
    device: Any = "cpu"
    config: Any = None
    accepts_uint8 = False
    cache_hit = True
    report: Mapping[str, Any] = MappingProxyType({})

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _no_uint8(self) -> BackendError:
        return BackendError(f"the {self.name} backend takes float32 pixels, not uint8 rows")

    def stage(self, pixels: Any) -> Any:
        raise self._no_uint8()

    def launch(self, staged: Any) -> Any:
        raise self._no_uint8()

    def embed_uint8(self, pixels: Any) -> np.ndarray:
        raise self._no_uint8()

    def inference_threads(self) -> int | None:
        return None


_INTERFACE = ("name", "precision", "device", "config", "accepts_uint8", "cache_hit", "report",
              "stage", "launch", "embed_uint8", "inference_threads")


class AdaptedBackend(BackendBase):
    """A callable that does not derive from ``BackendBase`` (a wrapper, a test double) made a full
    ``Backend``: what it defines of the interface is used, the rest keeps the defaults above, and
    any other attribute is read from it."""

    def __init__(self, inner: Any):
        self.inner = inner
        for attribute in _INTERFACE:
            if hasattr(inner, attribute):
                setattr(self, attribute, getattr(inner, attribute))

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.inner(pixel_values)

    def __getattr__(self, attribute: str) -> Any:  # only for what the interface does not declare
        if attribute == "inner":
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)


def as_backend(backend: Any) -> Backend:
    """``backend`` itself when it derives from ``BackendBase``, else adapted (``AdaptedBackend``)."""
    return backend if isinstance(backend, BackendBase) else AdaptedBackend(backend)
