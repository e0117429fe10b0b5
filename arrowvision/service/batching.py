"""Dynamic micro-batching, and where the image model runs (no FastAPI here).

Requests are decoded in worker threads, then queued for the ``MicroBatcher``, which groups
whatever arrives within ``max_wait_ms`` (up to ``max_batch`` images) into one inference call run
off the event loop. The queue is bounded: when it is full ``submit`` raises ``QueueFull`` (503
with Retry-After) instead of letting latency grow without limit.

Where the model runs is pluggable (``ImageModel``): in this process (``LocalModel``, the
default), or in Ray Serve replicas (``arrowvision.distributed.serve``) behind the same routes.

One bad item fails only itself. A batched model call fails as a whole when one of its items is
bad (a text the tokenizer cannot encode, pixels of the wrong shape, anything); handing that error
to every request of the batch would let one hostile client fail all the concurrent valid ones.
``run_isolating_failures`` (every batcher here, and the Ray Serve replicas) bisects a failed batch
until the failing items stand alone: a batch of 32 with one bad item costs about 2·log2(32) = 10
extra calls, and only that item gets the exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from ..encoder import VisionEncoder
from .config import ServiceConfig


class QueueFull(Exception):
    """The queue of a batcher is full: the service answers 503 with Retry-After."""

    def __init__(self, message: str = "server busy: request queue is full"):
        super().__init__(message)


def run_isolating_failures(run: Callable[[np.ndarray], Any], items: Sequence[Any]) -> list[Any]:
    """``run(np.stack(items))`` split into one output per item; where a batch fails it is bisected,
    so each item gets its own output or the exception that its call (alone, at worst) raised."""
    try:
        outputs = run(np.stack(list(items)))
        if len(outputs) != len(items):
            raise ValueError(f"the model returned {len(outputs)} outputs for {len(items)} inputs")
        return list(outputs)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it belongs to some item(s) of this batch
        if len(items) == 1:
            return [exc]
        half = len(items) // 2
        return run_isolating_failures(run, items[:half]) + run_isolating_failures(run, items[half:])


class ItemFailed(Exception):
    """One item's failure as a plain, picklable value (a Ray Serve replica returns it in place of
    that item's output; the ingress raises it for that request only)."""

    def __init__(self, message: str):
        super().__init__(message)


def failure_of(exc: Exception) -> ItemFailed:
    return exc if isinstance(exc, ItemFailed) else ItemFailed(f"{type(exc).__name__}: {exc}")


class MicroBatcher:
    """Collects single images from concurrent requests into batches for one model call.

    A lone request runs at once (no added latency); under concurrency, whatever queued while
    the model was busy forms the next batch, topped up for at most ``max_wait_ms``."""

    def __init__(self, run, max_batch: int, max_wait_ms: float, max_queue: int, on_batch=None):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="arrowvision-infer")  # one model, one runner
        self.task: asyncio.Task | None = None
        self.in_flight = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Queue one preprocessed image; resolves to (embedding, inference seconds of its batch)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((pixels, future))
        except asyncio.QueueFull:
            raise QueueFull() from None
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():  # whatever queued up meanwhile
                batch.append(self.queue.get_nowait())
            if len(batch) > 1:  # concurrent traffic: give stragglers up to max_wait to join
                deadline = loop.time() + self.max_wait
                while len(batch) < self.max_batch and (remaining := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except TimeoutError:
                        break
            live = [(p, f) for p, f in batch if not f.cancelled()]  # timed-out requests drop out
            if not live:
                continue
            self.in_flight = len(live)
            start = time.perf_counter()
            try:  # a failing batch is bisected: one bad item fails only itself
                outputs = await loop.run_in_executor(self.executor, run_isolating_failures, self.run, [p for p, _ in live])
            finally:
                self.in_flight = 0
            seconds = time.perf_counter() - start
            self.on_batch(len(live), seconds)
            for (_, future), output in zip(live, outputs):
                if future.done():
                    continue
                if isinstance(output, Exception):
                    future.set_exception(output)
                else:
                    future.set_result((output, seconds))

    async def drain(self, timeout: float) -> None:
        """Wait until everything queued has been answered (graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while (not self.queue.empty() or self.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)


class ImageModel(Protocol):
    """Where the image model runs for the service: started (warmed up) by the app's lifespan,
    fed one preprocessed image per ``submit``, drained at shutdown."""

    async def start(self) -> None: ...  # raises if the model cannot embed (reported by /health)

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]: ...  # QueueFull, ModelUnavailable

    def queue_depth(self) -> int: ...

    def health(self) -> dict[str, Any]: ...  # extra /health fields; "ready": False makes it 503

    async def drain(self, timeout: float) -> None: ...


class LocalModel:
    """The model in this process, fed by a ``MicroBatcher`` (the default ``ImageModel``)."""

    def __init__(self, encoder: VisionEncoder, config: ServiceConfig, on_batch: Callable[[int, float], None]):
        self.encoder = encoder
        # run_prepared: uint8 rows for backends that normalize on their device (torch), else float32
        self.batcher = MicroBatcher(encoder.run_prepared, config.max_batch, config.max_wait_ms, config.max_queue, on_batch)

    def _warm_up(self) -> None:
        """One inference on a blank image: /health says the model is loaded only once it has
        actually produced an embedding of the right size (and OpenVINO has compiled it)."""
        size = self.encoder.config.image_size
        output = np.asarray(self.encoder.backend(np.zeros((1, self.encoder.config.num_channels, size, size), np.float32)))
        if output.shape != (1, self.encoder.embedding_dim):
            raise ValueError(f"warm-up produced shape {output.shape}, expected (1, {self.encoder.embedding_dim})")

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self._warm_up)
        finally:
            self.batcher.start()  # a failed warm-up still leaves a service that answers /health

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        return await self.batcher.submit(pixels)

    def queue_depth(self) -> int:
        return self.batcher.queue.qsize()

    def health(self) -> dict[str, Any]:
        return {}

    async def drain(self, timeout: float) -> None:
        await self.batcher.drain(timeout)
