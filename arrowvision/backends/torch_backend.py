"""The reference backend: our PyTorch VisionTransformer on the zero-copy Parquet tensors.

It runs on the CPU or a CUDA GPU in fp32, bf16 or fp16. Half precisions are lossy, so they are
validated like OpenVINO's (min cosine vs the fp32 reference on the held-out kinds, see
``validation``) once per weights/precision/device kind, remembered in the artifact cache.

Besides float32 pixels it takes uint8 (N, S, S, 3) batches, as the decoders produce them: 4x
fewer bytes cross to the device (through pinned memory, on a side stream, so the copy of the next
batch overlaps the current model call) and normalization runs there, in the model's dtype, as a
lookup in the preprocessor's exact table (fp32 stays bit-identical to the HF image processor).

On CUDA the model runs as CUDA graphs (one launch per batch) or, with ``compile=True``, through
``torch.compile`` (whose artifacts are kept across processes in our cache, see ``compile_cache``);
both run fixed batch shapes (see ``_run``). ``fused=True`` runs a copy of the model with fewer,
larger kernels (``model.fused``). Figures in docs/GPU.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BackendError
from ..weights.format import WeightLoader
from .base import BackendBase, rows_per_chunk

HALF_PRECISIONS = ("bf16", "fp16")
MAX_FIXED_BATCH = 1024  # larger batches run eagerly (no compile / graph of that size)
TORCH_PRECISIONS = ("fp32", *HALF_PRECISIONS)
log = logging.getLogger("arrowvision")
_validated: dict[str, dict[str, Any]] = {}  # key -> accuracy report, for this process


def import_torch():
    """torch, or a BackendError saying how to install the CPU build."""
    try:
        import torch
    except ImportError:
        raise BackendError("the torch backend needs PyTorch: pip install torch==2.13.0") from None
    return torch


def torch_device(torch: Any, device: str) -> Any:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA that is not there is a clear error, not a crash later."""
    name = str(device).lower()
    if name != "cpu" and not name.startswith("cuda"):
        raise BackendError(f"device {device!r}: the torch backend runs on cpu or cuda[:N]")
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise BackendError(f"device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r}: CUDA is not available to this PyTorch "
                               f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def default_precision(torch: Any, device: Any) -> str:
    """fp32 on the CPU; on a GPU bf16 where it is supported, else fp16."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@dataclass
class Staged:
    """A uint8 (N, 3, S, S) batch on the model's device, ready once ``ready`` (a CUDA event) fires."""

    pixels: Any
    ready: Any = None
    rows: int = 0  # real rows; the rest is padding up to a compiled shape


class Pending:
    """One launched model call: ``result()`` waits for it and returns float32 numpy (N, D).

    ``seconds`` is the model's own time: on CUDA the GPU time between events recorded around the
    call on its stream (not the launching thread's wall time, which the GIL can stretch)."""

    def __init__(self, output: Any, rows: int, events: tuple[Any, Any] | None, seconds: float = 0.0):
        self.output, self.rows, self.events, self.seconds = output, rows, events, seconds

    def result(self) -> np.ndarray:
        if self.events is not None:
            self.events[1].synchronize()
            self.seconds = self.events[0].elapsed_time(self.events[1]) / 1000.0
        return self.output.numpy()[: self.rows]


class TorchBackend(BackendBase):
    name = "torch"
    accepts_uint8 = True  # the pipeline may hand it decoded uint8 (N, S, S, 3) batches

    def __init__(self, weights: WeightLoader, device: str = "cpu", precision: str | None = None, *,
                 compile: bool = False, cuda_graphs: bool | None = None, fused: bool = False,
                 min_cosine: float | None = None, cache_dir: str | os.PathLike | None = None):
        self.torch = torch = import_torch()  # before ..model, which imports torch
        from ..model.vision import VisionTransformer

        self.device = torch_device(torch, device)
        self.precision = precision or default_precision(torch, self.device)
        if self.precision not in TORCH_PRECISIONS:
            raise BackendError(f"precision {self.precision!r} is not available on the torch backend; "
                               f"choose from {', '.join(TORCH_PRECISIONS)}")
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BackendError(f"bf16 is not supported on {torch.cuda.get_device_name(self.device)}; use fp16")
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.model = VisionTransformer.from_weights(weights, dtype=self.dtype).to(self.device)
        self.config = self.model.config
        self.fused = bool(fused)
        if self.fused:  # before validation: what is validated is what runs
            from ..model.fused import fuse_for_inference

            fuse_for_inference(self.model)
        self.report: dict[str, Any] = {}
        if self.precision in HALF_PRECISIONS:
            from .validation import DEFAULT_MIN_COSINE

            self.report = validated_report(self, weights, DEFAULT_MIN_COSINE if min_cosine is None else min_cosine, cache_dir)
        from ..inputs.preprocess import Preprocessor

        lut = Preprocessor.from_config(self.config).lut  # (3, 256) exact float32 normalization table
        self.lut = torch.from_numpy(lut.reshape(-1).copy()).to(self.device, self.dtype)
        self.channel_offsets = torch.arange(3, dtype=torch.int32, device=self.device).view(1, 3, 1, 1) * 256
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.compiled = compile
        self.compile_cache = self._open_compile_cache(weights, cache_dir) if compile else None
        self.forward = self._compiled_forward() if compile else self._forward
        # CUDA graphs (eager on CUDA unless told not to; of the compiled model when asked): one launch
        # per batch instead of hundreds, so batch 1 is not bound by Python launch overhead and a busy
        # GIL cannot stretch a batch
        use_graphs = self.cuda and (not compile if cuda_graphs is None else bool(cuda_graphs))
        self.graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] | None = {} if use_graphs else None
        self.graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.graph_lock = threading.Lock()
        self.fixed_sizes: set[tuple[int, tuple[int, ...]]] = set()  # (batch, image shape) compiled or captured

    # -- float32 pixels (the Backend protocol) -----------------------------------------------

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self.device)
            return self._run(pixels.to(self.dtype)).float().cpu().numpy()[: len(pixel_values)]

    # -- uint8 batches: stage (copy to the device) then launch ---------------------------------

    def stage(self, pixels: Any) -> Staged:
        """uint8 (N, S, S, 3) numpy (or (N, 3, S, S) torch on the device, from a GPU decoder) ->
        a device batch. On CUDA the copy goes through pinned memory on a side stream, so a
        decoding thread can stage the next batch while the model runs on this one."""
        torch = self.torch
        with torch.inference_mode():
            if isinstance(pixels, np.ndarray):
                if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
                    raise BackendError(f"expected uint8 (N, S, S, 3) pixels, got {pixels.dtype} {pixels.shape}")
                host = torch.from_numpy(pixels)
                if not self.cuda:  # a copy (the caller's buffer is reused), laid out as the float32 path
                    return Staged(host.permute(0, 3, 1, 2).contiguous(), None, len(pixels))
                pinned = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)  # cached by torch's host allocator
                pinned.copy_(host)
                with torch.cuda.stream(self.copy_stream):
                    device_pixels = pinned.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
                    ready = torch.cuda.Event()
                    ready.record(self.copy_stream)
                return Staged(device_pixels, ready, len(pixels))
            ready = None
            if self.cuda and pixels.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(pixels.device))
            return Staged(pixels.to(self.device), ready, len(pixels))

    def launch(self, staged: Staged) -> Pending:
        """Normalize on the device in the model's dtype and launch the model; returns at once on
        CUDA (the result is copied back asynchronously), so the caller can stage the next batch."""
        torch = self.torch
        with torch.inference_mode():
            if not self.cuda:
                tick = time.perf_counter()
                output = self._run(self.normalize(staged.pixels)).float()
                return Pending(output, staged.rows, None, time.perf_counter() - tick)
            stream = torch.cuda.current_stream(self.device)
            if staged.ready is not None:
                stream.wait_event(staged.ready)
            staged.pixels.record_stream(stream)  # made on another stream: keep it alive for this one
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            output = self._run(self.normalize(staged.pixels)).float()
            host = torch.empty(output.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(output, non_blocking=True)
            end.record(stream)
            return Pending(host, staged.rows, (start, end))

    def embed_uint8(self, pixels: Any) -> np.ndarray:
        """uint8 (N, S, S, 3) -> pooled float32 (N, D): stage, launch, wait."""
        return self.launch(self.stage(pixels)).result()

    def normalize(self, pixels: Any) -> Any:
        """uint8 (N, 3, S, S) on the device -> the model's dtype, through the exact (3, 256) table."""
        return self.lut[pixels.contiguous().to(self.torch.int32) + self.channel_offsets]  # NCHW, as the float path

    # -- the model ----------------------------------------------------------------------------

    def _forward(self, pixels: Any) -> Any:
        return self.model(pixels).pooled

    def _eager(self, pixels: Any) -> Any:
        """On the CPU, in chunks of ~CPU_CHUNK_TOKENS tokens (bounded memory, same speed)."""
        rows = pixels.shape[0]
        step = rows_per_chunk(pixels.shape[-2], pixels.shape[-1], self.config.patch_size)
        if self.cuda or rows <= step:
            return self._forward(pixels)
        return self.torch.cat([self._forward(pixels[start:start + step]) for start in range(0, rows, step)])

    def _compiled_forward(self):
        torch = self.torch
        try:
            return torch.compile(self._forward, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - e.g. no C compiler / triton: say so
            raise BackendError(f"torch.compile is not usable here ({type(exc).__name__}: {exc}); run without compile") from None

    def _open_compile_cache(self, weights: WeightLoader, cache_dir: str | os.PathLike | None):
        """This model's torch.compile artifacts from earlier processes, hot-loaded (see compile_cache)."""
        from .compile_cache import CompileCache, key_parts

        parts = key_parts(self.torch, weights.checksum, self.config.to_dict(), self.precision, self.device,
                          {"fused": self.fused, "dynamic": False})
        cache = CompileCache.open(self.torch, parts, cache_dir)
        if cache.load():
            log.info("torch.compile artifacts loaded from %s", cache.path)
        return cache

    def _run(self, pixels: Any) -> Any:
        """The pooled output. Compiled and CUDA-graphed models run fixed shapes: a batch is padded
        with zeros to the smallest size already compiled / captured that holds it (the last, short
        batch of a run reuses the full batches' one), else to the next power of two: a handful
        of compilations per model, never one per batch."""
        rows = pixels.shape[0]
        if not (self.compiled or self.graphs is not None) or rows > MAX_FIXED_BATCH:
            return self._eager(pixels)
        image_shape = tuple(pixels.shape[1:])
        known = [size for size, shape in self.fixed_sizes if shape == image_shape and size >= rows]
        size = min(known) if known else 1 << max(0, rows - 1).bit_length()
        new_shape = (size, image_shape) not in self.fixed_sizes
        self.fixed_sizes.add((size, image_shape))
        if size != rows:
            pixels = self.torch.cat([pixels, pixels.new_zeros((size - rows, *pixels.shape[1:]))])
        try:
            output = self._graphed(pixels) if self.graphs is not None else self.forward(pixels)
        except Exception as exc:  # a first call compiles: a missing C++ compiler / Triton fails deep in torch
            if not (new_shape and self.compiled):
                raise
            self.fixed_sizes.discard((size, image_shape))
            raise BackendError(f"torch.compile failed on the first batch of shape {tuple(pixels.shape)} "
                               f"({type(exc).__name__}: {exc}); run without compile") from None
        if new_shape and self.compile_cache is not None:  # this call compiled (or found) a new shape
            self.compile_cache.save()
        return output[:rows]

    def _graphed(self, pixels: Any) -> Any:
        with self.graph_lock:
            key = tuple(pixels.shape)
            entry = self.graphs.get(key) if self.graphs is not None else None
            if entry is None:
                try:
                    entry = self._capture(key)
                except Exception as exc:  # noqa: BLE001 - graphs are an optimization: run eagerly instead
                    log.warning("CUDA graph capture failed (%s: %s); running the model eagerly", type(exc).__name__, exc)
                    self.graphs = None
                    return self.forward(pixels)
                self.graphs[key] = entry
            graph, static_input, static_output = entry
            static_input.copy_(pixels)
            graph.replay()
            return static_output.clone()  # the next replay overwrites static_output

    def _capture(self, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
        torch = self.torch
        static_input = torch.zeros(shape, dtype=self.dtype, device=self.device)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS / cuDNN workspaces, autotuning, compiling)
            for _ in range(2):
                self.forward(static_input)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):  # other threads keep copying
            static_output = self.forward(static_input)
        return graph, static_input, static_output


# ---------------------------------------------------------------------------- validation


def _cache_file(key: str, cache_dir: str | os.PathLike | None):
    try:
        from .artifacts import cache_root

        return cache_root(cache_dir) / "torch" / f"{key}.json"
    except ImportError:  # platformdirs missing (a bare GPU box): validate once per process only
        return None


def validated_report(backend: Any, weights: WeightLoader, min_cosine: float,
                     cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Min cosine per held-out kind of this half-precision model vs the fp32 reference, measured
    on the same device; refused below ``min_cosine``. Measured once per weights, precision,
    device kind and torch version, then read from the artifact cache."""
    from .artifacts import hash_key
    from .validation import recheck

    torch = backend.torch
    kind = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else "cpu"
    parts = {"weights": weights.checksum, "precision": backend.precision, "device": kind, "torch": torch.__version__,
             "version": 1}
    if getattr(backend, "fused", False):  # only then: the unfused models' cached reports keep their keys
        parts["variant"] = "fused"
    key = hash_key(parts)
    report = _validated.get(key)
    path = _cache_file(key, cache_dir)
    if report is None and path is not None and path.exists():
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = None
    if report is None:
        report = _measure(backend, weights, min_cosine)
    else:
        recheck(report, min_cosine)
    if path is not None and not path.exists():  # also when this process measured it for another cache folder
        _write_json(path, report)
    _validated[key] = report
    return report


def _measure(backend: Any, weights: WeightLoader, min_cosine: float) -> dict[str, Any]:
    """``backend``: a TorchBackend or a NaFlexTorchBackend (its ``model``, ``dtype``, ``device``)."""
    from ..model.naflex import load_vision_tower
    from .feeds import torch_inputs
    from .validation import heldout_pixels, validate_lossy

    torch = backend.torch
    config = backend.config
    pixels = heldout_pixels(config)
    reference_model = load_vision_tower(weights, dtype=torch.float32).to(backend.device)
    with torch.inference_mode():
        reference = {kind: reference_model(*torch_inputs(config, batch, backend.device)).pooled.float().cpu().numpy()
                     for kind, batch in pixels.items()}
    del reference_model

    def run(batch: Any) -> np.ndarray:
        inputs = [t.to(backend.dtype) if t.is_floating_point() else t for t in torch_inputs(config, batch, backend.device)]
        with torch.inference_mode():
            return backend.model(*inputs).pooled.float().cpu().numpy()

    report = validate_lossy("torch", backend.precision, run, pixels, reference, min_cosine)
    return {"precision": backend.precision, **report}


def _write_json(path, document: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a re-measure next time
        log.debug("cannot cache the torch validation report at %s: %s", path, exc)
