"""Writing a vector index: a full build, an incremental update into a delta segment, and folding the
delta segments into the main index.

A build trains and fills the main index in two streamed passes over the part files (a training
sample, then every row). An update after ``embed`` writes only the new rows, as a delta segment
(``store.write_delta``: ~3 MiB per 1024-row chunk at 768 dims) that queries search exactly beside
the main index; once the segments pass ``DELTA_MAX_ROWS`` they are folded into the main index (a new
generation: the main files rewritten once, not per chunk).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..datasets.pipeline import META_PREFIX, iter_embedding_batches, part_files
from ..errors import BackendError, IndexCorrupt, IndexMismatch, SearchIndexError
from ..util.fsutil import atomic_output
from ..util.similarity import l2_normalize
from . import store

log = logging.getLogger("arrowvision")

EXACT_BELOW = 50_000  # rows; exact search of 50k x 768 takes ~15 ms on 2 cores, the IVF-PQ ~2 ms
TRAIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per list: the fewest rows a list may have
KMEANS_POINTS_PER_LIST = 100  # the k-means sample: with 39 a list, recall@10 at 1/3 probed was 0.967-0.988
KMEANS_ITERATIONS = 10
DIMS_PER_SUBQUANTIZER = 4  # PQ192x4 at 768 dims: 96 bytes a row, scanned with fast-scan SIMD
RERANK = 100  # PQ candidates re-ranked exactly (float16 rows) for a top 10; k > 10 takes more
NPROBE_FRACTION = 4  # lists probed per query: 1/4 of them (at least 32)
MIN_NPROBE = 32
RETRAIN_GROWTH = 4.0  # an IVF trained on N rows is rebuilt once the corpus passes 4N
DELTA_MAX_ROWS = 8192  # delta rows searched exactly (~2 ms a query at 768 dims) before they are folded in
COPY_ROWS = 65_536  # rows per block when a fold copies the float16 matrix into the new generation


def _faiss():
    try:
        import faiss
    except ImportError:
        raise BackendError("the vector index needs FAISS: pip install 'arrowvision[search]' (faiss-cpu)") from None
    return faiss


@dataclass
class IndexInfo:
    """What ``build`` / ``update`` did, for the CLI's one-line report."""

    rows: int
    kind: str  # "exact", "ivfpq" (or "ivf", a format-1 index updated in place)
    action: str  # "built", "updated" (chunks added as a delta segment), "merged" (delta folded in) or "unchanged"
    added_rows: int = 0
    seconds: float = 0.0
    bytes: int = 0
    folder: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def dataset_metadata(dataset: Path) -> dict[str, str]:
    meta = pq.read_schema(part_files(dataset)[0]).metadata or {}
    return {k[len(META_PREFIX):].decode(): v.decode() for k, v in meta.items() if k.startswith(META_PREFIX)}


