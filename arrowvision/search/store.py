"""The on-disk layout of a vector index: ``meta.json``, one main generation and its delta segments.

``DATASET/_index/`` (a ``_`` folder, which dataset discovery skips) holds ``meta.json`` and the
files it names, every one inside that folder:

- the main generation ``G``: ``vectors-G.faiss`` (the FAISS index), ``paths-G.parquet`` (row id ->
  image path) and, for an ``ivfpq`` index, ``refine-G.npy`` (every row as float16, in row order: the
  exact re-ranking reads the candidates' rows from it);
- delta segments, one per incremental update: ``delta-G.npy`` (the new rows, float32) and
  ``delta-G.parquet`` (their paths), searched exactly beside the main index until they are folded
  into it (``index.update`` does that once they pass ``DELTA_MAX_ROWS``).

Every file is written under a temporary name and renamed; ``meta.json`` is replaced last, so a crash
or a reader at any moment sees one complete index, and files no ``meta.json`` names are removed by
the next write. Format 1 (before delta segments and ``ivfpq``) differs only in lacking the new keys
and still opens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import IndexCorrupt, SearchIndexError
from ..util.fsutil import atomic_output

INDEX_DIR = "_index"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: no delta segments, no refine file; opens as is
KINDS = ("exact", "ivf", "ivfpq")  # "ivf": float16 IVF of format 1 (still searched, no longer built)
MANAGED_PREFIXES = ("vectors-", "paths-", "refine-", "delta-")  # what a write may remove when unreferenced


def index_folder(dataset: str | os.PathLike) -> Path:
    return Path(dataset) / INDEX_DIR


def has_index(dataset: str | os.PathLike) -> bool:
    return (index_folder(dataset) / "meta.json").is_file()


def _rebuild_hint(dataset: str | os.PathLike) -> str:
    return f"rebuild it with `arrowvision index {dataset} --rebuild`"


def _checked_name(folder: Path, meta: dict[str, Any], key: str, where: dict[str, Any] | None = None) -> None:
    value = (where or meta).get(key)
    if not isinstance(value, str) or Path(value).name != value or value in ("", ".", ".."):
        raise IndexCorrupt(f"{folder}/meta.json: bad {key} {value!r}")


def read_meta(dataset: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of the dataset's index, checked: the keys every format has, a known format and
    kind, and file names that stay inside the index folder."""
    folder = index_folder(dataset)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise SearchIndexError(f"{dataset}: no index; build one with `arrowvision index {dataset}`") from None
    except (OSError, ValueError) as exc:
        raise IndexCorrupt(f"{folder}/meta.json: unreadable ({exc}); {_rebuild_hint(dataset)}") from None
    required = {"format_version", "kind", "rows", "dim", "model_checksum", "parts", "vectors_file", "paths_file", "generation"}
    if not isinstance(meta, dict) or not required <= meta.keys():
        raise IndexCorrupt(f"{folder}/meta.json: not an arrowvision index (missing {sorted(required - set(meta or {}))})")
    if meta["format_version"] not in READABLE_FORMATS:
        raise IndexCorrupt(f"{folder}: index format {meta['format_version']}, this version reads "
                           f"{', '.join(map(str, READABLE_FORMATS))}; {_rebuild_hint(dataset)}")
    if meta["kind"] not in KINDS:
        raise IndexCorrupt(f"{folder}: unknown index kind {meta['kind']!r}; {_rebuild_hint(dataset)}")
    for key in ("vectors_file", "paths_file") + (("refine_file",) if meta["kind"] == "ivfpq" else ()):
        _checked_name(folder, meta, key)
    delta = meta.setdefault("delta", [])
    if not isinstance(delta, list) or not all(isinstance(s, dict) and isinstance(s.get("rows"), int) for s in delta):
        raise IndexCorrupt(f"{folder}/meta.json: bad delta {delta!r}; {_rebuild_hint(dataset)}")
    for segment in delta:
        for key in ("vectors_file", "paths_file"):
            _checked_name(folder, meta, key, segment)
    return meta


def referenced_files(meta: dict[str, Any]) -> set[str]:
    names = {meta["vectors_file"], meta["paths_file"], *(meta.get(k) for k in ("refine_file",) if meta.get(k))}
    for segment in meta.get("delta", []):
        names |= {segment["vectors_file"], segment["paths_file"]}
    return names


