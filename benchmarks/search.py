#!/usr/bin/env python3
"""Search at scale: the FAISS index (``arrowvision index``) vs the streamed scan of ``search``.

A synthetic, clustered corpus (not uniform noise, so that recall means something): ``--clusters``
centers, each point = its center + a 16-dimensional per-cluster spread + small isotropic noise,
L2-normalized (nearest neighbours at cosine ~0.74, the 10th at ~0.61, the median pair ~0). It is
written as a real embeddings dataset (Parquet part files, as ``embed`` writes them) once per
``--workdir`` (reused while the recipe is the same), indexed with the production code, and queried
with held-out points of the same distribution. Reported: build time, index size, recall@10 vs
exact for several ``nprobe`` values, query p50/p95/p99 and CPU time (one query at a time, 1 and 2
FAISS threads), memory, the same queries with the index opened the other way (memory-mapped vs in
RAM), the scan's p50 and the speed-up, then 1024-row chunks added as ``embed`` adds them (delta
segments), queries with the delta, the merge, and queries after it.

    python benchmarks/search.py --workdir /work/search-corpus            # 1M x 768, memory-mapped (`search`)
    python benchmarks/search.py --workdir /work/search-corpus --in-ram   # read into RAM, as `serve` holds it
    python benchmarks/search.py --rows 200000                            # what fits a busy machine quickly

Last runs (2026-12-05, the default 1M x 768, shared 2-core AMD EPYC with AVX-512/VNNI/BF16 at
load average 4.7-5.2 from other work, FAISS 1.15.1): Parquet written in 116 s (2.7 GiB); index
built in 112 s (k-means on 100k rows with its sampling pass 48-50 s), 1569 MiB on disk, 1000
lists, nprobe 250, PQ192x4fs + float16 re-ranking of 100 candidates. One thread per query:

======  =========  =============================  =============================
nprobe  recall@10  memory-mapped: p50, p99 (CPU)  in RAM: p50, p99 (CPU)
======  =========  =============================  =============================
64      0.976      0.9 ms, 4.7 ms (0.89 ms)       1.0 ms, 10.9 ms (0.95 ms)
128     0.984      1.4 ms, 1.5 ms (1.36 ms)       1.5 ms, 5.9 ms (1.54 ms)
250     0.988      2.5 ms, 14.3 ms (2.47 ms)      2.6 ms, 7.0 ms (2.51 ms)   (the default: 1/4 of the lists)
======  =========  =============================  =============================

p99s follow the machine's load. Opening: 0.3 s mapped (+165 MiB anonymous memory; the float16
rows stay in the page cache) vs 4.2 s read into RAM (+1680 MiB). The scan: 14-17 s a query.
Adding a 1024-row chunk: 0.05-0.13 s (a delta segment; the index was rewritten before, 8.5-13 s);
with 3072 delta rows a query costs 3.0-3.2 ms of CPU; folding the delta in: 4-5 s. Two FAISS
threads per query: the same p50 on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arrowvision.backends.cpu import cpu_info  # noqa: E402
from arrowvision.datasets.pipeline import META_PREFIX  # noqa: E402
from arrowvision.search import index as vindex  # noqa: E402
from arrowvision.search.scan import top_k  # noqa: E402

SPREAD_DIMS = 16


class Corpus:
    """Deterministic clustered vectors, generated chunk by chunk (1M x 768 never sits in memory twice)."""

    def __init__(self, dim: int, clusters: int, center_scale: float = 0.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centers = rng.standard_normal((clusters, dim), dtype=np.float32) * center_scale
        self.spreads = rng.standard_normal((clusters, SPREAD_DIMS, dim), dtype=np.float32) * 0.35

    def sample(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        which = rng.integers(0, len(self.centers), rows)
        latent = rng.standard_normal((rows, SPREAD_DIMS), dtype=np.float32)
        vectors = self.centers[which] + np.einsum("rl,rld->rd", latent, self.spreads[which], optimize=True)
        vectors += rng.standard_normal((rows, self.dim), dtype=np.float32) * 0.1
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_part(folder: Path, number: int, vectors: np.ndarray, first_row: int, schema: pa.Schema) -> None:
    paths = [f"/corpus/{first_row + i:08d}.jpg" for i in range(len(vectors))]
    table = pa.table({
        "path": paths, "relpath": paths,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        "width": pa.array(np.full(len(vectors), 224, np.int32)), "height": pa.array(np.full(len(vectors), 224, np.int32)),
        "sha256": pa.array([""] * len(vectors)),
    }, schema=schema)
    pq.write_table(table, folder / f"part-{number:05d}.parquet", compression="zstd")


def schema_for(dim: int) -> pa.Schema:
    meta = {META_PREFIX + k.encode(): v.encode() for k, v in {"model_checksum": "sha256:" + "5" * 64, "family": "siglip",
                                                             "dim": str(dim), "sketch": "false", "normalized": "true"}.items()}
    return pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("relpath", pa.string()),
                      pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False), pa.field("width", pa.int32()),
                      pa.field("height", pa.int32()), pa.field("sha256", pa.string())], metadata=meta)


def merge_top(best_scores, best_ids, scores, first_row, k):
    ids = np.broadcast_to(np.arange(first_row, first_row + scores.shape[1]), scores.shape)
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_ids = np.concatenate([best_ids, ids], axis=1)
    keep = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(all_scores, keep, 1), np.take_along_axis(all_ids, keep, 1)


def prepare_corpus(work: Path, args: argparse.Namespace, corpus: Corpus, queries: np.ndarray, k: int = 10):
    """The dataset and the queries' exact top-``k``: reused from ``work`` when a previous run wrote the
    same corpus there (``corpus.json`` records how; ``truth.npz`` the exact answers), else written."""
    dataset = work / "emb"
    recipe = {"rows": args.rows, "dim": args.dim, "clusters": len(corpus.centers), "center_scale": args.center_scale,
              "chunk_rows": args.chunk_rows, "queries": len(queries), "seed": 0}
    marker, truth_file = work / "corpus.json", work / "truth.npz"
    if marker.is_file() and truth_file.is_file() and json.loads(marker.read_text()) == recipe:
        shutil.rmtree(dataset / vindex.INDEX_DIR, ignore_errors=True)
        for extra in dataset.glob("part-9*.parquet"):  # the chunk a previous run's update test added
            extra.unlink()
        saved = np.load(truth_file)
        data_bytes = sum(p.stat().st_size for p in dataset.glob("part-*.parquet"))
        print(f"corpus: {args.rows:,} x {args.dim}, {recipe['clusters']} clusters, reused from {dataset} "
              f"({data_bytes / 2**30:.2f} GiB of Parquet)")
        return dataset, saved["truth"], saved["scores"], data_bytes
    marker.unlink(missing_ok=True)
    if dataset.exists():
        shutil.rmtree(dataset)
    dataset.mkdir(parents=True)
    rng = np.random.default_rng(1)
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    schema = schema_for(args.dim)
    tick = time.perf_counter()
    for number, first in enumerate(range(0, args.rows, args.chunk_rows)):
        vectors = corpus.sample(min(args.chunk_rows, args.rows - first), rng)
        write_part(dataset, number, vectors, first, schema)
        best_scores, best_ids = merge_top(best_scores, best_ids, queries @ vectors.T, first, k)
    order = np.argsort(-best_scores, axis=1)
    truth = np.take_along_axis(best_ids, order, 1)
    best_scores = np.take_along_axis(best_scores, order, 1)
    data_bytes = sum(p.stat().st_size for p in dataset.glob("part-*.parquet"))
    print(f"corpus: {args.rows:,} x {args.dim}, {recipe['clusters']} clusters; {data_bytes / 2**30:.2f} GiB of Parquet written "
          f"in {time.perf_counter() - tick:.0f} s")
    np.savez(truth_file, truth=truth, scores=best_scores)
    marker.write_text(json.dumps(recipe))
    return dataset, truth, best_scores, data_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="corpus size")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, help="default: rows / 1000")
    parser.add_argument("--center-scale", type=float, default=0.5, help="cluster centers vs spread: lower = overlapping clusters, harder")
    parser.add_argument("--queries", type=int, default=200, help="timed index queries (recall is averaged over them)")
    parser.add_argument("--scan-queries", type=int, default=3, help="queries timed on the streamed scan (slow)")
    parser.add_argument("--chunk-rows", type=int, default=32768, help="rows per part file")
    parser.add_argument("--nprobe", default="64,128,default", help="IVF lists probed, comma-separated ('default': the index's)")
    parser.add_argument("--threads", default="1,2", help="FAISS OpenMP threads per query, comma-separated")
    parser.add_argument("--in-ram", action="store_true", help="read the index into RAM, as `serve` does (default: map it, as `search`)")
    parser.add_argument("--workdir", help="where to write the dataset (default: a temp folder, removed after)")
    parser.add_argument("--add-chunks", type=int, default=3, help="1024-row chunks added (delta segments) after the queries")
    parser.add_argument("--corpus-only", action="store_true", help="write (or check) the corpus in --workdir and stop")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    cpu = cpu_info()
    import faiss

    print(f"cpu: {cpu.describe()}; {os.cpu_count()} logical cores; faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads); "
          f"load average {os.getloadavg()[0]:.1f} (other work on the machine inflates wall times; CPU times do not)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="arrowvision-search-bench-"))
    clusters = args.clusters or max(10, args.rows // 1000)
    corpus = Corpus(args.dim, clusters, args.center_scale)
    queries = corpus.sample(args.queries, np.random.default_rng(2))
    dataset, truth, best_scores, data_bytes = prepare_corpus(work, args, corpus, queries)
    print(f"nearest-neighbour cosine {best_scores[:, 0].mean():.3f}, 10th {best_scores[:, -1].mean():.3f}")
    if args.corpus_only:
        return 0
    k = 10
    schema = schema_for(args.dim)

    info = vindex.build(dataset)
    print(f"index: {info.kind} ({info.details}), built in {info.seconds:.1f} s, {info.bytes / 2**20:.0f} MiB")
    mode = "read into RAM (as `serve`)" if args.in_ram else "memory-mapped (as `search`)"
    rss_before, file_before = rss_mib(), rss_mib("RssFile")
    start = time.perf_counter()
    index = vindex.VectorIndex.open(dataset, mmap=not args.in_ram)
    open_seconds = time.perf_counter() - start
    print(f"index opened in {open_seconds:.2f} s, {mode}; anonymous RSS +{rss_mib() - rss_before:.0f} MiB")
    results = {"open_seconds": open_seconds, "cpu": cpu.describe(), "rows": args.rows, "dim": args.dim, "clusters": clusters,
               "kind": info.kind, "in_ram": args.in_ram, "build_seconds": info.seconds, "details": info.details,
               "index_bytes": info.bytes, "dataset_bytes": data_bytes, "runs": []}
    probes = [index.nprobe if p == "default" else int(p) for p in args.nprobe.split(",")] if info.kind != "exact" else [None]
    index.search(queries[0], k)  # warm-up
    for threads, nprobe in [(t, p) for t in map(int, args.threads.split(",")) for p in probes]:
        run = measure(index, queries, truth, k, nprobe, threads)
        results["runs"].append(run)
        report(run, "")
    results["rss_mib_after_queries"] = rss_mib() - rss_before
    results["rss_file_mib_after_queries"] = rss_mib("RssFile") - file_before
    print(f"after the queries: anonymous RSS +{results['rss_mib_after_queries']:.0f} MiB, mapped file pages "
          f"+{results['rss_file_mib_after_queries']:.0f} MiB (page cache: shared, reclaimable; the kernel maps "
          "~64 KiB around each row read) over the process before opening")
    faiss.omp_set_num_threads(1)
    peer = vindex.VectorIndex.open(dataset, mmap=args.in_ram)  # the other way of opening, in the same run
    peer.search(queries[0], k)
    results["peer"] = measure(peer, queries, truth, k, None, 1)
    report(results["peer"], f"  ({'memory-mapped' if args.in_ram else 'read into RAM'}, the other way of opening)")
    del peer

    scan = []
    for query in queries[: args.scan_queries]:
        start = time.perf_counter()
        top_k(dataset, query, k)
        scan.append(time.perf_counter() - start)
    default = min((r for r in results["runs"] if r["nprobe"] in (None, index.nprobe)), key=lambda r: r["p50_ms"])
    results["scan_p50_ms"] = 1000 * float(np.median(scan))
    results["speedup_at_default_nprobe"] = results["scan_p50_ms"] / default["p50_ms"]
    print(f"scan (search without an index): p50 {results['scan_p50_ms']:.0f} ms over {len(scan)} queries; "
          f"index at the default nprobe {index.nprobe} ({default['threads']} thread(s)): "
          f"{results['speedup_at_default_nprobe']:.0f}x faster")

    add_chunks(results, args, dataset, corpus, queries, best_scores, truth, schema, index, k)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(work)
    return 0


def rss_mib(field: str = "RssAnon") -> float:
    """Resident memory of this process (MiB): ``RssAnon`` is its own; ``RssFile`` counts mapped file pages
    (the page cache, shared and reclaimable)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(index, queries, truth, k, nprobe, threads) -> dict:
    """Single-query latency (wall and CPU time, one query at a time) and recall@k against ``truth``."""
    import faiss

    faiss.omp_set_num_threads(threads)
    times, cpu_times, recalls = [], [], []
    for query, expected in zip(queries, truth):
        start, cpu_start = time.perf_counter(), time.process_time()
        hits = index.search(query, k, nprobe=nprobe)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        recalls.append(len({int(p[8:16]) for _, p in hits} & set(expected.tolist())) / k)
    return {"threads": threads, "nprobe": nprobe or index.nprobe, "recall_at_10": float(np.mean(recalls)),
            "p50_ms": 1000 * float(np.percentile(times, 50)), "p95_ms": 1000 * float(np.percentile(times, 95)),
            "p99_ms": 1000 * float(np.percentile(times, 99)), "cpu_p50_ms": 1000 * float(np.percentile(cpu_times, 50))}


