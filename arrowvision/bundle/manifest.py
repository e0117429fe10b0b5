"""A bundle's ``manifest.json``: what the folder holds, where and how it was made, and the
BLAKE3 checksum of every file, so that a missing, truncated or edited file is our error at load
time, not a crash inside a runtime.

Layout of a bundle (``DIR``)::

    manifest.json                this file's subject; written last
    config.json                  the towers' configs, logit scale and bias
    vision/model.xml|.bin|.onnx  the image tower's artifact
    vision-fp32/                 an exact fallback, when the image artifact is lossy
    text/, text-fp32/            the same for the text tower (--tower all)
    tokenizer/                   the tokenizer files stored in the weights
    reference/vision.npz, text.npz  fp32 reference embeddings of the held-out sets (re-validation)
    cache/                       OpenVINO's compiled models: the blobs made at build time are
                                 checksummed (``compiled_cache_files``); the runtime may add others
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError

FORMAT = "arrowvision-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CACHE = "cache"
MAX_MANIFEST_BYTES = 1 << 20
HASH = "blake3"


@dataclass(frozen=True)
class BundleSource:
    """Where a bundled encoder came from: what ``VisionEncoder.weights`` is for a Parquet file.
    ``checksum`` is the weights' own, so datasets and indexes made with either match."""

    path: Path
    checksum: str


def file_digest(path: Path) -> str:
    """BLAKE3 of a file's bytes: cryptographic like SHA-256 and 2.3x faster here (0.19 vs 0.45 s
    for SigLIP-B's 355 MB IR), which is most of what checking a bundle adds to a cold start.
    Read in chunks, not mapped: mapping the IR and the compiled blob while OpenVINO maps them too
    counted both files twice in RSS (up to +180 MB of peak while a bundle loads), and reading
    measured as fast (0.09-0.11 vs 0.11-0.14 s for the 355 MB IR, warm page cache)."""
    import blake3

    hasher, buffer = blake3.blake3(), bytearray(4 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            hasher.update(view[:read])
    return hasher.hexdigest()


def describe_files(root: Path, cache: bool = False) -> dict[str, dict[str, Any]]:
    """``{relative path: {blake3, bytes}}`` of every file but the manifest and the compiled cache
    (``cache``: of the compiled cache's files only)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST or relative.startswith(CACHE + "/") != cache:
            continue
        found[relative] = {HASH: file_digest(path), "bytes": path.stat().st_size}
    return found


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Checksum the folder's files into ``manifest`` and write it (temp + rename)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": describe_files(root)}
    replace_manifest(root, manifest)


def replace_manifest(root: Path, manifest: dict[str, Any]) -> None:
    staging = root / (MANIFEST + ".tmp")
    staging.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(staging, root / MANIFEST)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of bundle ``root``, its format checked (not yet its files: ``check_listing``,
    ``verify_checksums``)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder (make one with `arrowvision bundle --weights W -o {root}`)")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not an arrowvision bundle: it has no {MANIFEST} (make one with `arrowvision bundle`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {path.stat().st_size} bytes; a bundle manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): the bundle is damaged; rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an arrowvision bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {manifest.get('format_version')!r}; this arrowvision reads "
                          f"version {FORMAT_VERSION}: rebuild the bundle with this release")
    for key in ("files", "vision", "cpu", "weights"):
        if not isinstance(manifest.get(key), dict):
            raise BundleError(f"{path} lacks its {key!r} section: the bundle is damaged; rebuild it")
    for section in ("files", "compiled_cache_files"):
        entries = manifest.get(section, {})
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                                    for e in entries.values()):
            raise BundleError(f"{path}: its {section!r} entries are malformed: the bundle is damaged; rebuild it")
    return manifest


def check_listing(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its size, and nothing else is (cheap: no reads)."""
    listed = manifest["files"]
    for relative, expected in listed.items():
        if not isinstance(relative, str) or ".." in Path(relative).parts or Path(relative).is_absolute():
            raise BundleError(f"{root / MANIFEST} names a file outside the bundle: {relative!r}")
        path = root / relative
        if not path.is_file():
            raise BundleError(f"bundle {root} is incomplete: {relative} is missing; rebuild it")
        if not isinstance(expected, dict) or path.stat().st_size != expected.get("bytes"):
            raise BundleError(f"bundle {root}: {relative} does not match its size in {MANIFEST} "
                              "(changed or truncated since it was made); rebuild the bundle")
    extra = sorted(set(describe_paths(root)) - set(listed))
    if extra:
        raise BundleError(f"bundle {root} holds files its manifest does not list: {', '.join(extra[:4])}; rebuild it")


def verify_checksums(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Each of ``files`` (manifest entries) has its BLAKE3 checksum; a compiled-cache blob that is
    gone is fine (OpenVINO compiles again), one that differs is not."""
    for relative, expected in files.items():
        path = root / relative
        if relative.startswith(CACHE + "/") and not path.exists():
            continue
        if file_digest(path) != expected.get(HASH):
            raise BundleError(f"bundle {root}: {relative} does not match its checksum in {MANIFEST} "
                              "(changed or corrupted since it was made); rebuild the bundle")


def describe_paths(root: Path) -> list[str]:
    """The relative paths ``describe_files`` would checksum, without reading them."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.relative_to(root).as_posix().startswith(CACHE + "/")]
