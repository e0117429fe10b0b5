"""The CPU fast path: our ViT exported to OpenVINO IR, cached, run without torch.

Export (needs torch, once per model) converts our ``VisionTransformer`` with
``openvino.convert_model`` to an IR with a dynamic batch dimension and saves it in a cache
directory keyed by everything that changes the result: the weights' content checksum, the model
config, the precision (+ calibration set), this module's export version and OpenVINO's version.
Loading a cached IR imports only openvino, numpy and pyarrow; a large model's first export runs
in a child process (``export_child``), so that the serving process never imports torch.

Memory (SigLIP-B/16 fp32, /proc/self/smaps): OpenVINO maps the IR's ``model.bin`` (or its compiled
blob, ``ENABLE_MMAP``'s default) and its CPU plugin repacks every MatMul weight into anonymous
memory, about half at compile and the rest at the first inference, but keeps the mapping: 340 MB
mapped + 340 MB repacked, 1174 MB peak RSS through batch 32 (``benchmarks/latency.py``). The
pages read while repacking are released (``mapped_weights``) after compiling and after the first
inference, which runs on one row: 819 MB. Measured and not taken: ``ENABLE_MMAP=False`` (the
plugin then keeps a heap copy of the file: the same 1.1 GB), ``core.read_model`` + compile +
``del`` (the same: the compiled graph holds the constants).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model.config import VisionConfig
from ..util.memory import MappedWeights
from ..weights.format import WeightLoader
from .artifacts import build_entry, cache_root, hash_key, is_complete, pooled_module, read_meta, require_torch
from .base import PRECISIONS, BackendBase
from .cpu import cpu_info
from .export_child import export_entry
from .feeds import export_example, input_names, model_inputs, ov_input_shapes
from .validation import (
    DEFAULT_MIN_COSINE,
    calibration_fingerprint,
    calibration_pixels,
    heldout_pixels,
    recheck,
    reference_embeddings,
    validate_lossy,
)

log = logging.getLogger("arrowvision")

EXPORT_VERSION = "3"  # bump when the exported graph or its validation changes


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise BackendError("the openvino backend needs OpenVINO: pip install 'arrowvision' (or pip install openvino)") from None
    return ov


def inference_hint(precision: str) -> str:
    """OpenVINO's CPU compute precision for an export precision.

    f32 is explicit: on CPUs with AVX512-BF16/AMX OpenVINO otherwise computes in bf16 (cosine
    ~0.9999, not the 1e-4 agreement fp32 promises). ``bf16`` asks for exactly that, on purpose."""
    return "bf16" if precision == "bf16" else "f32"


def cpu_capabilities() -> list[str]:
    """OpenVINO's CPU plugin's view of what it can compute natively (FP32, INT8, BF16, FP16, ...)."""
    return list(_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def unsupported_reason(precision: str, device: str = "CPU") -> str | None:
    """Why ``precision`` cannot run here (naming the missing CPU feature), or None if it can."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}"
    if precision == "bf16" and device.upper() == "CPU":
        capabilities = cpu_capabilities()
        if "BF16" not in capabilities:
            return (f"precision bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one ({cpu_info().model}) "
                    f"offers {', '.join(capabilities)}: use fp32 or int8")
    return None


def _int8_saturates() -> bool:
    """u8 x s8 products saturate without VNNI/AMX: quantize with 7-bit weights there."""
    return not cpu_info().int8_vnni


def cache_key(weights: WeightLoader, precision: str, calibration: Sequence[Any] | None = None) -> str:
    ov = _openvino()
    return hash_key({
        "weights": weights.checksum,
        "config": VisionConfig.from_weights(weights).to_dict(),
        "precision": precision,
        "export_version": EXPORT_VERSION,
        "openvino": ov.__version__,
        "calibration": calibration_fingerprint(calibration) if precision == "int8" else None,
        "overflow_fix": _int8_saturates() if precision == "int8" else None,
    })


def export(
    weights: WeightLoader,
    precision: str = "fp32",
    *,
    cache_dir: str | os.PathLike | None = None,
    calibration: Sequence[Any] | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    force: bool = False,
) -> Path:
    """Export ``weights`` to IR in the cache (if not there yet); return the entry's folder.

    Safe when several processes export the same model at once: one does the work under a file
    lock, the result appears by an atomic rename of a finished folder."""
    reason = unsupported_reason(precision)
    if reason:
        raise BackendError(reason)
    key = cache_key(weights, precision, calibration)
    return build_entry(cache_root(cache_dir) / "ir", key,
                       lambda folder: _export_into(folder, weights, precision, calibration, min_cosine, key), force=force)


