"""``arrowvision bench``: latency percentiles, img/s and peak RSS of a backend."""

from __future__ import annotations

import argparse
import sys
import time

from ._common import EXIT_OK, add_backend_options, batch_sizes, command, positive_int, print_json, progress_enabled
from ._load import backend_summary, load_encoder


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "bench", "latency percentiles, img/s and peak RSS for a backend", cmd_bench)
    add_backend_options(p)
    p.add_argument("--batch-sizes", type=batch_sizes, default="1,8,32", help="comma- or space-separated batch sizes")
    p.add_argument("--iters", type=positive_int, default=20, help="timed runs per batch size (after 1 warm-up run)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")


def cmd_bench(args: argparse.Namespace) -> int:
    import resource

    import numpy as np
    from tqdm import tqdm

    from ..backends.cpu import cpu_info

    encoder = load_encoder(args)
    summary = {**backend_summary(encoder), "cpu": cpu_info().describe()}
    size = encoder.config.image_size
    rng = np.random.default_rng(0)
    results = []
    bar = tqdm(total=len(args.batch_sizes) * (args.iters + 1), desc="benchmarking", unit="run", leave=False,
               disable=not progress_enabled(args), file=sys.stderr)
    for batch in args.batch_sizes:
        pixels = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        encoder.backend(pixels)  # warm-up, not timed
        bar.update()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            encoder.backend(pixels)
            times.append(time.perf_counter() - start)
            bar.update()
        p50, p95, p99 = (float(v) for v in np.percentile(times, [50, 95, 99]) * 1000)
        results.append({"batch": batch, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": 1000 * float(np.mean(times)),
                        "img_per_s": batch * len(times) / float(np.sum(times))})
    bar.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print_json({**summary, "warmup_runs": 1, "timed_runs": args.iters, "results": results, "peak_rss_mb": rss_mb})
        return EXIT_OK
    print(f"cpu: {summary['cpu']}")
    print(f"{summary['backend']} {summary['precision']} on {summary['device']}: {summary['family']} {size}px "
          f"dim {summary['dim']}; {args.iters} timed runs per batch size after 1 warm-up; "
          "img/s = images / total timed seconds")
    print(f"{'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'img/s':>9}")
    for row in results:
        print(f"{row['batch']:>5} {row['p50_ms']:9.1f} {row['p95_ms']:9.1f} {row['p99_ms']:9.1f} {row['img_per_s']:9.1f}")
    print(f"peak RSS {rss_mb:.0f} MB")
    return EXIT_OK


register = _add_bench
