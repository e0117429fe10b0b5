"""Corpus embedding on Ray Data: ``arrowvision embed INPUTS -o OUT --engine ray [--address ADDR]``.

The input paths are split into blocks and streamed through an actor pool
(``Dataset.map_batches`` with a callable class): each actor loads the model once, with as many
inference threads as CPUs Ray gave it (OpenVINO's ``INFERENCE_NUM_THREADS``; it ignores
``OMP_NUM_THREADS``), then reads and decodes every row itself, so one corrupt file is one error
row, never a failed block. Only embeddings travel back. The driver writes them through the same
``EmbeddingWriter`` as the local engine, so both engines produce, and resume, the same dataset.

A killed actor costs a retry, not data: Ray Data's actor pools restart a dead actor
(``max_restarts=-1``) and re-run its unfinished block (``max_task_retries=-1``), their defaults;
a block's rows reach the driver only from the attempt that finished, and ``ChunkBuffer`` drops
any path it has already seen.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from ..datasets.pipeline import EmbedStats, _Item, identity, relpath_function
from ..datasets.writer import ChunkBuffer, EmbeddingWriter, dataset_metadata, plan
from ..errors import ArrowVisionError
from ..util.interrupts import stop_on_signals
from ..util.progress import progress_bar
from . import connect, threads_option

MAX_BLOCKS = 20_000  # blocks per run: bounds the driver's bookkeeping for very large corpora


@dataclass
class RayEmbedStats(EmbedStats):
    actors: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node -> inputs processed there
    workers: dict[str, int] = field(default_factory=dict)  # "node/pid" -> inputs (a restarted actor is a new pid)
    actor_start_seconds: float = 0.0  # slowest model load in an actor
    threads: list[int] = field(default_factory=list)  # inference threads seen in the actors (sorted, unique)
    working_seconds: float = 0.0  # first batch started .. last batch ended, in the actors (no start-up)
    node_names: dict[str, str] = field(default_factory=dict)  # node id -> its address

    def summary_lines(self) -> list[str]:
        """What the CLI prints after its usual line: the pool and where the work ran."""
        per_node = ", ".join(f"{self.node_names.get(node, '?')} ({node[:8]}) {count}"
                             for node, count in sorted(self.nodes.items(), key=lambda item: -item[1]))
        working = f"; {self.embedded / self.working_seconds:.1f} img/s once started" if self.working_seconds else ""
        threads = "/".join(map(str, self.threads)) or "?"
        lines = [f"ray: {self.actors} actors ({len(self.workers)} actor processes, {threads} inference threads each), model load "
                 f"{self.actor_start_seconds:.1f} s at most{working}"]
        return lines + ([f"per node: {per_node}"] if per_node else [])


class EmbedActor:
    """One model per actor; ``__call__`` embeds one batch of paths (numpy batch format)."""

    def __init__(self, weights: str, backend: str, device: str, options: dict[str, Any], sketch: bool, normalize: bool):
        import ray

        from ..encoder import VisionEncoder
        from ..inputs.preprocess import normalize_sketch_image

        started = time.perf_counter()
        context = ray.get_runtime_context()
        self.threads = max(1, int(context.get_assigned_resources().get("CPU", 1)))
        options = {**options, **threads_option(backend, self.threads)}  # threads = the CPUs Ray gave us
        self.encoder = VisionEncoder.from_parquet(weights, backend=backend, device=device, **options)
        self.inference_threads = self.encoder.backend.inference_threads() or self.threads
        self.transform = normalize_sketch_image if sketch else None
        self.normalize = normalize
        self.node = context.get_node_id()
        self.pid = os.getpid()
        self.decoder = ThreadPoolExecutor(self.threads, thread_name_prefix="arrowvision-decode")
        self.load_seconds = time.perf_counter() - started

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..datasets.pipeline import _decode
        from ..util.similarity import l2_normalize

        began = time.time()
        preprocess = self.encoder.prepare  # uint8 rows, float32 pixels or NaFlex records, as run_prepared takes
        items = list(self.decoder.map(lambda p: _decode(str(p), preprocess, self.transform), batch["path"]))
        vectors = np.zeros((len(items), self.encoder.embedding_dim), np.float32)
        ok = [i for i, item in enumerate(items) if not item.error]
        if ok:
            start = time.perf_counter()
            output = self.encoder.run_prepared(np.stack([items[i].pixels for i in ok]))
            inference = time.perf_counter() - start
            vectors[ok] = l2_normalize(output) if self.normalize else output
        else:
            inference = 0.0
        n = len(items)
        return {
            "path": np.array([item.path for item in items], dtype=object),
            "embedding": vectors,
            "width": np.array([item.width for item in items], np.int32),
            "height": np.array([item.height for item in items], np.int32),
            "sha256": np.array([item.digest for item in items], dtype=object),
            "error": np.array([item.error for item in items], dtype=object),
            "node": np.array([self.node] * n, dtype=object),
            "pid": np.full(n, self.pid, np.int64),
            "inference_seconds": np.full(n, inference / max(n, 1)),
            "load_seconds": np.full(n, self.load_seconds),
            "threads": np.full(n, self.inference_threads, np.int32),
            "began": np.full(n, began),  # wall clock: the run's working span, start-up left out
            "ended": np.full(n, time.time()),
        }


def describe_model(weights: str) -> Any:
    """Checksum, config and dimension of ``weights`` without building a backend on the driver."""
    from ..model.config import VisionConfig
    from ..weights.format import WeightLoader

    from ..inputs.naflex import DEFAULT_MAX_PATCHES

    loader = WeightLoader(weights)
    config = VisionConfig.from_weights(loader)
    budget = DEFAULT_MAX_PATCHES if config.naflex else None  # what the actors' encoders use
    return SimpleNamespace(checksum=loader.checksum, config=config, embedding_dim=config.embedding_dim, max_num_patches=budget)


def embed_paths_ray(
    weights: str | os.PathLike,
    paths: list[str],
    output: str | os.PathLike,
    *,
    backend: str = "openvino",
    device: str = "CPU",
    backend_options: dict[str, Any] | None = None,
    batch_size: int = 32,
    chunk_size: int = 1024,
    actors: int | None = None,
    cpus_per_actor: float = 1,
    sketch: bool = False,
    normalize: bool = True,
    root: str | os.PathLike | None = None,
    skip_failed: bool = False,
    progress: bool = True,
    address: str | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> RayEmbedStats:
    """``pipeline.embed_paths`` on a Ray cluster: the same dataset, resumable by either engine.

    ``actors``: the pool size (default: the cluster's CPUs / ``cpus_per_actor``); ``address``:
    an existing cluster (default $RAY_ADDRESS, else a local one is started). ``on_batch`` sees
    every batch as it comes back (tests use it; the summary uses ``node``/``pid``)."""
    if batch_size < 1 or chunk_size < 1:
        raise ArrowVisionError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    if cpus_per_actor <= 0 or (actors is not None and actors < 1):
        raise ArrowVisionError(f"cpus_per_actor must be > 0 and actors >= 1, got {cpus_per_actor} and {actors}")
    weights = str(Path(weights).resolve())
    model = describe_model(weights)
    metadata = dataset_metadata(model, sketch=sketch, normalize=normalize)
    with EmbeddingWriter(output, model.embedding_dim, metadata) as writer:  # the folder is this run's until it returns
        chunks = ChunkBuffer(writer, chunk_size, relpath_function(root))
        stats = RayEmbedStats()
        paths = list(dict.fromkeys(identity(p) for p in paths))
        work = plan(writer, paths, skip_failed)
        stats.skipped, stats.errors, stats.failed = work.skipped, work.prior_errors, len(work.prior_errors)
        start_time = time.perf_counter()
        if not work.todo:
            return stats
        ray = connect(address)
        from ray.data import ActorPoolStrategy, DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False  # our own bar below, on the driver
        context.print_on_execution_start = False
        cluster_cpus = ray.cluster_resources().get("CPU", 1)
        batches_needed = math.ceil(len(work.todo) / batch_size)
        on_gpu = str(device).lower().startswith("cuda")  # one GPU per actor: more GPUs, more actors
        default_actors = int(ray.cluster_resources().get("GPU", 0)) if on_gpu else int(cluster_cpus // cpus_per_actor)
        stats.actors = max(1, min(actors or default_actors or 1, batches_needed))
        dataset = _paths_dataset(ray, work.todo, batch_size, stats.actors).map_batches(
            EmbedActor,
            fn_constructor_kwargs=dict(weights=weights, backend=backend, device=device, options=backend_options or {},
                                       sketch=sketch, normalize=normalize),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=stats.actors),
            num_cpus=cpus_per_actor,
            **({"num_gpus": 1} if on_gpu else {}),
        )
        stop = stop or threading.Event()
        span = [float("inf"), 0.0]
        nodes: Counter = Counter()
        workers: Counter = Counter()
        bar = progress_bar(len(work.todo), progress, desc="embedding (ray)", unit="img")
        processed = 0
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
        try:
            with stop_on_signals(stop, say=lambda message: bar.write(message, file=sys.stderr)):
                for batch in batches:
                    if on_batch is not None:
                        on_batch(batch)
                    good, bad = chunks.add(_rows(batch))
                    stats.count(good, bad)
                    fresh = {row.path for row in good} | {row.path for row in bad}
                    for path, node, pid, seconds, load in zip(batch["path"], batch["node"], batch["pid"],
                                                              batch["inference_seconds"], batch["load_seconds"]):
                        if path in fresh:
                            nodes[str(node)] += 1
                            workers[f"{node}/{pid}"] += 1
                            stats.inference_seconds += float(seconds)
                            stats.actor_start_seconds = max(stats.actor_start_seconds, float(load))
                    stats.threads = sorted(set(stats.threads) | {int(t) for t in batch["threads"]})
                    span = [min(span[0], float(batch["began"].min())), max(span[1], float(batch["ended"].max()))]
                    processed += len(fresh)
                    bar.update(len(fresh))
                    if stop.is_set():
                        break
                stats.interrupted = stop.is_set() and processed < len(work.todo)
                chunks.flush()
        except ray.exceptions.RayError as exc:  # e.g. the actors cannot load the model on some node
            chunks.flush()  # keep every finished row
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ArrowVisionError(f"the Ray job failed ({type(exc).__name__}: {reason}); "
                                   "finished chunks are kept, rerun to resume") from None
        finally:
            bar.close()
            if hasattr(batches, "close"):
                batches.close()  # a stopped run: shut the executor and its actors down now
        stats.nodes, stats.workers = dict(nodes), dict(workers)
        stats.working_seconds = max(0.0, span[1] - span[0])
        stats.node_names = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        stats.seconds = time.perf_counter() - start_time
        return stats


def _paths_dataset(ray: Any, todo: list[str], batch_size: int, actors: int) -> Any:
    """The paths as Arrow blocks of whole batches: at least a few blocks per actor (so work
    spreads and a retry redoes little), at most MAX_BLOCKS."""
    batches = math.ceil(len(todo) / batch_size)
    per_block = max(1, min(8, batches // (4 * actors)), math.ceil(batches / MAX_BLOCKS)) * batch_size
    blocks = math.ceil(len(todo) / per_block)
    return ray.data.from_items([{"path": path} for path in todo], override_num_blocks=blocks)


def _rows(batch: dict[str, np.ndarray]) -> list[_Item]:
    """A returned batch as the writer's rows."""
    rows = []
    for i, path in enumerate(batch["path"]):
        error = str(batch["error"][i] or "")
        row = _Item(str(path), None, int(batch["width"][i]), int(batch["height"][i]), str(batch["sha256"][i] or ""), error)
        row.embedding = None if error else batch["embedding"][i]
        rows.append(row)
    return rows
