"""A vector index beside an embeddings dataset, on FAISS: exact below a size threshold, IVF above.

Why FAISS, measured on this project's shared 2-core AMD Zen 3 machine with a clustered synthetic
corpus of 50k x 768 (the corpus of ``benchmarks/search.py`` with ``--center-scale 1``; one query
at a time; the machine was busy, so times carry noise):

==============================================  ===========  ===============  ==============
engine                                          build        recall@10        p50
==============================================  ===========  ===============  ==============
FAISS IVF-Flat (894 lists, nprobe 16 / 32)         10-11 s     0.999 / 1.000    0.3 / 0.7 ms
usearch HNSW (M 16, ef_add 128, ef 64 / 128)     118-214 s     0.994 / 1.000    0.9 / 1.3 ms
LanceDB IVF_PQ (nprobes 20, refine 10)           290-394 s     1.000           15.5 ms
==============================================  ===========  ===============  ==============

Queries are fast enough with all three; building is not. usearch's HNSW inserts cost ~3 ms each
on two cores, so a 1M corpus would take about an hour to build (FAISS IVF: 3.5 minutes), and
LanceDB's IVF_PQ training is 30x slower than FAISS's k-means with 20x the query latency. HNSW
would answer a 1M corpus faster than IVF does (see below), which is the price of this choice.
FAISS IVF trains k-means on a sample, adds new chunks without retraining (an incremental update
is an ``add``), and its exact ``IndexFlatIP`` ranks exactly like the streamed scan of
``search.top_k``.

How the IVF stores vectors, measured at 1M x 768 (1000 lists; the benchmark corpus; CPU time of
one query on one thread, so other load on the machine does not count):

============  ========  ===================  ===================  ===================
storage       size      nprobe 32            nprobe 64            nprobe 128
============  ========  ===================  ===================  ===================
float32       2.9 GiB   0.920 @ 10.4 ms      0.944 @ 19.8 ms      0.960 @ 38.7 ms
float16       1.4 GiB   0.920 @  8.1 ms      0.944 @ 14.9 ms      0.960 @ 31.3 ms
int8 (SQ8)    0.7 GiB   0.919 @  5.9 ms      0.942 @ 10.9 ms      0.958 @ 21.5 ms
============  ========  ===================  ===================  ===================

The scan is memory-bound, so smaller vectors are faster at the same recall. float16 keeps scores
within 2e-5 of the exact cosine (an indexed photo still finds itself at 1.0); int8 is faster still
but moves scores by up to 2e-3, so we store float16. A memory-mapped index answers from the page
cache (48 ms vs 21 ms wall per query at nprobe 32): ``serve`` reads it into RAM, one-off CLI
searches map it.

Layout: ``DATASET/_index/`` (a ``_`` folder, which dataset discovery skips) holds
``meta.json`` (the model checksum, preprocessing, dimension, the part files indexed) and one
generation of ``vectors-N.faiss`` + ``paths-N.parquet`` (row id -> image path). A new generation is
written beside the old one and ``meta.json`` is replaced last (atomically), so a crash or a
reader at any moment sees one complete index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..util.similarity import l2_normalize
from ..errors import (
    ArrowVisionError,
    BackendError,
    IndexCorrupt,
    IndexMismatch,
    SearchIndexError,
)
from ..datasets.pipeline import META_PREFIX, iter_embedding_batches, part_files
from ..util.fsutil import atomic_output

log = logging.getLogger("arrowvision")

INDEX_DIR = "_index"
FORMAT_VERSION = 1
EXACT_BELOW = 50_000  # rows; exact search of 50k x 768 takes ~15 ms on 2 cores, IVF < 1 ms
DEFAULT_NPROBE = 32
TRAIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per list
RETRAIN_GROWTH = 4.0  # an IVF trained on N rows is rebuilt once the corpus passes 4N


def _faiss():
    try:
        import faiss
    except ImportError:
        raise BackendError("the vector index needs FAISS: pip install 'arrowvision[search]' (faiss-cpu)") from None
    return faiss


def index_folder(dataset: str | os.PathLike) -> Path:
    return Path(dataset) / INDEX_DIR


def has_index(dataset: str | os.PathLike) -> bool:
    return (index_folder(dataset) / "meta.json").is_file()


def dataset_metadata(dataset: Path) -> dict[str, str]:
    meta = pq.read_schema(part_files(dataset)[0]).metadata or {}
    return {k[len(META_PREFIX):].decode(): v.decode() for k, v in meta.items() if k.startswith(META_PREFIX)}


def _part_record(part: Path) -> dict[str, Any]:
    return {"name": part.name, "rows": pq.read_metadata(part).num_rows, "bytes": part.stat().st_size}


@dataclass
class IndexInfo:
    """What ``build`` / ``update`` did, for the CLI's one-line report."""

    rows: int
    kind: str  # "exact" or "ivf"
    action: str  # "built", "updated" (chunks added) or "unchanged"
    added_rows: int = 0
    seconds: float = 0.0
    bytes: int = 0
    folder: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def meta_flag(value: object) -> bool:
    """A yes/no of the index meta: a JSON bool, or the string ``"true"``/``"false"`` of older indexes."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


class VectorIndex:
    """An opened index: ``search`` answers cosine top-k, each path once, best first."""

    def __init__(self, dataset: Path, meta: dict[str, Any], index: Any, paths: list[str], mmap: bool = False):
        self.dataset = dataset
        self.mmap = mmap
        self.meta = meta
        self.index = index
        self.paths = paths
        self.path_set = frozenset(paths)
        self.nprobe = int(meta.get("nprobe", DEFAULT_NPROBE))

    # ------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, dataset: str | os.PathLike, model_checksum: str | None = None, sketch: bool | None = None,
             mmap: bool = True) -> VectorIndex:
        """Load the index of ``dataset``; with ``model_checksum`` refuse one built by another model
        (and, with ``sketch``, one of the other preprocessing) with ``IndexMismatch``. ``mmap``:
        map the vectors instead of reading them: a quick open for one-off searches (the CLI), which
        then touch only the probed lists on disk; a service reads them into RAM (``mmap=False``:
        at 1M x 768 a query then costs a third of the time). A mapped index is read-only."""
        dataset = Path(dataset)
        meta = read_meta(dataset)
        if model_checksum is not None and meta["model_checksum"] != model_checksum:
            raise IndexMismatch(
                f"{index_folder(dataset)} was built from embeddings of model {meta['model_checksum'][:19] or 'unknown'}, "
                f"not of the model given ({model_checksum[:19]}): its scores would mean nothing; serve or search "
                "with the weights that embedded the dataset, or embed and index it again with these")
        stored_sketch = meta_flag(meta.get("sketch", False))
        if sketch is not None and stored_sketch != bool(sketch):
            raise IndexMismatch(f"{dataset} was embedded with sketch={str(stored_sketch).lower()}, "
                                f"the query uses sketch={str(bool(sketch)).lower()}")
        faiss = _faiss()
        folder = index_folder(dataset)
        try:
            flags = (faiss.IO_FLAG_MMAP if meta["kind"] == "ivf" else faiss.IO_FLAG_MMAP_IFC) if mmap else 0  # (not both)
            index = faiss.read_index(str(folder / meta["vectors_file"]), flags)
            paths = pq.read_table(folder / meta["paths_file"], columns=["path"]).column("path").to_pylist()
        except (RuntimeError, OSError, pa.ArrowException) as exc:
            raise IndexCorrupt(f"{folder}: cannot read the index ({exc}); rebuild it with `arrowvision index {dataset} --rebuild`") from None
        if index.ntotal != len(paths) or index.ntotal != meta["rows"] or index.d != meta["dim"]:
            raise IndexCorrupt(f"{folder}: {index.ntotal} vectors, {len(paths)} paths, meta says {meta['rows']}; "
                               f"rebuild it with `arrowvision index {dataset} --rebuild`")
        return cls(dataset, meta, index, paths, mmap)

    @property
    def rows(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def model_checksum(self) -> str:
        return self.meta["model_checksum"]

    def is_stale(self) -> bool:
        """True when the dataset's part files differ from the ones indexed (``embed`` added some)."""
        return [_part_record(p) for p in part_files(self.dataset)] != self.meta["parts"]

    # ------------------------------------------------------------------------ searching

    def search(self, query: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[tuple[float, str]]:
        """The ``k`` most similar images to ``query`` as (cosine, path), best first, ties by path."""
        return self.search_many(np.asarray(query, np.float32)[np.newaxis], k, nprobe)[0]

    def search_many(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[list[tuple[float, str]]]:
        if k < 1:
            raise ArrowVisionError(f"k must be >= 1, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ArrowVisionError(f"{self.dataset}: embeddings have dim {self.dim}, the query has {queries.shape[-1]}")
        if not np.isfinite(queries).all():
            raise ArrowVisionError("the query embedding has NaN or infinite values")
        queries = np.ascontiguousarray(l2_normalize(queries))
        fetch = min(self.rows, k + int(self.meta.get("duplicate_rows", 0)))  # a path held twice fills two slots
        params = None
        if self.kind == "ivf":
            params = _faiss().SearchParametersIVF(nprobe=int(nprobe or self.nprobe))
        scores, ids = self.index.search(queries, fetch, params=params)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            best: dict[str, float] = {}
            for score, row in zip(row_scores.tolist(), row_ids.tolist()):
                if row < 0:  # IVF: fewer than `fetch` vectors in the probed lists
                    continue
                path, score = self.paths[row], min(1.0, max(-1.0, score))  # float32 rounding: an image vs itself is 1.0
                best[path] = max(score, best.get(path, score))
            results.append(sorted(((s, p) for p, s in best.items()), key=lambda hit: (-hit[0], hit[1]))[:k])
        return results

    def __contains__(self, path: object) -> bool:
        return path in self.path_set


# ---------------------------------------------------------------------------- metadata


def read_meta(dataset: str | os.PathLike) -> dict[str, Any]:
    folder = index_folder(dataset)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise SearchIndexError(f"{dataset}: no index; build one with `arrowvision index {dataset}`") from None
    except (OSError, ValueError) as exc:
        raise IndexCorrupt(f"{folder}/meta.json: unreadable ({exc}); rebuild with `arrowvision index {dataset} --rebuild`") from None
    required = {"format_version", "kind", "rows", "dim", "model_checksum", "parts", "vectors_file", "paths_file", "generation"}
    if not isinstance(meta, dict) or not required <= meta.keys():
        raise IndexCorrupt(f"{folder}/meta.json: not an arrowvision index (missing {sorted(required - set(meta or {}))})")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexCorrupt(f"{folder}: index format {meta['format_version']}, this version reads {FORMAT_VERSION}; rebuild it")
    for name in ("vectors_file", "paths_file"):  # names inside the index folder only
        if not isinstance(meta[name], str) or Path(meta[name]).name != meta[name]:
            raise IndexCorrupt(f"{folder}/meta.json: bad {name} {meta[name]!r}")
    return meta


def _write_generation(dataset: Path, meta: dict[str, Any], index: Any, paths: list[str]) -> int:
    """Write vectors + paths as a new generation, then meta.json atomically; drop old generations."""
    faiss = _faiss()
    folder = index_folder(dataset)
    folder.mkdir(parents=True, exist_ok=True)
    generation = int(meta.get("generation", 0))
    meta["vectors_file"] = f"vectors-{generation:06d}.faiss"
    meta["paths_file"] = f"paths-{generation:06d}.parquet"
    with atomic_output(folder / meta["vectors_file"]) as tmp:
        faiss.write_index(index, tmp)
    with atomic_output(folder / meta["paths_file"]) as tmp:
        pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), tmp, compression="zstd")
    with atomic_output(folder / "meta.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))
    keep = {meta["vectors_file"], meta["paths_file"], "meta.json", ".lock"}
    for old in folder.iterdir():
        if old.name not in keep and (old.name.startswith(("vectors-", "paths-"))):
            old.unlink(missing_ok=True)
    return sum((folder / name).stat().st_size for name in (meta["vectors_file"], meta["paths_file"]))


def _lock(dataset: Path):
    from filelock import FileLock

    index_folder(dataset).mkdir(parents=True, exist_ok=True)
    return FileLock(str(index_folder(dataset) / ".lock"))


# ---------------------------------------------------------------------------- building


def _batches(parts: list[Path], dim: int) -> Iterator[tuple[list[str], np.ndarray]]:
    for part in parts:
        for paths, vectors in iter_embedding_batches(part):
            if vectors.shape[1] != dim:
                raise IndexCorrupt(f"{part}: embeddings have dim {vectors.shape[1]}, the dataset's first part {dim}")
            yield paths, np.ascontiguousarray(l2_normalize(vectors.astype(np.float32, copy=False)))


def _training_sample(parts: list[Path], dim: int, rows: int, want: int, seed: int = 0) -> np.ndarray:
    """About ``want`` rows drawn uniformly from the whole dataset in one streamed pass."""
    rng = np.random.default_rng(seed)
    keep = min(1.0, 1.1 * want / rows)  # a little over, so that the draw rarely falls short of `want`
    picked = [vectors[rng.random(len(vectors)) < keep] for _, vectors in _batches(parts, dim)]
    return np.ascontiguousarray(np.concatenate(picked)[:want])


def ivf_lists(rows: int) -> int:
    """sqrt(N) inverted lists: k-means on ~39 sqrt(N) rows (under a minute at 1M on 2 cores)."""
    return max(1, min(int(math.sqrt(rows)), rows // TRAIN_POINTS_PER_LIST))


def default_nprobe(lists: int) -> int:
    """Lists probed per query: 1/8 of them (at least 32): recall@10 >= 0.95 on the clustered 1M
    benchmark corpus (``benchmarks/search.py``), where probing 32 of 1000 reaches only 0.92."""
    return min(lists, max(DEFAULT_NPROBE, lists // 8))


def build(dataset: str | os.PathLike, *, exact_below: int = EXACT_BELOW, nlist: int | None = None,
          nprobe: int | None = None, progress: bool = False) -> IndexInfo:
    """(Re)build the index of ``dataset`` from scratch: exact (``IndexFlatIP``) below
    ``exact_below`` rows, IVF with ``nlist`` lists (default ``ivf_lists``) and float16 vectors
    above, probing ``nprobe`` lists per query (default ``default_nprobe``)."""
    dataset = Path(dataset)
    with _lock(dataset):
        return _build(dataset, exact_below=exact_below, nlist=nlist, nprobe=nprobe, progress=progress)


def _build(dataset: Path, *, exact_below: int, nlist: int | None, nprobe: int | None, progress: bool,
           generation: int | None = None) -> IndexInfo:
    from tqdm import tqdm

    faiss = _faiss()
    start = time.perf_counter()
    nprobe_given = nprobe  # kept for rebuilds: a default nprobe follows the corpus size
    parts = part_files(dataset)
    records = [_part_record(p) for p in parts]
    rows = sum(r["rows"] for r in records)
    dataset_meta = dataset_metadata(dataset)
    dim = pq.read_schema(parts[0]).field("embedding").type.list_size
    if generation is None:
        try:
            generation = int(read_meta(dataset)["generation"]) + 1
        except SearchIndexError:
            generation = 0
    kind = "exact" if rows < exact_below else "ivf"
    details: dict[str, Any] = {"exact_below": exact_below}
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        lists = nlist or ivf_lists(rows)
        nprobe = nprobe or default_nprobe(lists)
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        tick = time.perf_counter()
        index.train(_training_sample(parts, dim, rows, lists * TRAIN_POINTS_PER_LIST))
        details.update(nlist=lists, nprobe=nprobe, trained_rows=rows, train_seconds=round(time.perf_counter() - tick, 2))
    paths: list[str] = []
    bar = tqdm(total=rows, desc="indexing", unit="row", unit_scale=True, leave=False, disable=not progress)
    for batch_paths, vectors in _batches(parts, dim):
        index.add(vectors)
        paths += batch_paths
        bar.update(len(batch_paths))
    bar.close()
    meta = {
        "format_version": FORMAT_VERSION, "library": "faiss", "library_version": faiss.__version__,
        "kind": kind, "rows": len(paths), "duplicate_rows": len(paths) - len(set(paths)), "dim": dim,
        "model_checksum": dataset_meta.get("model_checksum", ""), "family": dataset_meta.get("family", ""),
        "sketch": dataset_meta.get("sketch") == "true", "parts": records, "generation": generation,
        **({"nlist": details["nlist"], "nprobe": nprobe, "trained_rows": rows, "vectors": "float16"} if kind == "ivf" else {}),
        "exact_below": exact_below, "nprobe_given": nprobe_given,
    }
    size = _write_generation(dataset, meta, index, paths)
    return IndexInfo(len(paths), kind, "built", len(paths), time.perf_counter() - start, size, str(index_folder(dataset)), details)


def update(dataset: str | os.PathLike, *, progress: bool = False) -> IndexInfo:
    """Bring an existing index up to date with its dataset: the part files ``embed`` added are
    appended (no retraining); a changed or removed part, a corpus that crossed the exact/IVF
    threshold, or one grown past ``RETRAIN_GROWTH`` x the IVF's training size is rebuilt."""
    dataset = Path(dataset)
    with _lock(dataset):
        start = time.perf_counter()
        meta = read_meta(dataset)
        parts = part_files(dataset)
        records = [_part_record(p) for p in parts]
        known = {r["name"]: r for r in meta["parts"]}
        new = [(p, r) for p, r in zip(parts, records) if r["name"] not in known]
        rebuild_options = {"exact_below": int(meta.get("exact_below", EXACT_BELOW)), "nlist": None,
                           "nprobe": meta.get("nprobe_given"), "progress": progress,
                           "generation": int(meta["generation"]) + 1}
        if any(known.get(r["name"], r) != r for r in records) or len(records) - len(new) != len(meta["parts"]):
            log.info("%s: indexed part files changed or vanished: rebuilding the index", dataset)
            return _build(dataset, **rebuild_options)
        if not new:
            folder = index_folder(dataset)
            size = sum((folder / meta[n]).stat().st_size for n in ("vectors_file", "paths_file"))
            return IndexInfo(meta["rows"], meta["kind"], "unchanged", 0, time.perf_counter() - start, size, str(folder))
        if dataset_metadata(dataset).get("model_checksum", "") != meta["model_checksum"]:
            raise IndexMismatch(f"{dataset}: the index holds another model's embeddings than the dataset; rebuild it")
        total = meta["rows"] + sum(r["rows"] for _, r in new)
        crosses = meta["kind"] == "exact" and total >= rebuild_options["exact_below"]
        outgrown = meta["kind"] == "ivf" and total > RETRAIN_GROWTH * meta.get("trained_rows", meta["rows"])
        if crosses or outgrown:
            return _build(dataset, **rebuild_options)
        opened = VectorIndex.open(dataset, mmap=False)
        paths = list(opened.paths)
        added = 0
        for batch_paths, vectors in _batches([p for p, _ in new], meta["dim"]):
            opened.index.add(vectors)
            paths += batch_paths
            added += len(batch_paths)
        meta.update(rows=len(paths), duplicate_rows=len(paths) - len(set(paths)), parts=records,
                    generation=int(meta["generation"]) + 1)
        size = _write_generation(dataset, meta, opened.index, paths)
        return IndexInfo(len(paths), meta["kind"], "updated", added, time.perf_counter() - start, size, str(index_folder(dataset)))


def build_or_update(dataset: str | os.PathLike, *, rebuild: bool = False, progress: bool = False, **options: Any) -> IndexInfo:
    """``arrowvision index``: a first build, an incremental update, or (``rebuild``) a fresh build."""
    if rebuild or not has_index(dataset):
        return build(dataset, progress=progress, **options)
    return update(dataset, progress=progress)


def search_dataset(dataset: str | os.PathLike, query: np.ndarray, k: int = 10, *, model_checksum: str | None = None,
                   use_index: bool = True, progress: bool = False, nprobe: int | None = None) -> list[tuple[float, str]]:
    """Top-k through the dataset's index when it has one (brought up to date first if ``embed``
    added chunks since), else the streamed scan of ``search.top_k``."""
    from .scan import top_k

    if not use_index or not has_index(dataset):
        return top_k(dataset, query, k, model_checksum=model_checksum, progress=progress)
    meta = read_meta(dataset)
    if model_checksum and meta["model_checksum"] and meta["model_checksum"] != model_checksum:
        log.warning("%s was embedded with model %s, the query with %s: scores are not comparable",
                    dataset, meta["model_checksum"][:19], model_checksum[:19])
    index = VectorIndex.open(dataset)
    if index.is_stale():
        try:
            info = update(dataset, progress=progress)
        except OSError as exc:  # a read-only dataset: answer exactly, by the scan
            log.warning("%s: the index is behind the dataset and cannot be updated (%s): scanning instead", dataset, exc)
            return top_k(dataset, query, k, model_checksum=model_checksum, progress=progress)
        log.info("%s: the index was behind the dataset: %s, %d rows added", dataset, info.action, info.added_rows)
        index = VectorIndex.open(dataset)
    return index.search(query, k, nprobe)
