"""Decoded uint8 batches for a model, from a pool that cannot starve the thread that runs it.

Decoding runs in worker *processes* (forked) when the model runs on a GPU: there the model thread
launches hundreds of kernels per batch and each launch needs the GIL, which a pool of Python
decoding threads keeps taking (measured: 16 threads held a GPU at 6% while "model busy" read
88%). Workers write (S, S, 3) uint8 rows straight into a ring of shared-memory batch slots and
return only metadata (size, sha256, error). On a CPU backend, threads (Pillow releases the GIL;
the backends compute without it) as before.

``Feeder.batches`` keeps ``depth`` batches in flight, so decoding of the next ones overlaps
whatever the caller does with the current one. A yielded batch's pixels are a view of its slot:
the caller copies them (to the device, or to float32) before asking for the next batch.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decode import (
    Decoded,
    check_mode,
    decode_rows,
    decode_rows_copied,
    decode_rows_shared,
    row_mode,
)
from ..errors import ArrowVisionError
from .preprocess import Preprocessor

POOLS = ("auto", "thread", "process")


@dataclass
class FedBatch:
    items: list[Decoded]  # every input of the batch, in order; failed ones have .error
    pixels: np.ndarray  # (n_decoded, S, S, 3) uint8: the rows of items that have pixels, in order
    decoded: list[Decoded]  # the items whose pixels those are
    jpegs: list[Decoded]  # gpu mode: items left to the GPU decoder (item.jpeg holds the bytes)


def process_context():
    """fork where there is one, as torch's DataLoader does: workers start at once, already holding
    arrowvision, and never import the caller's main module (spawn would, and an unguarded
    script would then start itself again). They touch neither CUDA nor torch, so a parent that
    initialized CUDA is safe to fork. Elsewhere spawn."""
    import multiprocessing

    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


class Feeder:
    """``batches(paths)`` -> FedBatch per ``batch_size`` paths, decoded by ``workers`` threads or processes."""

    def __init__(self, preprocessor: Preprocessor, *, batch_size: int, workers: int = 2, mode: str = "exact",
                 transform: Callable | None = None, pool: str = "thread", depth: int = 3, cpu_share: float = 0.0):
        if pool not in ("thread", "process"):
            raise ArrowVisionError(f"decode pool {pool!r}: choose thread or process")
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.workers = max(1, workers)
        self.mode = check_mode(mode)
        self.transform = transform
        self.cpu_share = cpu_share  # gpu mode: the share of rows the workers decode (fast) instead of the GPU
        self.pool_kind = pool
        self.depth = max(2, depth)
        size = preprocessor.image_size
        self.row_shape = (size, size, 3)
        self.task_rows = max(1, min(32, math.ceil(batch_size / self.workers)))  # rows per task: every worker busy

    def batches(self, paths: list[str], stop: Callable[[], bool] = lambda: False) -> Iterator[FedBatch]:
        """Decoded batches of ``paths`` in order; ``stop()`` true ends it after the current batch."""
        starts = list(range(0, len(paths), self.batch_size))
        if not starts:
            return
        slots = min(self.depth, len(starts))
        shape = (slots * self.batch_size, *self.row_shape)
        block = None
        executor: Executor
        copied = self.pool_kind == "process" and not shared_memory_fits(int(np.prod(shape)))
        if self.pool_kind == "process" and not copied:
            from multiprocessing import shared_memory

            block = shared_memory.SharedMemory(create=True, size=max(1, int(np.prod(shape))))
            target = np.ndarray(shape, dtype=np.uint8, buffer=block.buf)
            executor = ProcessPoolExecutor(self.workers, mp_context=process_context())
        elif copied:
            target = np.empty(shape, dtype=np.uint8)
            executor = ProcessPoolExecutor(self.workers, mp_context=process_context())
        else:
            target = np.empty(shape, dtype=np.uint8)
            executor = ThreadPoolExecutor(self.workers)
        pending: deque[tuple[int, list[str], list[Future]]] = deque()
        pixels: np.ndarray | None = None

        def submit(index: int) -> None:
            slot = index % slots
            chunk = paths[starts[index] : starts[index] + self.batch_size]
            first = slot * self.batch_size
            jobs = [(first + row, path, row_mode(self.mode, starts[index] + row, self.cpu_share))
                    for row, path in enumerate(chunk)]
            futures = []
            for i in range(0, len(jobs), self.task_rows):
                part = jobs[i : i + self.task_rows]
                if block is not None:
                    futures.append(executor.submit(decode_rows_shared, block.name, shape, part, self.preprocessor,
                                                   self.transform))
                elif copied:
                    futures.append(executor.submit(decode_rows_copied, shape, part, self.preprocessor, self.transform))
                else:
                    futures.append(executor.submit(decode_rows, target, part, self.preprocessor, self.transform))
            pending.append((slot, chunk, futures))

        try:
            for index in range(slots):
                submit(index)
            next_index = slots
            while pending:
                slot, _chunk, futures = pending.popleft()
                items = []
                for future, first in zip(futures, range(slot * self.batch_size, len(target), self.task_rows)):
                    result = future.result()  # a dead worker raises here
                    if copied:
                        result, rows_back = result
                        target[first : first + len(rows_back)] = rows_back
                    items += result
                rows = [slot * self.batch_size + i for i, item in enumerate(items) if not item.error and item.jpeg is None]
                decoded = [item for item in items if not item.error and item.jpeg is None]
                jpegs = [item for item in items if item.jpeg is not None]
                if len(rows) == len(items):
                    pixels = target[rows[0] : rows[0] + len(rows)] if rows else target[:0]
                else:
                    pixels = target[rows]  # a copy holding only the decoded rows
                yield FedBatch(items, pixels, decoded, jpegs)
                # the caller is done with this slot's pixels: decode the batch after next into it
                if next_index < len(starts) and not stop():
                    submit(next_index)
                    next_index += 1
        finally:
            for _slot, _chunk, futures in pending:
                for future in futures:
                    future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
            if block is not None:
                pixels = target = None  # drop our views of the block before closing it
                try:
                    block.close()
                except BufferError:  # the caller still holds a view: the mapping goes with it
                    pass
                block.unlink()


def shared_memory_fits(nbytes: int) -> bool:
    """Room for ``nbytes`` of shared memory (with slack)? Containers often mount a 64 MiB /dev/shm,
    and writing past it kills the worker with SIGBUS."""
    try:
        status = os.statvfs("/dev/shm")
    except OSError:  # no /dev/shm (macOS, Windows): shared memory lives elsewhere
        return True
    return status.f_bavail * status.f_frsize >= 2 * nbytes


def choose_pool(pool: str, device: Any) -> str:
    """``auto``: processes when the model runs on a GPU (its launching thread needs the GIL), threads otherwise."""
    if pool not in POOLS:
        raise ArrowVisionError(f"decode pool {pool!r}: choose from {', '.join(POOLS)}")
    if pool != "auto":
        return pool
    return "process" if str(device).lower().startswith("cuda") else "thread"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
