"""Shared by benchmarks/gpu.py and gpu_e2e.py: the results document, printing, the time budget,
and the timing helpers (one module, so both see the same RESULTS)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RESULTS: dict = {"sections": {}}
START = time.perf_counter()


def say(*parts) -> None:
    print(*parts, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def save(out: str | None) -> None:
    if out:
        RESULTS["elapsed_s"] = round(elapsed(), 1)
        tmp = f"{out}.tmp"
        with open(tmp, "w") as handle:
            json.dump(RESULTS, handle, indent=2, default=str)
        os.replace(tmp, out)


def section(name: str, args) -> bool:
    """Start section ``name`` unless the time budget is spent."""
    if args.budget and elapsed() > args.budget:
        say(f"\n== {name}: skipped (budget of {args.budget:.0f} s spent, {elapsed():.0f} s elapsed)")
        RESULTS["sections"][name] = "skipped: budget"
        return False
    say(f"\n== {name} ({elapsed():.0f} s)")
    return True


# ----------------------------------------------------------------------------- timing


def rate(torch, device, run, batch: int, seconds: float, min_iters: int = 3) -> float:
    """img/s of ``run()`` (one batch) after warm-up, timed over >= ``seconds`` and >= ``min_iters`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        run()
    sync()
    iters, tick = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - tick < seconds:
        run()
        iters += 1
        if iters % 4 == 0 or iters >= min_iters:
            sync()
    sync()
    return batch * iters / (time.perf_counter() - tick)


def hf_model(torch, tf, folder: Path, device, dtype, attention: str = "sdpa"):
    model = tf.SiglipVisionModel.from_pretrained(folder, attn_implementation=attention)
    return model.to(device=device, dtype=dtype).eval()
