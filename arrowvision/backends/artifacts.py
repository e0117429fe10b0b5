"""The cache of exported artifacts (OpenVINO IR, ONNX) shared by the exporters.

An entry is a folder ``<cache>/<kind>/<key>/`` whose key hashes everything that changes the
result (weights checksum, config, precision, calibration, exporter and runtime versions); it is
built once under a file lock in a staging folder and renamed into place, ``meta.json`` written
last, so readers see either no entry or a finished one, also with several processes at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BackendError


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $ARROWVISION_CACHE, else the user's cache dir (e.g. ~/.cache/arrowvision)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("ARROWVISION_CACHE"):
        return Path(os.environ["ARROWVISION_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("arrowvision"))


def hash_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def is_complete(entry: Path) -> bool:
    return (entry / "meta.json").exists()


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "meta.json").read_text())


def cached_exports(weights_checksum: str, cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Metadata of every finished export of these weights in the cache (for ``info``)."""
    root = cache_root(cache_dir)
    found = []
    for meta_path in sorted([*root.glob("ir/*/meta.json"), *root.glob("onnx/*/meta.json")]):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("weights_checksum") == weights_checksum:
            found.append({"format": meta.get("format", "openvino"), "path": str(meta_path.parent), **meta})
    return found


def build_entry(kind_root: Path, key: str, build: Callable[[Path], dict[str, Any]], force: bool = False) -> Path:
    """Return the finished entry ``kind_root/key``, building it with ``build(staging)`` if needed.

    ``build`` writes its files into ``staging`` and returns the metadata; a failure (e.g. an
    export refused for accuracy) leaves nothing in the cache."""
    from filelock import FileLock

    kind_root.mkdir(parents=True, exist_ok=True)
    entry = kind_root / key
    with FileLock(str(kind_root / f"{key}.lock")):
        if is_complete(entry) and not force:
            return entry
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=kind_root))
        try:
            meta = build(staging)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks completion
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry


def require_torch(what: str):
    try:
        import torch
    except ImportError:
        raise BackendError(
            f"the {what} for this model is not cached yet and exporting it needs PyTorch: "
            "pip install torch==2.13.0 (or run `arrowvision export` where torch is installed and share the cache)"
        ) from None
    return torch


def pooled_module(model: Any):
    """Wrap our vision tower so an exported graph returns only the pooled embedding."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # pixels, or NaFlex's pixels, mask, grids
            return self.inner(*inputs).pooled

    return Pooled(model).eval()
