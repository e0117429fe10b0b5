"""A vector index beside an embeddings dataset, on FAISS: exact below a size threshold, IVF-PQ with
exact re-ranking above, plus the delta segments of incremental updates.

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

How the IVF stores and scans vectors, measured at 1M x 768 (the ``benchmarks/search.py`` corpus:
1000 clusters, each a 16-dimensional spread, so neighbours are far apart: nearest cosine 0.74,
10th 0.61; recall@10 vs exact over 200 queries; CPU time of one query on one thread, which other
load on the machine does not inflate; 1000 lists, ranges over two or three k-means samples):

========================================  =======  ==============  ==============  ==============
index                                     size     nprobe 64       nprobe 125-128  nprobe 250
========================================  =======  ==============  ==============  ==============
float16 IVF, k-means on 39 rows a list    1.4 GiB  0.944 @ 15 ms   0.948-0.960     --
(format 1)                                                         @ 31-37 ms
IVF-PQ + float16 re-rank, 39 rows a list  1.5 GiB  0.928 @ 1.0 ms  0.948 @ 1.6 ms  0.956-0.981
                                                                                   @ 2.4 ms
IVF-PQ + float16 re-rank, 100 rows a list 1.5 GiB  0.972-0.976     0.982-0.984     0.988
(today)                                            @ 0.6-0.9 ms    @ 1.0-1.5 ms    @ 1.9-2.4 ms
========================================  =======  ==============  ==============  ==============

Two findings. The scan was the cost: format 1 read 1.5 KiB of float16 per row probed; 4-bit PQ
codes (``PQ192x4fs``: 96 bytes a row, FAISS's fast-scan SIMD kernels) read 16x less, and the best
100 candidates are then re-ranked exactly from the float16 rows (``refine-G.npy``, ~0.3 ms).
Re-ranking 50, 100 or 400 candidates gives the same recall: the lists probed decide it, not the codes.
What held recall back was the k-means sample: with 39 rows a list (FAISS's minimum) the lists cut
this corpus's clusters badly, and recall at a third of the lists probed ranged 0.967-0.988 from
one sample to the next; 100 rows a list (~30 s more k-means at 1M) gives 0.989-0.991 there and
0.988 at the default of a quarter (``build.default_nprobe``). Also measured, not kept: 500 lists
(0.947 at a quarter probed), 4096 lists under an HNSW coarse quantizer (0.857 at 1/8, 16 rows a
list), k-means++ initialisation (no better than random on a bad sample, 2x the training time).
Scores come from the float16 rows: within 2e-5 of the float32 cosine at 768 dims (an indexed photo
finds itself at 1.0). A memory-mapped index (``search``) reads only the candidates' rows of the
float16 matrix per query, advised random access; ``serve`` reads it into RAM.

Layout and crash safety: ``store``. Building, and adding ``embed``'s new chunks as delta segments
searched exactly beside the main index (folded in past ``DELTA_MAX_ROWS``): ``build``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..datasets.pipeline import part_files
from ..errors import ArrowVisionError, IndexCorrupt, IndexMismatch
from ..util.similarity import l2_normalize
from . import store
from .build import (  # noqa: F401  (the index's public API lives here)
    DELTA_MAX_ROWS,
    EXACT_BELOW,
    IndexInfo,
    _faiss,
    build,
    build_or_update,
    dataset_metadata,
    default_nprobe,
    ivf_lists,
    part_record,
    update,
)
from .store import FORMAT_VERSION, INDEX_DIR, has_index, index_folder, read_meta  # noqa: F401

log = logging.getLogger("arrowvision")

DEFAULT_NPROBE = 32  # format-1 indexes without a stored nprobe


def meta_flag(value: object) -> bool:
    """A yes/no of the index meta: a JSON bool, or the string ``"true"``/``"false"`` of older indexes."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


