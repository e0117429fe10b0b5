#!/usr/bin/env python3
"""Time to full speed of a new process running the compiled torch backend (issue 26).

Starts the same program twice, one after the other, on one fresh arrowvision cache: process 1
compiles from nothing and keeps torch.compile's artifacts there; process 2 is a new process that
finds them (arrowvision.backends.compile_cache). Each process gets its own empty Inductor and
Triton folders, so whatever process 2 does not compile comes from our cache only. Each reports:

- ``ready_s``: from its spawn to the end of its first compiled call (interpreter, imports, loading
  the weights, the half-precision validation or its cached report, compiling or loading);
- ``import_s``, ``load_s``, ``first_call_s``: the parts of that;
- ``full_speed_s``: from its spawn to the end of the first call that took <= 1.5x the steady
  time (``steady_ms``, the median of calls 3 and on); ``second_call_ms`` beside it;
- torch's cache counters (FX-graph and AOTAutograd hits / misses).

    PYTHONPATH=. python3 benchmarks/compile_start.py WEIGHTS.parquet --device cuda --batch 256
    PYTHONPATH=. python3 benchmarks/compile_start.py WEIGHTS.parquet --device cpu --batch 2 --precision fp32  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One process: load, first compiled call, then steady calls; prints one JSON line."""
    spawned = args.spawned
    tick = time.time()
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT))
    from arrowvision import VisionEncoder

    imported = time.time()
    encoder = VisionEncoder.from_parquet(args.weights, backend="torch", device=args.device, precision=args.precision,
                                         compile=True, fused=args.fused, cuda_graphs=args.cuda_graphs or None)
    backend = encoder.backend
    loaded = time.time()
    size = backend.config.image_size
    x = torch.randn(args.batch, 3, size, size, device=backend.device, dtype=backend.dtype)
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    timings = []
    with torch.inference_mode():
        for _ in range(args.calls):
            start = time.perf_counter()
            backend._run(x)
            sync()
            timings.append(time.perf_counter() - start)
            if len(timings) == 1:
                ready = time.time()
    steady = statistics.median(timings[2:]) if len(timings) > 3 else timings[-1]
    full_speed = next(i for i, seconds in enumerate(timings) if seconds <= 1.5 * steady)
    print(json.dumps({
        "ready_s": round(ready - spawned, 2), "full_speed_s": round(ready - spawned + sum(timings[1:full_speed + 1]), 2),
        "interpreter_s": round(tick - spawned, 2),
        "import_s": round(imported - tick, 2), "load_s": round(loaded - imported, 2),
        "first_call_s": round(timings[0], 2), "second_call_ms": round(1000 * timings[1], 2) if len(timings) > 1 else None,
        "steady_ms": round(1000 * steady, 2), "steady_img_per_s": round(args.batch / steady, 1),
        "cache_entry_loaded": backend.compile_cache.loaded,
        "counters": {name: dict(counters[name]) for name in ("inductor", "aot_autograd")},
    }), flush=True)


def measure(weights: str | Path, device: str, precision: str, batch: int, *, processes: int = 2, fused: bool = False,
            cuda_graphs: bool = False, calls: int = 12, work: Path | None = None, say=print) -> list[dict]:
    """Run ``processes`` fresh processes in turn on one new arrowvision cache; their reports."""
    created = work is None
    work = Path(work or tempfile.mkdtemp(prefix="arrowvision-compile-start-"))
    try:
        return _run_processes(work, weights, device, precision, batch, processes, fused, cuda_graphs, calls, say)
    finally:
        if created:
            shutil.rmtree(work, ignore_errors=True)


def _run_processes(work: Path, weights, device, precision, batch, processes, fused, cuda_graphs, calls, say) -> list[dict]:
    cache = work / "arrowvision-cache"
    rows = []
    for index in range(processes):
        inductor = work / f"inductor{index + 1}"
        env = {**os.environ, "ARROWVISION_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor),
               "TRITON_CACHE_DIR": str(inductor / "triton"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, str(Path(__file__).resolve()), str(weights), "--child", "--device", device,
                   "--precision", precision, "--batch", str(batch), "--calls", str(calls), "--spawned", repr(time.time())]
        command += ["--fused"] * fused + ["--cuda-graphs"] * cuda_graphs
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"process {index + 1} failed ({done.returncode}): {done.stderr[-2000:]}")
        row = {"process": index + 1, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        inductor_counts = row["counters"]["inductor"]
        say(f"  process {index + 1}: first output {row['ready_s']:6.2f} s after spawn, full speed {row['full_speed_s']:6.2f} s "
            f"(interpreter {row['interpreter_s']}, "
            f"import {row['import_s']}, load {row['load_s']}, first call {row['first_call_s']} s); "
            f"2nd call {row['second_call_ms']} ms vs steady {row['steady_ms']} ms ({row['steady_img_per_s']} img/s); "
            f"our entry loaded: {row['cache_entry_loaded']}; FX graph hits {inductor_counts.get('fxgraph_cache_hit', 0)} "
            f"misses {inductor_counts.get('fxgraph_cache_miss', 0)}")
    if len(rows) > 1:
        second = rows[1]
        say(f"  process 2 at full speed {second['full_speed_s']} s after spawn vs process 1 {rows[0]['full_speed_s']} s "
            f"({rows[0]['full_speed_s'] / max(second['full_speed_s'], 1e-9):.1f}x sooner); from its backend's creation "
            f"(after interpreter + imports) {second['full_speed_s'] - second['interpreter_s'] - second['import_s']:.2f} s; "
            "target <= 5 s on the GPU")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=12, help="calls per process (the first compiles; at least 4)")
    parser.add_argument("--fused", action="store_true", help="the fused model (model/fused.py)")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs of the compiled model")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.calls = max(4, args.calls)
    if args.child:
        child(args)
        return 0
    rows = measure(args.weights, args.device, args.precision, args.batch, processes=args.processes, fused=args.fused,
                   cuda_graphs=args.cuda_graphs, calls=args.calls)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
