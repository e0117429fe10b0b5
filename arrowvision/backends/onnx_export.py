"""ONNX artifact: our ViT exported with ``torch.onnx`` (fp32) and quantized by ONNX Runtime (int8).

The portable artifact for other runtimes (ONNX Runtime, tract, WebAssembly) and the model the
``onnxruntime`` backend runs. Entries live in the artifact cache under ``onnx/<key>/model.onnx``,
keyed like the OpenVINO IR. Validation: fp32 must match our torch reference to max abs 1e-4 on
the held-out images; int8 must reach ``min_cosine`` on every held-out kind.

int8 is dynamic quantization of the MatMuls (per-channel int8 weights, activations quantized per
call). CPUs without VNNI compute u8 x s8 products with a saturating int16 intermediate, so there
the weights use 7 bits (``reduce_range``); ``portable=True`` (bundles, which may run on any CPU)
uses 7 bits everywhere: a VNNI machine runs them as fast and loses ~1e-4 of cosine, while 8-bit
weights made on a VNNI machine fall to ~0.91 on an AVX2 one (SigLIP-B/16, held-out graphics). The MAP head and the patch convolution stay fp32: they
are a few percent of the FLOPs and where int8 error showed most on held-out graphics/grayscale.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model.config import VisionConfig
from ..weights.format import WeightLoader
from .artifacts import build_entry, cache_root, hash_key, pooled_module, require_torch
from .cpu import cpu_info
from .feeds import export_example, input_names, named_inputs, onnx_dynamic_axes
from .validation import DEFAULT_MIN_COSINE, heldout_pixels, reference_embeddings, validate_lossy

log = logging.getLogger("arrowvision")

ONNX_PRECISIONS = ("fp32", "int8")
EXPORT_VERSION = "1"
OPSET = 17
FP32_MAX_ABS = 1e-4


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime") from None
    return onnxruntime


def seven_bit_weights(portable: bool = False) -> bool:
    """Whether int8 weights use 7 bits: where this CPU's u8 x s8 products saturate, or everywhere
    when the model must also run on such CPUs."""
    return portable or not cpu_info().int8_vnni


def cache_key(weights: WeightLoader, precision: str, portable: bool = False) -> str:
    ort = _onnxruntime()
    return hash_key({
        "weights": weights.checksum,
        "config": VisionConfig.from_weights(weights).to_dict(),
        "precision": precision,
        "export_version": EXPORT_VERSION,
        "opset": OPSET,
        "onnxruntime": ort.__version__,  # its quantizer writes the int8 graph
        "reduce_range": seven_bit_weights(portable) if precision == "int8" else None,
    })


def export_onnx(
    weights: WeightLoader,
    precision: str = "fp32",
    *,
    cache_dir: str | os.PathLike | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
    force: bool = False,
    portable: bool = False,
) -> Path:
    """Export (or find) the validated ONNX model for ``weights`` in the cache; return its folder.
    ``portable``: int8 weights that hold on every CPU kind (7-bit), for artifacts that travel."""
    if precision not in ONNX_PRECISIONS:
        raise BackendError(f"precision {precision!r} is not available as ONNX; choose from {', '.join(ONNX_PRECISIONS)}")
    key = cache_key(weights, precision, portable)
    return build_entry(cache_root(cache_dir) / "onnx", key,
                       lambda folder: _export_into(folder, weights, precision, min_cosine, key, portable), force=force)


def save_onnx(weights: WeightLoader, output: str | os.PathLike, precision: str = "fp32", **options: Any) -> dict[str, Any]:
    """``arrowvision export --format onnx``: the validated model copied to ``output`` (atomically)."""
    from ..util.fsutil import atomic_output
    from .artifacts import read_meta

    entry = export_onnx(weights, precision, **options)
    with atomic_output(Path(output)) as staging:
        shutil.copyfile(entry / "model.onnx", staging)
    return read_meta(entry)


def _export_into(folder: Path, weights: WeightLoader, precision: str, min_cosine: float, key: str,
                 portable: bool = False) -> dict[str, Any]:
    torch = require_torch("ONNX model")
    ort = _onnxruntime()
    from ..model.naflex import load_vision_tower

    start = time.perf_counter()
    model = load_vision_tower(weights)
    config = model.config
    fp32_path = folder / ("model.onnx" if precision == "fp32" else "fp32.onnx")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about constant shape checks
        torch.onnx.export(
            pooled_module(model), export_example(config), str(fp32_path), input_names=list(input_names(config)),
            output_names=["embedding"], dynamic_axes=onnx_dynamic_axes(config), opset_version=OPSET, dynamo=False,
        )
    meta: dict[str, Any] = {"format": "onnx", "precision": precision, "key": key, "weights_checksum": weights.checksum,
                            "onnxruntime": ort.__version__, "opset": OPSET}
    if precision == "int8":
        meta["reduce_range"] = _quantize(fp32_path, folder / "model.onnx", seven_bit_weights(portable))
        fp32_path.unlink()
    pixels = heldout_pixels(config)
    reference = reference_embeddings(model, pixels)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    run = lambda batch: session.run(None, named_inputs(config, batch))[0]  # noqa: E731
    if precision == "fp32":
        max_abs = max(float(np.abs(run(batch) - reference[kind]).max()) for kind, batch in pixels.items())
        meta["max_abs"] = max_abs
        if max_abs > FP32_MAX_ABS:
            raise BackendError(f"ONNX fp32 export differs from the torch reference by {max_abs:.2e} > {FP32_MAX_ABS}")
    else:
        meta.update(validate_lossy("onnx", precision, run, pixels, reference, min_cosine))
    meta["export_seconds"] = time.perf_counter() - start
    meta["vision_config"] = config.to_dict()
    return meta


def optimized_path(entry: Path) -> Path:
    """Where ``runtime_model`` keeps an entry's optimized graph: beside the entries, not in one,
    so bundles (which copy an entry's files) ship only the portable ``model.onnx``."""
    return entry.parent.parent / "onnx-optimized" / f"{entry.name}.onnx"


def runtime_model(entry: Path, precision: str) -> Path:
    """The file the onnxruntime backend loads from a cache entry: for int8, the graph after ONNX
    Runtime's extended (CPU, not ISA-specific) fusions, saved once under the entry's key.

    Redoing those fusions at every session start cost 0.59 vs 0.35 s of session start under AVX2
    emulation (same run speed; fresh-process cold start 1.52 -> 1.46 s, median of 6 at load 5,
    SigLIP-B/16). ``model.onnx``
    stays the portable artifact that ``export`` hands out. A cache that cannot be written to
    just loads ``model.onnx``."""
    source = entry / "model.onnx"
    if precision != "int8":
        return source
    optimized = optimized_path(entry)
    if optimized.exists():
        return optimized
    ort = _onnxruntime()
    staging = optimized.with_name(f".{entry.name}.{os.getpid()}.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # ORT_ENABLE_ALL would bake in this ISA
    options.optimized_model_filepath = str(staging)
    options.log_severity_level = 3
    try:
        optimized.parent.mkdir(exist_ok=True)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        os.replace(staging, optimized)
    except (OSError, RuntimeError) as exc:  # read-only cache, full disk: the plain model runs the same
        log.debug("onnx: not saving the optimized graph of %s: %s", entry, exc)
        staging.unlink(missing_ok=True)
        return source
    return optimized


def _quantize(source: Path, target: Path, reduce_range: bool) -> bool:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source), load_external_data=False).graph
    keep_fp32 = [node.name for node in graph.node  # NaFlex's patch embedding is a MatMul: fp32 like the patch conv
                 if node.op_type == "MatMul" and ("/head/" in node.name or "/patch_embedding/" in node.name)]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs generic "run pre-processing" advice on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32)
    finally:
        root.setLevel(level)
    return reduce_range