def index_bytes(dataset: str | os.PathLike, meta: dict[str, Any]) -> int:
    folder = index_folder(dataset)
    return sum((folder / name).stat().st_size for name in referenced_files(meta))


def lock(dataset: str | os.PathLike):
    """The writers' lock (``filelock``): one ``index``/``embed`` writes an index at a time."""
    from filelock import FileLock

    index_folder(dataset).mkdir(parents=True, exist_ok=True)
    return FileLock(str(index_folder(dataset) / ".lock"))


def write_paths(path: Path, paths: list[str]) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), tmp, compression="zstd")


def read_paths(path: Path) -> list[str]:
    return pq.read_table(path, columns=["path"]).column("path").to_pylist()


def commit(dataset: str | os.PathLike, meta: dict[str, Any]) -> int:
    """Replace ``meta.json`` (atomically: the moment the new index exists), then remove the files it
    no longer names; -> the index's size in bytes."""
    folder = index_folder(dataset)
    meta["format_version"] = FORMAT_VERSION
    with atomic_output(folder / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))
    keep = referenced_files(meta)
    for old in folder.iterdir():
        if old.name.startswith(MANAGED_PREFIXES) and old.name not in keep:
            old.unlink(missing_ok=True)
    return index_bytes(dataset, meta)


def write_main(dataset: str | os.PathLike, meta: dict[str, Any], index: Any, paths: list[str]) -> None:
    """The FAISS index and the paths of a new main generation (``meta["generation"]``), not yet committed."""
    import faiss

    folder = index_folder(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    generation = int(meta["generation"])
    meta["vectors_file"] = f"vectors-{generation:06d}.faiss"
    meta["paths_file"] = f"paths-{generation:06d}.parquet"
    with atomic_output(folder / meta["vectors_file"]) as tmp:
        faiss.write_index(index, tmp)
    write_paths(folder / meta["paths_file"], paths)


def load_rows(path: Path, mmap: bool) -> np.ndarray:
    """A ``.npy`` matrix read into RAM, or mapped read-only with random-access advice: a query
    reads ~100 scattered rows of it, and readahead would pull (and map) ~64 KiB around each."""
    if not mmap:
        return np.load(path, allow_pickle=False)
    import mmap as mmap_module

    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
        mapped = mmap_module.mmap(handle.fileno(), 0, access=mmap_module.ACCESS_READ)
    if fortran_order or dtype.hasobject:
        raise ValueError(f"{path.name}: not a C-ordered numeric matrix")
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap_module.MADV_RANDOM)
    return np.frombuffer(mapped, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def write_delta(dataset: str | os.PathLike, meta: dict[str, Any], vectors: np.ndarray, paths: list[str]) -> None:
    """One more delta segment (float32 rows + paths) named after ``meta["generation"]``, added to
    ``meta["delta"]``, not yet committed."""
    folder = index_folder(dataset)
    segment = {"vectors_file": f"delta-{int(meta['generation']):06d}.npy",
               "paths_file": f"delta-{int(meta['generation']):06d}.parquet", "rows": len(paths)}
    with atomic_output(folder / segment["vectors_file"]) as tmp, open(tmp, "wb") as handle:  # (a name would get .npy)
        np.save(handle, np.ascontiguousarray(vectors, np.float32), allow_pickle=False)
    write_paths(folder / segment["paths_file"], paths)
    meta["delta"] = [*meta.get("delta", []), segment]


def read_delta(dataset: str | os.PathLike, meta: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Every delta segment's rows (float32, in RAM: they are few) and paths, in the order added."""
    folder = index_folder(dataset)
    dim = int(meta["dim"])
    vectors, paths = [np.zeros((0, dim), np.float32)], []
    for segment in meta.get("delta", []):
        try:
            rows = np.load(folder / segment["vectors_file"], allow_pickle=False)
            names = read_paths(folder / segment["paths_file"])
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise IndexCorrupt(f"{folder}: cannot read the delta segment {segment['vectors_file']} ({exc}); "
                               f"{_rebuild_hint(dataset)}") from None
        if rows.dtype != np.float32 or rows.shape != (segment["rows"], dim) or len(names) != segment["rows"]:
            raise IndexCorrupt(f"{folder}: delta segment {segment['vectors_file']} holds {rows.shape} {rows.dtype} and "
                               f"{len(names)} paths, meta says {segment['rows']} x {dim}; {_rebuild_hint(dataset)}")
        vectors.append(rows)
        paths += names
    return np.concatenate(vectors), paths