def report(run: dict, note: str) -> None:
    print(f"  {run['threads']} thread(s), nprobe {run['nprobe'] or '-':>3}: recall@10 {run['recall_at_10']:.4f}  "
          f"p50 {run['p50_ms']:6.2f} ms  p95 {run['p95_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  "
          f"(CPU time p50 {run['cpu_p50_ms']:6.2f} ms){note}")


def add_chunks(results, args, dataset, corpus, queries, best_scores, truth, schema, index, k) -> None:
    """What ``embed`` adding 1024-row chunks costs: each a delta segment; queries with the delta; the fold."""
    rng = np.random.default_rng(3)
    seconds = []
    for number in range(args.add_chunks):
        extra = corpus.sample(1024, rng)
        first = args.rows + 1024 * number
        write_part(dataset, 99000 + number, extra, first, schema)
        best_scores, truth = merge_top(best_scores, truth, queries @ extra.T, first, k)
        update = vindex.update(dataset)
        seconds.append(update.seconds)
        print(f"add a 1024-row chunk: {update.action} in {update.seconds:.2f} s ({update.details})")
    results["chunk_add_seconds"] = seconds
    order = np.argsort(-best_scores, axis=1)
    truth = np.take_along_axis(truth, order, 1)
    with_delta = vindex.VectorIndex.open(dataset, mmap=not args.in_ram, reuse=index)
    results["with_delta"] = measure(with_delta, queries, truth, k, None, 1)
    report(results["with_delta"], f"  (with {with_delta.delta.ntotal} delta rows)")
    merged = vindex.update(dataset, merge=True)
    results["merge_seconds"] = merged.seconds
    print(f"merge the delta into the main index (`index --merge`, or when it passes {vindex.DELTA_MAX_ROWS} rows): "
          f"{merged.seconds:.1f} s")
    after = vindex.VectorIndex.open(dataset, mmap=not args.in_ram)
    results["after_merge"] = measure(after, queries, truth, k, None, 1)
    report(results["after_merge"], "  (after the merge)")


if __name__ == "__main__":
    sys.exit(main())
