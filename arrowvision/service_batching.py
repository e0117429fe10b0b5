"""One bad item fails only itself: the batch runner shared by every micro-batcher of the service
(images, texts) and by the Ray Serve model replicas.

A batched model call fails as a whole when one of its items is bad (a text the tokenizer cannot
encode, pixels of the wrong shape, anything). Handing that error to every request of the batch
lets one hostile client fail all the concurrent valid ones; instead the failed batch is split in
halves, recursively, until the failing items stand alone: a batch of 32 with one bad item costs
about 2·log2(32) = 10 extra calls, and only that item gets the exception.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


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
