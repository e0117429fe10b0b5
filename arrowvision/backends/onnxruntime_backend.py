"""ONNX Runtime backend: runs the cached ONNX model (fp32 or int8) without torch.

On AVX2 CPUs without VNNI ONNX Runtime's dynamic int8 (MLAS u8 x s8, 7-bit weights) is the fast
path: 1.5-1.95x OpenVINO fp32 under AVX2 emulation, where OpenVINO's int8 falls back to oneDNN's
``jit_gemm_I8`` (no faster than fp32); the ``auto`` backend decides per machine by measurement.

Memory (SigLIP-B/16 fp32, batch 32): ONNX Runtime reads the model into its own memory and keeps
one copy of the weights (no mapping stays resident); its arena then grows with the batch, ~0.86 GB
peak RSS. Measured and not taken: ``enable_cpu_mem_arena=False`` (2.6 GB peak: every call's
buffers go through malloc and fragment), the same without memory patterns (1.3 GB).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model.config import VisionConfig
from ..weights.format import WeightLoader
from .artifacts import cache_root, is_complete, read_meta
from .base import BackendBase, rows_per_chunk
from .feeds import named_inputs
from .export_child import export_entry
from .onnx_export import _onnxruntime, cache_key, runtime_model
from .validation import DEFAULT_MIN_COSINE, recheck


class ONNXRuntimeBackend(BackendBase):
    name = "onnxruntime"

    def __init__(
        self,
        weights: WeightLoader,
        device: str = "CPU",
        precision: str = "fp32",
        cache_dir: str | os.PathLike | None = None,
        min_cosine: float = DEFAULT_MIN_COSINE,
        num_threads: int | None = None,
        **unused: Any,
    ):
        _onnxruntime()  # a clear error when ONNX Runtime is missing
        if device.upper() != "CPU":
            raise BackendError(f"the onnxruntime backend runs on the CPU only (asked for {device!r})")
        if unused:
            raise BackendError(f"option(s) {', '.join(sorted(unused))} do not apply to the onnxruntime backend")
        self.config = VisionConfig.from_weights(weights)
        self.precision = precision
        self.device = "CPU"
        self.entry = cache_root(cache_dir) / "onnx" / cache_key(weights, precision) if precision in ("fp32", "int8") else None
        self.cache_hit = self.entry is not None and is_complete(self.entry)
        if not self.cache_hit:  # export validates the precision and re-checks under its lock
            self.entry = export_entry("arrowvision.backends.onnx_export:export_onnx", weights, precision=precision,
                                      cache_dir=cache_dir, min_cosine=min_cosine)
        self.report = read_meta(self.entry)
        recheck(self.report, min_cosine)
        self._open(runtime_model(self.entry, precision), num_threads)

    @classmethod
    def from_file(cls, path: str | os.PathLike, config: VisionConfig, precision: str, *,
                  report: dict[str, Any] | None = None, num_threads: int | None = None) -> ONNXRuntimeBackend:
        """Run an ONNX model already exported and validated elsewhere (a bundle): no weights, no torch."""
        _onnxruntime()
        backend = cls.__new__(cls)
        backend.config, backend.precision, backend.device = config, precision, "CPU"
        backend.entry, backend.cache_hit, backend.report = Path(path).parent, True, dict(report or {})
        backend._open(Path(path), num_threads)
        return backend

    def _open(self, path: Path, num_threads: int | None) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixel_values: Any) -> np.ndarray:
        """(N, 3, S, S) float32 pixels, or a ``NaFlexBatch`` for NaFlex models -> pooled (N, D).
        Large pixel batches run in chunks (bounded memory: see ``base.CPU_CHUNK_TOKENS``)."""
        if isinstance(pixel_values, np.ndarray) and pixel_values.ndim == 4:
            step = rows_per_chunk(pixel_values.shape[2], pixel_values.shape[3], self.config.patch_size)
            if len(pixel_values) > step:
                return np.concatenate([self._run(pixel_values[start:start + step])
                                       for start in range(0, len(pixel_values), step)])
        return self._run(pixel_values)

    def _run(self, pixel_values: Any) -> np.ndarray:
        return self.session.run(None, named_inputs(self.config, pixel_values))[0]
