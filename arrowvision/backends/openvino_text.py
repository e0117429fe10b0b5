"""The text tower on OpenVINO: exported once to IR, cached, run without torch.

Same scheme as the image tower (``openvino_backend``): a cache entry keyed by the weights'
checksum, the text config, the precision, this module's export version and OpenVINO's version,
built under a lock by ``artifacts.build_entry``. Lossy precisions are validated against the fp32
torch reference on bundled sentences (plain captions and awkward strings) that are never used for
int8 calibration, and refused below ``min_cosine``. Loading a cached IR imports only openvino,
numpy and the tokenizer libraries.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model.text_config import TextConfig
from ..weights.format import WeightLoader
from .artifacts import build_entry, cache_root, hash_key, is_complete, read_meta, require_torch
from .openvino_backend import (_int8_saturates, _openvino, first_call_row_alone, inference_hint, mapped_weights, nncf_quantize,
                               unsupported_reason)
from .validation import DEFAULT_MIN_COSINE, recheck, validate_lossy

log = logging.getLogger("arrowvision")

EXPORT_VERSION = "1"  # bump when the exported text graph or its validation changes

# Validation sentences, by kind (never used for calibration).
VALIDATION_TEXTS = {
    "captions": [
        "a photo of a cat", "a dog running on the beach", "an astronaut in a white space suit",
        "a red sports car parked on the street", "a bowl of soup with a spoon", "two people riding bicycles",
        "a close-up of a yellow flower", "a city skyline at sunset", "a black and white photo of a train",
        "a child holding a balloon", "microscope image of cells", "a rocket on the launch pad",
    ],
    "awkward": [
        "A PHOTO OF A CAT!!!", "it's a dog's life, isn't it?", "café, naïve, résumé", "東京の夜景",
        "emoji 🐱🚀", "tabs\tand\nnewlines", "", "12345 67.89",
        "a very long caption " * 20,
    ],
}
# int8 calibration sentences: disjoint from the validation ones.
CALIBRATION_TEXTS = [
    "a photo of a horse", "a cup of coffee on a table", "a man with a camera", "a house with a garden",
    "a plate of food", "a bird on a branch", "a group of people at a concert", "a snowy mountain",
    "a boat on a lake", "a cat sleeping on a sofa", "a bus in the rain", "a painting of a woman",
    "A diagram with arrows.", "a sketch of a face", "a chart showing growth", "green leaves in sunlight",
]


def cache_key(weights: WeightLoader, precision: str) -> str:
    ov = _openvino()
    return hash_key({
        "weights": weights.checksum,
        "text_config": TextConfig.from_weights(weights).to_dict(),
        "precision": precision,
        "export_version": EXPORT_VERSION,
        "openvino": ov.__version__,
        "overflow_fix": _int8_saturates() if precision == "int8" else None,
    })


def export(weights: WeightLoader, tokenizer: Any, precision: str = "fp32", *, cache_dir: str | os.PathLike | None = None,
           min_cosine: float = DEFAULT_MIN_COSINE, force: bool = False) -> Path:
    """Export the text tower of ``weights`` to IR in the cache (if not there yet); return the entry."""
    reason = unsupported_reason(precision)
    if reason:
        raise BackendError(reason)
    key = cache_key(weights, precision)
    return build_entry(cache_root(cache_dir) / "ir-text", key,
                       lambda folder: _export_into(folder, weights, tokenizer, precision, min_cosine, key), force=force)


def _pooled(model: Any):
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids).pooled

    return Pooled(model).eval()


def _export_into(folder: Path, weights: WeightLoader, tokenizer: Any, precision: str, min_cosine: float, key: str) -> dict:
    ov = _openvino()
    torch = require_torch("OpenVINO text IR")
    from ..model.text import TextTransformer

    start = time.perf_counter()
    model = TextTransformer.from_weights(weights)
    example = torch.from_numpy(tokenizer(["a photo of a cat", "two dogs"]))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit.trace", DeprecationWarning)
        ov_model = ov.convert_model(_pooled(model), example_input=example, input=[(ov.PartialShape([-1, -1]), ov.Type.i64)])
    ov_model.inputs[0].get_tensor().set_names({"input_ids"})
    ov_model.outputs[0].get_tensor().set_names({"embedding"})
    meta: dict[str, Any] = {"format": "openvino", "tower": "text", "precision": precision, "key": key,
                            "weights_checksum": weights.checksum, "openvino": ov.__version__}
    if precision in ("int8-weights", "int8"):
        ov_model = _quantize(ov_model, precision, tokenizer, meta)
    xml = folder / "model.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=precision in ("fp16", "bf16"))
    ids = {kind: tokenizer(texts) for kind, texts in VALIDATION_TEXTS.items()}
    with torch.inference_mode():
        reference = {kind: model(torch.from_numpy(batch)).pooled.float().numpy() for kind, batch in ids.items()}
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": inference_hint(precision)})
    threshold = min_cosine if precision != "fp32" else max(min_cosine, 0.9999)  # fp32 is checked too: cheap
    meta.update(validate_lossy("openvino text", precision, lambda batch: compiled(batch)[0], ids, reference, threshold))
    meta["export_seconds"] = time.perf_counter() - start
    meta["text_config"] = model.config.to_dict()
    return meta


def _quantize(ov_model, precision: str, tokenizer: Any, meta: dict):
    return nncf_quantize(ov_model, precision, lambda: tokenizer(CALIBRATION_TEXTS), meta, "calibration_texts")


class OpenVINOTextBackend:
    """Runs the cached text IR on (N, L) int64 token ids; returns pooled (N, D) float32."""

    name = "openvino"

    def __init__(self, weights: WeightLoader, tokenizer: Any, device: str = "CPU", precision: str = "fp32",
                 cache_dir: str | os.PathLike | None = None, min_cosine: float = DEFAULT_MIN_COSINE,
                 num_threads: int | None = None):
        _openvino()  # a clear error when OpenVINO is missing
        reason = unsupported_reason(precision, device)
        if reason:  # before the cache, which may come from a machine with native bf16
            raise BackendError(reason)
        self.precision = precision
        self.entry = cache_root(cache_dir) / "ir-text" / cache_key(weights, precision)
        self.cache_hit = is_complete(self.entry)
        if not self.cache_hit:
            self.entry = export(weights, tokenizer, precision, cache_dir=cache_dir, min_cosine=min_cosine)
        self.report = read_meta(self.entry)
        recheck(self.report, min_cosine)
        self._compile(self.entry / "model.xml", device, num_threads, cache_root(cache_dir) / "compiled")

    @classmethod
    def from_ir(cls, xml: str | os.PathLike, precision: str, *, report: dict[str, Any] | None = None, device: str = "CPU",
                num_threads: int | None = None, compiled_dir: str | os.PathLike | None = None) -> OpenVINOTextBackend:
        """Run a text IR already exported and validated elsewhere (a bundle): no weights, no torch."""
        reason = unsupported_reason(precision, device)
        if reason:
            raise BackendError(reason)
        backend = cls.__new__(cls)
        backend.precision, backend.entry, backend.cache_hit, backend.report = precision, Path(xml).parent, True, dict(report or {})
        backend._compile(Path(xml), device, num_threads, compiled_dir)
        return backend

    def _compile(self, xml: Path, device: str, num_threads: int | None, compiled_dir: str | os.PathLike | None) -> None:
        core = _openvino().Core()
        if compiled_dir is not None:
            core.set_property({"CACHE_DIR": str(compiled_dir), "CACHE_MODE": "OPTIMIZE_SPEED"})
        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_hint(self.precision)}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.device = device.upper()
        try:
            self.compiled = core.compile_model(str(xml), self.device, properties)
        except RuntimeError as exc:
            reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
            raise BackendError(f"OpenVINO cannot compile the text tower for device {self.device!r}: {reason}") from None
        self.request = self.compiled.create_infer_request()
        self.mapped = mapped_weights(xml, compiled_dir)  # held once, as the image tower's

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        return first_call_row_alone(self._run, [np.ascontiguousarray(input_ids, dtype=np.int64)], self.mapped)

    def _run(self, inputs: list[np.ndarray]) -> np.ndarray:
        self.request.infer(inputs)
        return self.request.get_output_tensor(0).data.copy()
