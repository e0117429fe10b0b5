"""The CPU fast path: our ViT exported to OpenVINO IR, cached, run without torch.

Export (needs torch, once per model) converts our ``VisionTransformer`` with
``openvino.convert_model`` to an IR with a dynamic batch dimension and saves it in a cache
directory keyed by everything that changes the result: the weights' content checksum, the model
config, the precision (+ calibration set), this module's export version and OpenVINO's version.
Loading a cached IR imports only openvino, numpy and pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VisionConfig
from ..encoder import row_cosines
from ..errors import BackendError
from ..format import WeightLoader
from . import PRECISIONS

log = logging.getLogger("arrowvision")

EXPORT_VERSION = "1"  # bump when the exported graph changes
DEFAULT_MIN_COSINE = 0.99
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"


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


def _check_bf16(ov, device: str = "CPU") -> None:
    capabilities = ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise BackendError(f"precision bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one offers "
                           f"{', '.join(capabilities)}: use fp32 or int8")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """$ARROWVISION_CACHE, else the user's cache dir (e.g. ~/.cache/arrowvision)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("ARROWVISION_CACHE"):
        return Path(os.environ["ARROWVISION_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("arrowvision"))


def calibration_fingerprint(images: Sequence[Any] | None) -> str:
    if not images:
        return "bundled-samples"
    digest = hashlib.sha256()
    for image in images:
        digest.update(Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else np.asarray(image).tobytes())
    return digest.hexdigest()[:16]


def cache_key(weights: WeightLoader, precision: str, calibration: Sequence[Any] | None = None) -> str:
    ov = _openvino()
    parts = {
        "weights": weights.checksum,
        "config": VisionConfig.from_weights(weights).to_dict(),
        "precision": precision,
        "export_version": EXPORT_VERSION,
        "openvino": ov.__version__,
        "calibration": calibration_fingerprint(calibration) if precision == "int8" else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _validation_pixels(config: VisionConfig, images: Sequence[Any] | None) -> np.ndarray:
    from ..preprocess import Preprocessor

    sources = list(images) if images else sorted(SAMPLES_DIR.glob("*.jpg"))
    if not sources:
        raise BackendError("no calibration images given and no bundled samples found")
    return Preprocessor.from_config(config).batch(sources)


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
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    from filelock import FileLock

    root = cache_root(cache_dir) / "ir"
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(weights, precision, calibration)
    entry = root / key
    with FileLock(str(root / f"{key}.lock")):
        if (entry / "meta.json").exists() and not force:
            return entry
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            _export_into(staging, weights, precision, calibration, min_cosine, key)
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry


def _export_into(folder: Path, weights: WeightLoader, precision: str, calibration, min_cosine: float, key: str) -> None:
    ov = _openvino()
    try:
        import torch
    except ImportError:
        raise BackendError(
            "the OpenVINO IR for this model is not cached yet and exporting it needs PyTorch: "
            "pip install torch==2.13.0 (or run `arrowvision export` where torch is installed and share the cache)"
        ) from None
    from ..model import VisionTransformer

    start = time.perf_counter()
    model = VisionTransformer.from_weights(weights)
    config = model.config

    class Pooled(torch.nn.Module):  # the IR returns only what encode() needs
        def __init__(self, inner: VisionTransformer):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values).pooled

    size = config.image_size
    example = torch.zeros(2, 3, size, size)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks are constants per export
        warnings.filterwarnings("ignore", "`torch.jit.trace", DeprecationWarning)  # convert_model traces
        ov_model = ov.convert_model(Pooled(model).eval(), example_input=example, input=[ov.PartialShape([-1, 3, size, size])])
    ov_model.inputs[0].get_tensor().set_names({"pixel_values"})
    ov_model.outputs[0].get_tensor().set_names({"embedding"})

    report: dict[str, Any] = {"precision": precision, "key": key, "weights_checksum": weights.checksum, "openvino": ov.__version__}
    pixels = _validation_pixels(config, calibration) if precision != "fp32" else None
    if precision == "bf16":
        _check_bf16(ov)
    if precision in ("int8-weights", "int8"):
        try:
            import nncf
        except ImportError:
            raise BackendError(f"precision {precision} needs nncf: pip install 'arrowvision[quantize]'") from None
        if precision == "int8-weights":
            ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            dataset = nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))])
            ov_model = nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels))
    xml = folder / "model.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=precision in ("fp16", "bf16"))  # bf16: fp16 storage, bf16 compute
    if pixels is not None:
        with torch.inference_mode():
            reference = model(torch.from_numpy(pixels)).pooled.numpy()
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": inference_hint(precision)})
        candidate = compiled(pixels)[0]
        cosines = row_cosines(reference, candidate)
        report.update({"validation_images": len(pixels), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())})
        log.warning("%s export: cosine vs fp32 torch reference min %.5f mean %.5f on %d images",
                    precision, cosines.min(), cosines.mean(), len(pixels))
        if cosines.min() < min_cosine:
            raise BackendError(
                f"{precision} export is too inaccurate: min cosine {cosines.min():.4f} < threshold {min_cosine} "
                "vs the fp32 reference (lower min_cosine to accept it, or use fp32/fp16)"
            )
    report["export_seconds"] = time.perf_counter() - start
    report["vision_config"] = config.to_dict()
    (folder / "meta.json").write_text(json.dumps(report, indent=2))  # written last: marks completion