def part_record(part: Path) -> dict[str, Any]:
    return {"name": part.name, "rows": pq.read_metadata(part).num_rows, "bytes": part.stat().st_size}


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
    """sqrt(N) inverted lists (k-means on 100 sqrt(N) rows), at least ``TRAIN_POINTS_PER_LIST`` rows each."""
    return max(1, min(int(math.sqrt(rows)), rows // TRAIN_POINTS_PER_LIST))


def default_nprobe(lists: int) -> int:
    """Lists probed per query: 1/4 of them, at least 32: recall@10 0.988 on the 1M benchmark corpus
    (0.983 at 1/8; see the table in ``index``); 4-bit codes make a quarter of it a ~2 ms scan."""
    return min(lists, max(MIN_NPROBE, lists // NPROBE_FRACTION))


def subquantizers(dim: int) -> int:
    """PQ sub-vectors: the most that divide ``dim`` with at least ``DIMS_PER_SUBQUANTIZER`` dims each."""
    return max(m for m in range(1, max(1, dim // DIMS_PER_SUBQUANTIZER) + 1) if dim % m == 0)


def _new_ivfpq(dim: int, lists: int, sample: np.ndarray) -> Any:
    """An empty, trained IVF-PQ fast-scan index: k-means lists, 4-bit PQ codes of the rows."""
    faiss = _faiss()
    index = faiss.index_factory(dim, f"IVF{lists},PQ{subquantizers(dim)}x4fs", faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.pq.cp.min_points_per_centroid = 1  # small corpora: fewer rows than FAISS asks for 16 centroids, still fine
    if len(sample) < 256:  # 4-bit PQ trains 16 centroids per sub-vector: repeat a tiny sample to reach that
        sample = np.resize(sample, (256, dim))
    index.train(sample)
    return index


def _ivfpq_settings(rows: int, nlist: int | None, nprobe: int | None) -> dict[str, Any]:
    lists = nlist or ivf_lists(rows)
    return {"nlist": lists, "nprobe": nprobe or default_nprobe(lists), "rerank": RERANK, "trained_rows": rows}


def build(dataset: str | os.PathLike, *, exact_below: int = EXACT_BELOW, nlist: int | None = None,
          nprobe: int | None = None, progress: bool = False) -> IndexInfo:
    """(Re)build the index of ``dataset`` from scratch: exact (``IndexFlatIP``) below
    ``exact_below`` rows, ``ivfpq`` above: ``nlist`` lists (default ``ivf_lists``), ``nprobe`` of
    them probed per query (default ``default_nprobe``), PQ candidates re-ranked from float16 rows."""
    dataset = Path(dataset)
    with store.lock(dataset):
        return _build(dataset, exact_below=exact_below, nlist=nlist, nprobe=nprobe, progress=progress)


def _build(dataset: Path, *, exact_below: int, nlist: int | None, nprobe: int | None, progress: bool) -> IndexInfo:
    from tqdm import tqdm

    faiss = _faiss()
    start = time.perf_counter()
    parts = part_files(dataset)
    records = [part_record(p) for p in parts]
    rows = sum(r["rows"] for r in records)
    dataset_meta = dataset_metadata(dataset)
    dim = pq.read_schema(parts[0]).field("embedding").type.list_size
    try:
        generation = int(store.read_meta(dataset)["generation"]) + 1
    except SearchIndexError:
        generation = 0
    kind = "exact" if rows < exact_below else "ivfpq"
    meta: dict[str, Any] = {
        "library": "faiss", "library_version": faiss.__version__, "kind": kind, "dim": dim,
        "model_checksum": dataset_meta.get("model_checksum", ""), "family": dataset_meta.get("family", ""),
        "sketch": dataset_meta.get("sketch") == "true", "parts": records, "generation": generation,
        "exact_below": exact_below, "nprobe_given": nprobe, "nlist_given": nlist, "delta": [],
    }
    details: dict[str, Any] = {"exact_below": exact_below}
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        settings = _ivfpq_settings(rows, nlist, nprobe)
        tick = time.perf_counter()
        sample = _training_sample(parts, dim, rows, settings["nlist"] * KMEANS_POINTS_PER_LIST)
        index = _new_ivfpq(dim, settings["nlist"], sample)
        meta.update(settings, vectors="pq4 + float16", pq=f"PQ{subquantizers(dim)}x4fs")
        details.update(settings, train_seconds=round(time.perf_counter() - tick, 2))
    paths: list[str] = []
    bar = tqdm(total=rows, desc="indexing", unit="row", unit_scale=True, leave=False, disable=not progress)
    with _refine_output(dataset, meta, rows) as refine:
        for batch_paths, vectors in _batches(parts, dim):
            index.add(vectors)
            if refine is not None and len(paths) + len(vectors) <= rows:
                refine[len(paths):len(paths) + len(vectors)] = vectors
            paths += batch_paths
            bar.update(len(batch_paths))
        if len(paths) != rows:
            raise IndexCorrupt(f"{dataset}: the part files changed while indexing ({len(paths)} rows read, {rows} expected)")
    bar.close()
    meta.update(rows=len(paths), duplicate_rows=len(paths) - len(set(paths)))
    store.write_main(dataset, meta, index, paths)
    size = store.commit(dataset, meta)
    return IndexInfo(len(paths), kind, "built", len(paths), time.perf_counter() - start, size,
                     str(store.index_folder(dataset)), details)


@contextmanager
def _refine_output(dataset: Path, meta: dict[str, Any], rows: int) -> Iterator[np.memmap | None]:
    """``refine-G.npy`` of a new ``ivfpq`` generation: a float16 memmap to fill, renamed into place
    on success, removed on failure (``None`` for the other kinds)."""
    if meta["kind"] != "ivfpq":
        yield None
        return
    meta["refine_file"] = f"refine-{int(meta['generation']):06d}.npy"
    with atomic_output(store.index_folder(dataset) / meta["refine_file"]) as tmp:
        matrix = np.lib.format.open_memmap(tmp, "w+", np.float16, (rows, int(meta["dim"])))
        yield matrix
        matrix.flush()


def update(dataset: str | os.PathLike, *, progress: bool = False, delta_max_rows: int = DELTA_MAX_ROWS,
           merge: bool = False) -> IndexInfo:
    """Bring an existing index up to date with its dataset: the part files ``embed`` added become a
    delta segment (no retraining, the main index untouched), folded into the main index once the
    segments hold more than ``delta_max_rows`` (or now, with ``merge``); a changed or removed part,
    a corpus that crossed the exact/IVF threshold, or one grown past ``RETRAIN_GROWTH`` x the IVF's
    training size is rebuilt."""
    dataset = Path(dataset)
    with store.lock(dataset):
        start = time.perf_counter()
        meta = store.read_meta(dataset)
        parts = part_files(dataset)
        records = [part_record(p) for p in parts]
        known = {r["name"]: r for r in meta["parts"]}
        new = [p for p, r in zip(parts, records) if r["name"] not in known]
        rebuild = {"exact_below": int(meta.get("exact_below", EXACT_BELOW)), "nlist": meta.get("nlist_given"),
                   "nprobe": meta.get("nprobe_given"), "progress": progress}
        if any(known.get(r["name"], r) != r for r in records) or len(records) - len(new) != len(meta["parts"]):
            log.info("%s: indexed part files changed or vanished: rebuilding the index", dataset)
            return _build(dataset, **rebuild)
        if not new and not (merge and meta["delta"]):
            return IndexInfo(meta["rows"] + _delta_rows(meta), meta["kind"], "unchanged", 0, time.perf_counter() - start,
                             store.index_bytes(dataset, meta), str(store.index_folder(dataset)))
        if dataset_metadata(dataset).get("model_checksum", "") != meta["model_checksum"]:
            raise IndexMismatch(f"{dataset}: the index holds another model's embeddings than the dataset; rebuild it")
        total = meta["rows"] + _delta_rows(meta) + sum(pq.read_metadata(p).num_rows for p in new)
        crosses = meta["kind"] == "exact" and total >= rebuild["exact_below"]
        outgrown = meta["kind"] != "exact" and total > RETRAIN_GROWTH * meta.get("trained_rows", meta["rows"])
        if crosses or outgrown:
            return _build(dataset, **rebuild)
        batches = list(_batches(new, int(meta["dim"])))
        vectors = np.concatenate([v for _, v in batches]) if batches else np.zeros((0, int(meta["dim"])), np.float32)
        paths = [p for batch_paths, _ in batches for p in batch_paths]
        meta.update(parts=records, generation=int(meta["generation"]) + 1)
        if merge or _delta_rows(meta) + len(paths) > delta_max_rows:
            _fold(dataset, meta, vectors, paths)
            action = "merged"
        else:
            store.write_delta(dataset, meta, vectors, paths)
            action = "updated"
        size = store.commit(dataset, meta)
        return IndexInfo(meta["rows"] + _delta_rows(meta), meta["kind"], action, len(paths), time.perf_counter() - start,
                         size, str(store.index_folder(dataset)), {"delta_rows": _delta_rows(meta)})


def _delta_rows(meta: dict[str, Any]) -> int:
    return sum(int(segment["rows"]) for segment in meta.get("delta", []))


def _fold(dataset: Path, meta: dict[str, Any], vectors: np.ndarray, paths: list[str]) -> None:
    """Write a new main generation holding the main rows, every delta segment's and ``vectors``
    (the IVF's trained lists and codebooks kept); ``meta`` then names it, with no delta left."""
    faiss = _faiss()
    folder = store.index_folder(dataset)
    delta_vectors, delta_paths = store.read_delta(dataset, meta)
    extra = np.concatenate([delta_vectors, vectors])
    old_rows, old_refine = int(meta["rows"]), meta.get("refine_file")
    try:
        index = faiss.read_index(str(folder / meta["vectors_file"]))
        main_paths = store.read_paths(folder / meta["paths_file"])
        source = None if old_refine is None else np.load(folder / old_refine, mmap_mode="r", allow_pickle=False)
    except (RuntimeError, OSError, ValueError, pa.ArrowException) as exc:
        raise IndexCorrupt(f"{folder}: cannot read the main index to merge into ({exc}); "
                           f"rebuild it with `arrowvision index {dataset} --rebuild`") from None
    if index.ntotal != old_rows or len(main_paths) != old_rows or (source is not None and source.shape[0] != old_rows):
        raise IndexCorrupt(f"{folder}: the main index does not hold the {old_rows} rows meta.json says; "
                           f"rebuild it with `arrowvision index {dataset} --rebuild`")
    index.add(extra)
    all_paths = main_paths + delta_paths + paths
    with _refine_output(dataset, meta, len(all_paths)) as refine:
        if refine is not None:
            for first in range(0, old_rows, COPY_ROWS):
                stop = min(first + COPY_ROWS, old_rows)
                refine[first:stop] = source[first:stop]
            refine[old_rows:] = extra
    meta.update(rows=len(all_paths), duplicate_rows=len(all_paths) - len(set(all_paths)), delta=[])
    store.write_main(dataset, meta, index, all_paths)


def build_or_update(dataset: str | os.PathLike, *, rebuild: bool = False, merge: bool = False, progress: bool = False,
                    **options: Any) -> IndexInfo:
    """``arrowvision index``: a first build, an incremental update (``merge``: delta segments folded
    into the main index), or (``rebuild``) a fresh build."""
    if rebuild or not store.has_index(dataset):
        return build(dataset, progress=progress, **options)
    return update(dataset, progress=progress, merge=merge)