class VectorIndex:
    """An opened index: ``search`` answers cosine top-k, each path once, best first. The main index
    holds ``main_rows`` rows; the delta segments' rows (``delta``, float32) follow them."""

    def __init__(self, dataset: Path, meta: dict[str, Any], index: Any, paths: list[str], mmap: bool = False, *,
                 refine: np.ndarray | None = None, delta: np.ndarray | None = None, delta_paths: list[str] | None = None):
        self.dataset = dataset
        self.mmap = mmap
        self.meta = meta
        self.index = index
        self.main_paths = paths
        self.main_rows = len(paths)
        self.refine = refine
        self.delta = _faiss().IndexFlatIP(int(meta["dim"]))  # (FAISS, not numpy: a BLAS pool would spin per query)
        if delta is not None and len(delta):
            self.delta.add(delta)
        self.paths = paths + (delta_paths or [])
        self.path_set = frozenset(self.paths)
        self.duplicates = len(self.paths) - len(self.path_set)
        self.nprobe = int(meta.get("nprobe", DEFAULT_NPROBE))
        self.rerank = int(meta.get("rerank", 0))

    # ------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, dataset: str | os.PathLike, model_checksum: str | None = None, sketch: bool | None = None,
             mmap: bool = True, reuse: VectorIndex | None = None) -> VectorIndex:
        """Load the index of ``dataset``; with ``model_checksum`` refuse one built by another model
        (and, with ``sketch``, one of the other preprocessing) with ``IndexMismatch``. ``mmap``:
        map the float16 rows (and a format-1 IVF's lists) instead of reading them: a quick open for
        one-off searches (the CLI), which then read only the candidates' rows; a service reads them
        into RAM (``mmap=False``). ``reuse``: an open index of the same dataset whose main
        generation is kept if it is still the current one (only the delta segments are read)."""
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
        if reuse is not None and reuse.dataset == dataset and reuse.mmap == mmap and reuse.meta["vectors_file"] == meta["vectors_file"]:
            index, paths, refine = reuse.index, reuse.main_paths, reuse.refine
        else:
            index, paths, refine = cls._read_main(dataset, meta, mmap)
        delta, delta_paths = store.read_delta(dataset, meta)
        return cls(dataset, meta, index, paths, mmap, refine=refine, delta=delta, delta_paths=delta_paths)

    @staticmethod
    def _read_main(dataset: Path, meta: dict[str, Any], mmap: bool) -> tuple[Any, list[str], np.ndarray | None]:
        faiss = _faiss()
        folder = index_folder(dataset)
        refine = None
        try:
            flags = {"ivf": faiss.IO_FLAG_MMAP, "exact": faiss.IO_FLAG_MMAP_IFC}.get(meta["kind"], 0) if mmap else 0
            index = faiss.read_index(str(folder / meta["vectors_file"]), flags)  # ivfpq: the codes (1/8 of the rows) in RAM
            paths = store.read_paths(folder / meta["paths_file"])
            if meta["kind"] == "ivfpq":
                refine = store.load_rows(folder / meta["refine_file"], mmap)
        except (RuntimeError, OSError, ValueError, pa.ArrowException) as exc:
            raise IndexCorrupt(f"{folder}: cannot read the index ({exc}); rebuild it with `arrowvision index {dataset} --rebuild`") from None
        refine_ok = refine is None or (refine.dtype == np.float16 and refine.shape == (meta["rows"], meta["dim"]))
        if index.ntotal != len(paths) or index.ntotal != meta["rows"] or index.d != meta["dim"] or not refine_ok:
            raise IndexCorrupt(f"{folder}: {index.ntotal} vectors, {len(paths)} paths"
                               f"{'' if refine is None else f', {refine.shape[0]} float16 rows'}, meta says {meta['rows']}; "
                               f"rebuild it with `arrowvision index {dataset} --rebuild`")
        return index, paths, refine

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
        return [part_record(p) for p in part_files(self.dataset)] != self.meta["parts"]

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
        fetch = k + self.duplicates  # a path held twice fills two slots
        scores, ids = self._search_main(queries, min(fetch, self.main_rows), nprobe)
        if self.delta.ntotal:
            delta_scores, delta_ids = self.delta.search(queries, min(fetch, self.delta.ntotal))
            scores, ids = np.concatenate([scores, delta_scores], 1), np.concatenate([ids, delta_ids + self.main_rows], 1)
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

    def _search_main(self, queries: np.ndarray, fetch: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids) of the main index's best ``fetch`` rows per query, ids -1 where short."""
        if fetch < 1:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.kind == "exact":
            return self.index.search(queries, fetch)
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.nprobe))
        if self.kind == "ivf":  # format 1: float16 lists, scores as stored
            return self.index.search(queries, fetch, params=params)
        candidates = min(self.main_rows, max(self.rerank, fetch * self.rerank // 10))
        _, found = self.index.search(queries, candidates, params=params)
        return self._rerank(queries, found, fetch)

    def _rerank(self, queries: np.ndarray, found: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the PQ candidates from their float16 rows (within 2e-5 of float32)."""
        scores = np.full((len(queries), fetch), -np.inf, np.float32)
        ids = np.full((len(queries), fetch), -1, np.int64)
        for q, (query, row_ids) in enumerate(zip(queries, found)):
            rows = np.unique(row_ids[row_ids >= 0])  # sorted: a mapped matrix is read in file order
            exact = self.refine[rows].astype(np.float32) @ query
            best_scores, best = _top(exact[np.newaxis], min(fetch, len(rows)))
            scores[q, :best.shape[1]], ids[q, :best.shape[1]] = best_scores[0], rows[best[0]]
        return scores, ids

    def __contains__(self, path: object) -> bool:
        return path in self.path_set


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest scores of each row (unordered) and their column numbers."""
    if k >= scores.shape[1]:
        return scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(scores, best, 1), best


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
        index = VectorIndex.open(dataset, reuse=index)
    return index.search(query, k, nprobe)
