"""torch.compile's caches kept across processes, in our artifact cache.

A compiled model costs its first call (17-21 s for SigLIP-B/16 on an H200) in every new process.
Torch's "Mega-Cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``, the
documented portable form of its compile caches) serializes what a compilation produced: the
AOTAutograd and Inductor FX-graph entries, with the Triton kernels bundled into them on CUDA, and
autotuning results. We keep those bytes as one file per model, keyed like the OpenVINO IR (weights
checksum, config, precision, model variant, device kind, torch and Triton versions), and hot-load
them before the first compiled call, so a later process gets cache hits instead of compiling.

On the CPU the compiled C++ kernels are not part of the Mega-Cache: they stay in Inductor's own
folder (``TORCHINDUCTOR_CACHE_DIR``, ``/tmp/torchinductor_$USER`` by default) and are rebuilt
where it is empty; the graphs still come from here.

Trust: the artifacts hold pickles that torch unpickles on a cache hit (as from its own folder).
They are read only from our cache folder (``$ARROWVISION_CACHE/torch-compile``), never from a
bundle or a user-given path: whoever can write that folder can run code as its user, the same as
with Inductor's folder or our IR cache. A checksum in the file's header rejects a torn or corrupt
file, and a header made for another key is ignored: both with a warning, then torch compiles as
if nothing were cached and the entry is rewritten. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("arrowvision")
MAGIC = b"arrowvision-torch-compile 1\n"  # then one JSON header line, then torch's bytes
FORMAT_VERSION = 1


def device_kind(torch: Any, device: Any) -> str:
    """What compiled code depends on: the GPU model and compute capability, or this CPU's kind
    (model and the vector extensions Inductor's C++ code may use)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}"
    from .cpu import cpu_info

    return f"cpu:{cpu_info().signature()}"


def key_parts(torch: Any, weights_checksum: str, config: dict[str, Any], precision: str, device: Any,
              variant: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the compiled artifacts (``variant``: model code options, compile mode)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"weights": weights_checksum, "config": config, "precision": precision, "variant": variant,
            "device": device_kind(torch, device), "torch": torch.__version__, "triton": triton_version,
            "format": FORMAT_VERSION}


class CompileCache:
    """One model's compiled artifacts in ``<cache>/torch-compile/<key>.bin``.

    ``load()`` before the first compiled call; ``save()`` after each call that compiled a new
    shape (it rewrites the file only when torch recorded artifacts the file does not hold).
    Torch records artifacts per process: where one process compiled several models, each model's
    file holds them all (larger, harmless). Concurrent writers: the last complete file wins."""

    def __init__(self, torch: Any, path: Path | None, parts: dict[str, Any]):
        self.torch, self.path, self.parts = torch, path, parts
        self.known: set[str] = set()  # artifact keys already in the file
        self.loaded = False

    @classmethod
    def open(cls, torch: Any, parts: dict[str, Any], cache_dir: str | os.PathLike | None) -> CompileCache:
        from .artifacts import cache_root, hash_key

        try:
            path = cache_root(cache_dir) / "torch-compile" / f"{hash_key(parts)}.bin"
        except ImportError:  # platformdirs missing (a bare GPU box) and no ARROWVISION_CACHE: compile per process
            log.warning("no arrowvision cache folder (set ARROWVISION_CACHE): torch.compile's artifacts are not kept")
            path = None
        return cls(torch, path, parts)

    def load(self) -> bool:
        """Hot-load the file's artifacts into torch's caches; False (and a warning where the file
        is there but unusable) when there is nothing to load."""
        if self.path is None or not self.path.exists():
            return False
        try:
            header, payload = read_entry(self.path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the torch.compile cache entry %s (%s); compiling again", self.path, exc)
            return False
        if header.get("parts") != json.loads(json.dumps(self.parts, default=str)):
            log.warning("ignoring the torch.compile cache entry %s: it was made for another model, device or "
                        "torch version; compiling again", self.path)
            return False
        try:
            info = self.torch.compiler.load_cache_artifacts(payload)
        except Exception as exc:  # noqa: BLE001 - a cache is an optimization: never fail the model for it
            log.warning("torch could not load the compile cache entry %s (%s: %s); compiling again",
                        self.path, type(exc).__name__, exc)
            return False
        if info is None:
            log.warning("torch could not read the compile cache entry %s; compiling again", self.path)
            return False
        self.known = artifact_keys(info)
        self.loaded = True
        return True

    def save(self) -> bool:
        """Write what torch has recorded in this process, if it holds anything new; True if written."""
        if self.path is None:
            return False
        try:
            result = self.torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            log.warning("torch could not serialize its compile caches (%s: %s)", type(exc).__name__, exc)
            return False
        if result is None:
            return False
        payload, info = result
        keys = artifact_keys(info)
        if keys <= self.known:
            return False
        try:
            write_entry(self.path, {"parts": self.parts, "artifacts": sorted(keys)}, payload)
        except OSError as exc:  # a read-only cache only costs a compilation next time
            log.warning("cannot keep torch.compile's artifacts at %s: %s", self.path, exc)
            return False
        self.known = keys
        return True


def artifact_keys(info: Any) -> set[str]:
    """``type/key`` of every artifact in torch's CacheInfo."""
    return {f"{kind}/{key}" for kind, keys in info.artifacts.items() for key in keys}


def write_entry(path: Path, header: dict[str, Any], payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**header, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + json.dumps(header, default=str).encode() + b"\n" + payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of an entry; ValueError naming what is wrong with a bad one."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("not an arrowvision torch.compile cache file")
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        raise ValueError("truncated header")
    try:
        header = json.loads(data[len(MAGIC):line_end])
    except ValueError:
        raise ValueError("unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    payload = data[line_end + 1:]
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError(f"checksum mismatch ({len(payload)} bytes, header says {header.get('bytes')})")
    return header, payload