def _export_into(folder: Path, weights: WeightLoader, precision: str, calibration, min_cosine: float, key: str) -> dict:
    ov = _openvino()
    torch = require_torch("OpenVINO IR")
    from ..model.naflex import load_vision_tower

    start = time.perf_counter()
    model = load_vision_tower(weights)
    config = model.config
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks are constants per export
        warnings.filterwarnings("ignore", "`torch.jit.trace", DeprecationWarning)  # convert_model traces
        ov_model = ov.convert_model(pooled_module(model), example_input=export_example(config), input=ov_input_shapes(config))
    for port, name in zip(ov_model.inputs, input_names(config)):
        port.get_tensor().set_names({name})
    ov_model.outputs[0].get_tensor().set_names({"embedding"})

    meta: dict[str, Any] = {"format": "openvino", "precision": precision, "key": key, "weights_checksum": weights.checksum,
                            "openvino": ov.__version__}
    if precision in ("int8-weights", "int8"):
        ov_model = _quantize(ov_model, precision, config, calibration, meta)
    xml = folder / "model.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=precision in ("fp16", "bf16"))  # bf16: fp16 storage, bf16 compute
    if precision != "fp32":
        pixels = heldout_pixels(config)
        reference = reference_embeddings(model, pixels)
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": inference_hint(precision)})
        run = lambda batch: compiled(model_inputs(config, batch))[0]  # noqa: E731
        meta.update(validate_lossy("openvino", precision, run, pixels, reference, min_cosine))
    meta["export_seconds"] = time.perf_counter() - start
    meta["vision_config"] = config.to_dict()
    return meta


def _quantize(ov_model, precision: str, config: VisionConfig, calibration, meta: dict):
    # Picked by measurement on the held-out kinds (SigLIP-B/16, AVX2 + overflow fix, min cosine over
    # kinds): nncf defaults 0.988 (graphics/grayscale fail); MAP head and patch conv kept in fp32
    # (a few percent of the FLOPs) 0.988; plus SmoothQuant off 0.9994 (SmoothQuant alpha 0.5: 0.998).
    samples = (lambda: calibration_pixels(config, calibration)) if precision == "int8" else None
    return nncf_quantize(ov_model, precision, samples, meta, "calibration_images",
                         keep_fp32_patterns=[r".*\.head\..*"], keep_fp32_types=["Convolution"], smooth_quant=False,
                         feed=(lambda rows: model_inputs(config, rows)) if config.naflex else (lambda rows: rows))


def nncf_quantize(ov_model, precision: str, samples, meta: dict, count_key: str, *, keep_fp32_patterns=(),
                  keep_fp32_types=(), smooth_quant: bool = True, feed=lambda rows: rows):
    """int8-weights (weight compression) or int8 (PTQ on ``samples()``, a batch calibrated one row
    at a time) for either tower; 7-bit weights where u8 x s8 products saturate (no VNNI)."""
    try:
        import nncf
    except ImportError:
        raise BackendError(f"precision {precision} needs nncf: pip install 'arrowvision[quantize]'") from None
    logging.getLogger("nncf").setLevel(logging.WARNING)  # its INFO lines (one per ignored node) go to stdout
    if precision == "int8-weights":
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters, OverflowFix

    batch = samples()
    overflow_fix = OverflowFix.ENABLE if _int8_saturates() else OverflowFix.FIRST_LAYER
    meta.update({count_key: len(batch), "overflow_fix": overflow_fix.value})
    dataset = nncf.Dataset([feed(batch[i : i + 1]) for i in range(len(batch))])
    options: dict[str, Any] = {"overflow_fix": overflow_fix}
    if not smooth_quant:
        options["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=-1)
    ignored = None
    if keep_fp32_patterns or keep_fp32_types:
        ignored = nncf.IgnoredScope(patterns=list(keep_fp32_patterns), types=list(keep_fp32_types), validate=False)
    return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batch),
                         ignored_scope=ignored, advanced_parameters=AdvancedQuantizationParameters(**options))


def mapped_weights(xml: Path, compiled_dir: str | os.PathLike | None) -> MappedWeights:
    """What OpenVINO maps the weights from: the IR's ``.bin`` on a first compile, the compiled-cache
    blob after. Its CPU plugin repacks every MatMul weight into its own memory (part at compile,
    the rest at the first inference) yet keeps the mapping; releasing the mapping's resident
    pages then holds fp32 weights once (SigLIP-B/16 fp32 through batch 32: 1174 -> 819 MB
    peak RSS). ``ENABLE_MMAP=False`` does not help: the plugin then keeps a heap copy instead."""
    return MappedWeights([xml.with_suffix(".bin"), *([compiled_dir] if compiled_dir is not None else [])])


def first_call_row_alone(run: Any, inputs: list[np.ndarray], mapped: MappedWeights) -> np.ndarray:
    """``run(inputs)``, releasing the mapped weights after the first call. That call repacks the
    weights the plugin left for it, reading them from the mapping: it runs on the first row
    alone, before a large batch's activations exist (SigLIP-B/16 fp32, ``embed`` whose first
    call is a batch of 32: 1020 -> 892 MB peak RSS), at the cost of one batch-1 inference."""
    if not mapped.repacked and len(inputs[0]) > 1:
        head = run([part[:1] for part in inputs])
        mapped.after_call()
        return np.concatenate([head, run([part[1:] for part in inputs])])
    output = run(inputs)
    mapped.after_call()
    return output


