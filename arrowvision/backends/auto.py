"""``backend="auto"``: the fastest validated (backend, precision) for this model on this CPU.

On first use for a model on a kind of CPU, each candidate is exported (validated on the held-out
set at ``min_cosine``, every kind including sketches, so the choice also holds for ``--sketch``
use), timed briefly at batch 1 and batch 8, and the fastest is remembered in the cache under a key
of the model, the CPU (model, cores, relevant flags) and the runtime versions. Later processes read
the choice and load only the chosen backend.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from ..errors import BackendError
from ..model.config import VisionConfig
from ..weights.format import WeightLoader
from .artifacts import cache_root, hash_key
from .cpu import CPUInfo, cpu_info
from .feeds import random_inputs
from .validation import DEFAULT_MIN_COSINE

log = logging.getLogger("arrowvision")

AUTO_VERSION = "1"
Build = Callable[..., Any]  # factory.create: (name, weights, **options) -> a backend


def candidates(cpu: CPUInfo) -> list[tuple[str, str]]:
    """What is worth measuring here.

    - fp16 and int8-weights only decompress to fp32 on CPUs without AVX-512 (measured 1.4-1.6x
      slower than fp32 on Zen 3), so they are tried only with AVX-512.
    - OpenVINO int8 is skipped on AVX2 CPUs without VNNI: oneDNN has no int8 brgemm there and
      falls back to ``jit_gemm_I8`` (packing per call), measured 0.8-0.97x OpenVINO fp32 under
      AVX2 emulation (``benchmarks/emulate_avx2.py``) and no faster than fp32 on a Zen 3, while
      ONNX Runtime int8 (MLAS u8 x s8 with 7-bit weights) ran 1.5-1.95x OpenVINO fp32 in the same
      runs; its PTQ export also costs minutes of the first ``auto`` use.
    """
    found = [("openvino", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    if cpu.int8_vnni or "avx512f" in cpu.flags:
        found.insert(1, ("openvino", "int8"))
    if cpu.native_bf16:
        found.append(("openvino", "bf16"))
    if "avx512f" in cpu.flags:
        found.append(("openvino", "int8-weights"))
    return found


def _versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("openvino", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def choice_path(weights: WeightLoader, min_cosine: float, cache_dir: str | os.PathLike | None) -> Path:
    cpu = cpu_info()
    key = hash_key({
        "weights": weights.checksum, "config": VisionConfig.from_weights(weights).to_dict(), "cpu": cpu.signature(),
        "min_cosine": min_cosine, "versions": _versions(), "auto_version": AUTO_VERSION,
    })
    return cache_root(cache_dir) / "auto" / f"{key}.json"


def _warm(backend: Any, config: VisionConfig) -> None:
    backend(random_inputs(config, 1))
    backend(random_inputs(config, 8))


def _time(backend: Any, config: VisionConfig, rounds: int = 3, warm: bool = True) -> tuple[float, float]:
    """(batch-1 ms median, batch-8 ms per image median), after a warm-up call of each unless
    ``warm`` is False (NaFlex models: full 256-patch budgets)."""
    one, eight = random_inputs(config, 1), random_inputs(config, 8)
    if warm:
        _warm(backend, config)
    singles, batches = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        backend(one)
        singles.append(time.perf_counter() - start)
        start = time.perf_counter()
        backend(eight)
        batches.append((time.perf_counter() - start) / 8)
    return 1000 * statistics.median(singles), 1000 * statistics.median(batches)


def _score(row: dict[str, Any]) -> float:
    return (row["b1_ms"] * row["b8_ms_per_image"]) ** 0.5  # geometric mean: latency and throughput


def _options(name: str, precision: str, cache_dir, min_cosine: float, calibration) -> dict[str, Any]:
    options: dict[str, Any] = {"precision": precision, "cache_dir": cache_dir, "min_cosine": min_cosine}
    if name == "openvino" and precision == "int8" and calibration:
        options["calibration"] = calibration
    return options


def measure(weights: WeightLoader, *, build: Build, min_cosine: float, cache_dir, calibration=None) -> dict[str, Any]:
    """Export, validate and time every candidate (each built by ``build``, ``factory.create``),
    then re-time the two fastest alternately; return the record with the fastest marked."""
    cpu = cpu_info()
    config = VisionConfig.from_weights(weights)
    rows: list[dict[str, Any]] = []
    for name, precision in candidates(cpu):
        row: dict[str, Any] = {"backend": name, "precision": precision}
        try:
            backend = build(name, weights, **_options(name, precision, cache_dir, min_cosine, calibration))
            row["b1_ms"], row["b8_ms_per_image"] = _time(backend, config)
            row["score"] = _score(row)
            row["min_cosine"] = backend.report.get("min_cosine", 1.0)
            del backend
        except BackendError as exc:
            row["refused"] = str(exc)
        log.info("auto: %s %s: %s", name, precision,
                    f"b1 {row['b1_ms']:.1f} ms, b8 {row['b8_ms_per_image']:.1f} ms/img" if "score" in row else row["refused"])
        rows.append(row)
    usable = [row for row in rows if "score" in row]
    if not usable:
        reasons = "; ".join(f"{r['backend']} {r['precision']}: {r['refused']}" for r in rows)
        raise BackendError(f"auto: no backend could run this model: {reasons}")
    finalists = sorted(usable, key=lambda row: row["score"])[:2]
    if len(finalists) == 2:
        _rematch(finalists, weights, build, config,
                 options_for=lambda row: _options(row["backend"], row["precision"], cache_dir, min_cosine, calibration))
    best = min(usable, key=lambda row: row["score"])
    return {"backend": best["backend"], "precision": best["precision"], "cpu": cpu.describe(), "min_cosine": min_cosine,
            "candidates": rows, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _rematch(finalists: list[dict[str, Any]], weights: WeightLoader, build: Build, config: VisionConfig, *,
             options_for: Callable[[dict[str, Any]], dict[str, Any]], rounds: int = 3) -> None:
    """Re-time the two finalists (cached now, so quick to load) in alternating rounds: load on a
    shared machine drifts during the sequential pass (measured: a 1.5x-faster int8 path timed
    slower than fp32 there), alternation exposes both to the same drift. Two backends are alive
    at once, never all of them."""
    backends = [build(row["backend"], weights, **options_for(row)) for row in finalists]
    for backend in backends:
        _warm(backend, config)
    samples: list[list[tuple[float, float]]] = [[], []]
    for _ in range(rounds):
        for index, backend in enumerate(backends):
            samples[index].append(_time(backend, config, rounds=1, warm=False))
    for row, timed in zip(finalists, samples):
        row["b1_ms"] = statistics.median(b1 for b1, _ in timed)
        row["b8_ms_per_image"] = statistics.median(b8 for _, b8 in timed)
        row["score"], row["rematched"] = _score(row), True
        log.info("auto: rematch %s %s: b1 %.1f ms, b8 %.1f ms/img", row["backend"], row["precision"], row["b1_ms"],
                 row["b8_ms_per_image"])


def remembered_choice(weights: WeightLoader, min_cosine: float = DEFAULT_MIN_COSINE, cache_dir=None) -> dict[str, Any] | None:
    """The choice measured earlier for this model on this CPU, or None (for ``info``)."""
    path = choice_path(weights, min_cosine, cache_dir)
    return json.loads(path.read_text()) if path.exists() else None


def choose(weights: WeightLoader, *, build: Build, min_cosine: float = DEFAULT_MIN_COSINE, cache_dir=None,
           calibration=None, refresh: bool = False) -> dict[str, Any]:
    """The remembered choice for this model and CPU, measured (under a lock) if there is none."""
    from filelock import FileLock

    path = choice_path(weights, min_cosine, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and not refresh:
            return json.loads(path.read_text())
        log.info("auto: first use of this model on this CPU: measuring candidate backends (once)")
        record = measure(weights, build=build, min_cosine=min_cosine, cache_dir=cache_dir, calibration=calibration)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(record, indent=2))
        os.replace(staging, path)
    return record


def create_auto(weights: WeightLoader, device: str = "CPU", *, build: Build, min_cosine: float = DEFAULT_MIN_COSINE,
                cache_dir=None, calibration=None, refresh: bool = False, **options: Any):
    """Build the chosen backend with ``build`` (``factory.create``, passed in so that the factory
    and this module do not import each other); ``backend.choice`` holds the measurement record."""
    if device.upper() != "CPU":
        raise BackendError(f"backend auto chooses among CPU backends; name a backend for device {device!r}")
    if options.get("precision") not in (None, "auto"):
        raise BackendError("backend auto chooses the precision itself; name a backend to fix the precision")
    options.pop("precision", None)
    record = choose(weights, build=build, min_cosine=min_cosine, cache_dir=cache_dir, calibration=calibration,
                    refresh=refresh)
    if record["backend"] != "openvino":
        options.pop("mode", None)
    extra = {"calibration": calibration} if record["backend"] == "openvino" and record["precision"] == "int8" else {}
    backend = build(record["backend"], weights, precision=record["precision"], cache_dir=cache_dir, min_cosine=min_cosine,
                     **extra, **options)
    backend.choice = record
    return backend