class OpenVINOBackend:
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
        ov = _openvino()
        if mode not in ("latency", "throughput"):
            raise BackendError(f"unknown mode {mode!r}; choose latency or throughput")
        self.config = VisionConfig.from_weights(weights)
        self.precision = precision
        self.mode = mode
        self.entry = cache_root(cache_dir) / "ir" / cache_key(weights, precision, calibration)
        self.cache_hit = (self.entry / "meta.json").exists()
        if not self.cache_hit:  # export validates the precision and re-checks under its lock
            self.entry = export(weights, precision, cache_dir=cache_dir, calibration=calibration, min_cosine=min_cosine)
        self.report = json.loads((self.entry / "meta.json").read_text())
        core = ov.Core()
        # OPTIMIZE_SIZE: the compiled cache keeps the graph only and maps weights from our IR .bin,
        # so the model is not stored twice on disk (measured: same load time as OPTIMIZE_SPEED).
        core.set_property({"CACHE_DIR": str(cache_root(cache_dir) / "compiled"), "CACHE_MODE": "OPTIMIZE_SIZE"})
        properties: dict[str, Any] = {"PERFORMANCE_HINT": mode.upper(), "INFERENCE_PRECISION_HINT": inference_hint(precision)}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        self.device = device.upper()
        try:
            self.compiled = core.compile_model(str(self.entry / "model.xml"), self.device, properties)
        except RuntimeError as exc:
            reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
            raise BackendError(
                f"OpenVINO cannot compile for device {self.device!r} (available: {', '.join(core.available_devices)}): {reason}"
            ) from None
        self.request = self.compiled.create_infer_request()
        self.streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.mode == "latency" or self.streams <= 1 or len(pixels) < 2:
            self.request.infer({0: pixels})
            return self.request.get_output_tensor(0).data.copy()
        return self._run_async(pixels)

    def _run_async(self, pixels: np.ndarray) -> np.ndarray:
        ov = _openvino()
        chunks = np.array_split(pixels, min(self.streams, len(pixels)))
        results: list[np.ndarray | None] = [None] * len(chunks)

        def done(request, index):
            results[index] = request.get_output_tensor(0).data.copy()

        queue = ov.AsyncInferQueue(self.compiled, len(chunks))
        queue.set_callback(done)
        for index, chunk in enumerate(chunks):
            queue.start_async({0: chunk}, index)
        queue.wait_all()
        return np.concatenate(results)