class OpenVINOBackend(BackendBase):
    """Runs the cached IR. ``mode="latency"`` runs each batch as one inference request;
    ``mode="throughput"`` splits batches over OpenVINO's async infer queue (parallel streams)."""

    name = "openvino"

    def __init__(
        self,
        weights: WeightLoader,
        device: str = "CPU",
        precision: str = "fp32",
        mode: str = "latency",
        cache_dir: str | os.PathLike | None = None,
        calibration: Sequence[Any] | None = None,
        min_cosine: float = DEFAULT_MIN_COSINE,
        num_threads: int | None = None,
    ):
        _openvino()  # a clear error when OpenVINO is missing
        if mode not in ("latency", "throughput"):
            raise BackendError(f"unknown mode {mode!r}; choose latency or throughput")
        reason = unsupported_reason(precision, device)
        if reason:  # before the cache: a cache shared between machines may hold a bf16 IR this CPU cannot run
            raise BackendError(reason)
        self.config = VisionConfig.from_weights(weights)
        self.precision = precision
        self.mode = mode
        self.entry = cache_root(cache_dir) / "ir" / cache_key(weights, precision, calibration)
        self.cache_hit = is_complete(self.entry)
        if not self.cache_hit:  # export validates the precision and re-checks under its lock
            self.entry = export_entry(f"{__name__}:export", weights, precision=precision, cache_dir=cache_dir,
                                      calibration=calibration, min_cosine=min_cosine)
        self.report = read_meta(self.entry)
        recheck(self.report, min_cosine)
        self._compile(self.entry / "model.xml", device, mode, num_threads, cache_root(cache_dir) / "compiled")

    @classmethod
    def from_ir(cls, xml: str | os.PathLike, config: VisionConfig, precision: str, *, report: dict[str, Any] | None = None,
                device: str = "CPU", mode: str = "latency", num_threads: int | None = None,
                compiled_dir: str | os.PathLike | None = None) -> OpenVINOBackend:
        """Run an IR already exported and validated elsewhere (a bundle): no weights, no cache
        key, no torch. ``compiled_dir``: OpenVINO's compiled-model cache (None: none)."""
        if mode not in ("latency", "throughput"):
            raise BackendError(f"unknown mode {mode!r}; choose latency or throughput")
        reason = unsupported_reason(precision, device)
        if reason:
            raise BackendError(reason)
        backend = cls.__new__(cls)
        backend.config, backend.precision, backend.mode = config, precision, mode
        backend.entry, backend.cache_hit, backend.report = Path(xml).parent, True, dict(report or {})
        backend._compile(Path(xml), device, mode, num_threads, compiled_dir)
        return backend

    def _compile(self, xml: Path, device: str, mode: str, num_threads: int | None, compiled_dir: str | os.PathLike | None) -> None:
        ov = _openvino()
        core = ov.Core()
        # OPTIMIZE_SPEED: the compiled blob holds the weights too (a second copy on disk), but loading
        # it cost half the CPU time of OPTIMIZE_SIZE on an AVX2 Zen 3 (0.53 vs 1.12 CPU-s for
        # SigLIP-B), the largest single item of the cold start there.
        if compiled_dir is not None:
            core.set_property({"CACHE_DIR": str(compiled_dir), "CACHE_MODE": "OPTIMIZE_SPEED"})
        properties: dict[str, Any] = {"PERFORMANCE_HINT": mode.upper(), "INFERENCE_PRECISION_HINT": inference_hint(self.precision)}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.device = device.upper()
        try:
            self.compiled = core.compile_model(str(xml), self.device, properties)
        except RuntimeError as exc:
            reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
            raise BackendError(
                f"OpenVINO cannot compile for device {self.device!r} (available: {', '.join(core.available_devices)}): {reason}"
            ) from None
        self.request = self.compiled.create_infer_request()
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.mapped = mapped_weights(xml, compiled_dir)

    def __call__(self, pixel_values: Any) -> np.ndarray:
        """(N, 3, S, S) float32 pixels, or a ``NaFlexBatch`` for NaFlex models -> pooled (N, D)."""
        return first_call_row_alone(self._run, model_inputs(self.config, pixel_values), self.mapped)

    def _run(self, inputs: list[np.ndarray]) -> np.ndarray:
        if self.mode == "latency" or self.streams <= 1 or len(inputs[0]) < 2:
            self.request.infer(inputs)
            return self.request.get_output_tensor(0).data.copy()
        return self._run_async(inputs)

    def _run_async(self, inputs: list[np.ndarray]) -> np.ndarray:
        ov = _openvino()
        bounds = np.array_split(np.arange(len(inputs[0])), min(self.streams, len(inputs[0])))
        chunks = [[part[rows[0] : rows[-1] + 1] for part in inputs] for rows in bounds]
        results: list[np.ndarray | None] = [None] * len(chunks)

        def done(request, index):
            results[index] = request.get_output_tensor(0).data.copy()

        queue = ov.AsyncInferQueue(self.compiled, len(chunks))
        queue.set_callback(done)
        for index, chunk in enumerate(chunks):
            queue.start_async(chunk, index)
        queue.wait_all()
        return np.concatenate(results)

    def inference_threads(self) -> int | None:
        """The thread count the compiled model really uses (None if the plugin does not say)."""
        try:
            return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # noqa: BLE001 - a plugin without the property: unknown
            return None
