"""``arrowvision bundle``: export a model once, validate what will ship, write a self-contained
folder (needs the full install: torch exports and computes the reference).

Each tower's artifact comes from the usual export (cached, held-out checks included); the copy
in the bundle is then loaded the way the runtime loads it and measured again against the fp32
torch reference on every held-out kind, so the manifest's accuracy is that of the shipped files.
The reference embeddings are stored too: the runtime re-validates with them on another CPU.
The folder is assembled beside ``out`` and renamed into place; OpenVINO's compiled-model cache
is filled afterwards, at the final path (OpenVINO keys it by the model's path).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import BACKEND_PRECISIONS
from ..backends.cpu import cpu_info
from ..backends.validation import DEFAULT_MIN_COSINE, heldout_pixels, reference_embeddings, validate_lossy
from ..errors import BundleError
from ..model.config import VisionConfig
from ..model.text_config import TextConfig
from ..weights.format import WeightLoader
from .manifest import MANIFEST, describe_files, read_manifest, replace_manifest, write_manifest

BUNDLE_BACKENDS = ("openvino", "onnxruntime", "auto")
FP32_MIN_COSINE = 0.9999  # an fp32 artifact is exact up to float rounding
VERSIONED = ("arrowvision", "openvino", "onnxruntime", "numpy", "torch", "nncf", "tokenizers", "sentencepiece")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def build_bundle(weights_path: str | os.PathLike, out: str | os.PathLike, *, precision: str | None = None,
                 backend: str = "openvino", tower: str = "vision", min_cosine: float = DEFAULT_MIN_COSINE,
                 cache_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Any]:
    """Write the bundle of ``weights_path`` to ``out``; return its manifest. ``backend="auto"``
    measures (once per CPU) and ships the fastest validated choice with an fp32 fallback."""
    out = Path(out)
    _check_arguments(out, precision, backend, tower, force)
    weights = WeightLoader(weights_path, verify=True)
    vision_config = VisionConfig.from_weights(weights)
    text_config = TextConfig.from_weights(weights) if tower == "all" else None  # a clear error for vision-only files
    auto_record = None
    if backend == "auto":
        from ..backends.auto import choose
        from ..backends.factory import create

        auto_record = choose(weights, build=create, min_cosine=min_cosine, cache_dir=cache_dir)
        backend, precision = auto_record["backend"], auto_record["precision"]
    precision = precision or "fp32"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        start = time.perf_counter()
        manifest: dict[str, Any] = {
            "requested_backend": "auto" if auto_record else backend, "tower": tower, "min_cosine": min_cosine,
            "weights": {"checksum": weights.checksum, "file": Path(weights_path).name},
            "cpu": {"model": cpu_info().model, "signature": cpu_info().signature(), "describe": cpu_info().describe(),
                    "flags": cpu_info().relevant_flags()},
            "versions": versions(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if auto_record:
            manifest["auto"] = auto_record
        manifest["vision"] = _vision_tower(staging, weights, vision_config, backend, precision, min_cosine, cache_dir)
        config: dict[str, Any] = {"vision": vision_config.to_dict(), "text": None}
        if text_config is not None:
            manifest["text"] = _text_tower(staging, weights, text_config, precision, min_cosine, cache_dir)
            config.update(text=text_config.to_dict(), logit_scale=_scalar(weights, "logit_scale", None),
                          logit_bias=_scalar(weights, "logit_bias", 0.0 if text_config.family == "clip" else None))
        _write_json(staging / "config.json", config)
        manifest["build_seconds"] = round(time.perf_counter() - start, 2)
        write_manifest(staging, manifest)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _warm_compiled_cache(out)
    return read_manifest(out)


def _check_arguments(out: Path, precision: str | None, backend: str, tower: str, force: bool) -> None:
    if backend not in BUNDLE_BACKENDS:
        raise BundleError(f"a bundle runs on {', '.join(BUNDLE_BACKENDS)} (torch is not in the runtime install), not {backend!r}")
    if backend == "auto" and precision not in (None, "auto"):
        raise BundleError("backend auto chooses the precision itself; name a backend to fix the precision")
    if backend != "auto" and precision and precision not in BACKEND_PRECISIONS[backend]:
        raise BundleError(f"precision {precision!r} is not available on the {backend} backend; "
                          f"choose from {', '.join(BACKEND_PRECISIONS[backend])}")
    if tower not in ("vision", "all"):
        raise BundleError(f"tower {tower!r}: choose vision or all")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists; choose another folder or pass --force to replace it")
    if out.exists() and force and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise BundleError(f"{out} is a folder but not a bundle: --force replaces bundles only")


def _vision_tower(staging: Path, weights: WeightLoader, config: VisionConfig, backend: str, precision: str,
                  min_cosine: float, cache_dir) -> dict[str, Any]:
    """Export, copy in, validate the copy; an fp32 OpenVINO fallback beside a lossy artifact."""
    import torch  # noqa: F401  (the full install: a clear ImportError names what is missing)

    from ..model.naflex import load_vision_tower

    pixels = heldout_pixels(config)  # NaFlex models: NaFlex batches at the default budget
    reference = reference_embeddings(load_vision_tower(weights), pixels)
    (staging / "reference").mkdir()
    np.savez(staging / "reference" / "vision.npz", **reference)
    section = {"artifact": _vision_artifact(staging, "vision", weights, config, backend, precision, min_cosine,
                                            cache_dir, pixels, reference)}
    if precision != "fp32":
        section["fallback"] = _vision_artifact(staging, "vision-fp32", weights, config, "openvino", "fp32", min_cosine,
                                               cache_dir, pixels, reference)
    return section


def _vision_artifact(staging: Path, folder: str, weights: WeightLoader, config: VisionConfig, backend: str, precision: str,
                     min_cosine: float, cache_dir, pixels, reference) -> dict[str, Any]:
    threshold = min_cosine if precision != "fp32" else max(min_cosine, FP32_MIN_COSINE)
    if backend == "onnxruntime":
        from ..backends.onnx_export import export_onnx
        from ..backends.onnxruntime_backend import ONNXRuntimeBackend

        entry = export_onnx(weights, precision, cache_dir=cache_dir, min_cosine=min_cosine, portable=True)
        path = _copy_entry(entry, staging / folder, "model.onnx")
        run = ONNXRuntimeBackend.from_file(path, config, precision)
    else:
        from ..backends.openvino_backend import OpenVINOBackend, export

        path = _copy_entry(export(weights, precision, cache_dir=cache_dir, min_cosine=min_cosine), staging / folder, "model.xml")
        run = OpenVINOBackend.from_ir(path, config, precision)
    accuracy = validate_lossy(f"bundle {backend}", precision, run, pixels, reference, threshold)
    return {"backend": backend, "precision": precision, "path": path.relative_to(staging).as_posix(), "accuracy": accuracy}


def _text_tower(staging: Path, weights: WeightLoader, config: TextConfig, precision: str, min_cosine: float,
                cache_dir) -> dict[str, Any]:
    """The tokenizer files, the text IR (OpenVINO; the text tower has no ONNX path) validated on
    the bundled sentences, their reference embeddings, and an fp32 fallback beside a lossy IR."""
    import torch

    from ..backends.openvino_text import VALIDATION_TEXTS
    from ..model.text import TextTransformer
    from ..model.tokenizer import load_tokenizer

    files = weights.tokenizer_files()
    (staging / "tokenizer").mkdir()
    for name, data in files.items():
        if Path(name).name != name or name.startswith("."):
            raise BundleError(f"{weights.path}: stored tokenizer file name {name!r} is not a plain file name")
        (staging / "tokenizer" / name).write_bytes(data)
    tokenizer = load_tokenizer(files, config)
    ids = {kind: tokenizer(texts) for kind, texts in VALIDATION_TEXTS.items()}
    model = TextTransformer.from_weights(weights)
    with torch.inference_mode():
        reference = {kind: model(torch.from_numpy(batch)).pooled.float().numpy() for kind, batch in ids.items()}
    np.savez(staging / "reference" / "text.npz", **reference)
    text_precision = precision if precision in BACKEND_PRECISIONS["openvino"] else "fp32"
    section = {"artifact": _text_artifact(staging, "text", weights, tokenizer, text_precision, min_cosine, cache_dir, ids, reference)}
    if text_precision != "fp32":
        section["fallback"] = _text_artifact(staging, "text-fp32", weights, tokenizer, "fp32", min_cosine, cache_dir, ids, reference)
    return section


def _text_artifact(staging: Path, folder: str, weights: WeightLoader, tokenizer: Any, precision: str, min_cosine: float,
                   cache_dir, ids, reference) -> dict[str, Any]:
    from ..backends.openvino_text import OpenVINOTextBackend, export

    path = _copy_entry(export(weights, tokenizer, precision, cache_dir=cache_dir, min_cosine=min_cosine), staging / folder, "model.xml")
    run = OpenVINOTextBackend.from_ir(path, precision)
    threshold = min_cosine if precision != "fp32" else max(min_cosine, FP32_MIN_COSINE)
    accuracy = validate_lossy("bundle openvino text", precision, run, ids, reference, threshold)
    return {"backend": "openvino", "precision": precision, "path": path.relative_to(staging).as_posix(), "accuracy": accuracy}


def _copy_entry(entry: Path, target: Path, main_file: str) -> Path:
    """The artifact files of a cache entry (not its meta.json) copied to ``target``."""
    target.mkdir(parents=True)
    for path in entry.iterdir():
        if path.is_file() and path.name != "meta.json":
            shutil.copy2(path, target / path.name)
    if not (target / main_file).is_file():
        raise BundleError(f"the export in {entry} has no {main_file}")
    return target / main_file


def _scalar(weights: WeightLoader, name: str, default: float | None) -> float:
    if name in weights:
        return float(np.asarray(weights.tensor(name), dtype=np.float64).reshape(-1)[0])
    if default is None:
        raise BundleError(f"{weights.path} has no {name!r} tensor; convert the checkpoint with --tower all")
    return default


def _write_json(path: Path, document: Any) -> None:
    import json

    path.write_text(json.dumps(document, indent=2, sort_keys=True))


def _replace(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; a bundle already there (``--force``) is moved aside first, so a
    reader sees the old bundle or the new one, never a mix."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _warm_compiled_cache(out: Path) -> None:
    """Compile each OpenVINO artifact once at the bundle's final path, filling ``cache/``, and
    record the blobs' checksums in the manifest (replaced atomically)."""
    from .runtime import open_bundle

    bundle = open_bundle(out)
    (out / "cache").mkdir(exist_ok=True)
    bundle.vision_backend()
    if bundle.has_text:
        bundle.text_backend()
    blobs = describe_files(out, cache=True)
    replace_manifest(out, {**bundle.manifest, "compiled_cache": "cache/" if blobs else None, "compiled_cache_files": blobs})
