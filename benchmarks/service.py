#!/usr/bin/env python3
"""Service throughput and latency with and without micro-batching, at several concurrencies.

Starts `arrowvision serve` twice on loopback (max_batch=32 vs max_batch=1, i.e. no batching),
sends a bounded number of requests from C concurrent clients, and reports req/s, p50/p99
latency, mean batch size, and the batched/unbatched ratios. Loopback only; stops by itself.

    python benchmarks/service.py [--weights W] [--backend openvino] [--requests 200] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(weights: str, backend: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--weights", weights, "--backend", backend,
                             "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", "5", "--max-queue", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


async def load(base: str, payloads: list[bytes], requests: int, concurrency: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            response = await http.post(f"{base}/v1/embed", files={"file": ("x.jpg", payloads[i % len(payloads)], "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


def mean_batch(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    count = sum(float(v) for v in re.findall(r"^arrowvision_batch_size_count(?:\{[^}]*\})? (\S+)", text, re.M))
    total = sum(float(v) for v in re.findall(r"^arrowvision_batch_size_sum(?:\{[^}]*\})? (\S+)", text, re.M))
    return total / count if count else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "weights" / "siglip-demo-random.parquet"))
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    payloads = [p.read_bytes() for p in sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))]
    results = {}
    for label, max_batch in (("batched (max_batch 32)", 32), ("unbatched (max_batch 1)", 1)):
        proc, base = start_server(args.weights, args.backend, max_batch)
        try:
            asyncio.run(load(base, payloads, 16, 4))  # warm-up
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                latencies, seconds, errors = asyncio.run(load(base, payloads, args.requests, concurrency))
                results[(label, concurrency)] = (args.requests / seconds, np.percentile(latencies, 50), np.percentile(latencies, 99),
                                                 errors, mean_batch(base))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    print(f"weights {args.weights} ({args.backend}); {args.requests} requests per row; {os.cpu_count()} CPUs")
    print(f"{'mode':<26} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'mean batch*':>11}")
    for (label, concurrency), (rps, p50, p99, errors, batch) in results.items():
        print(f"{label:<26} {concurrency:>7} {rps:8.1f} {p50 * 1e3:8.1f} {p99 * 1e3:8.1f} {errors:>7} {batch:11.1f}")
    print("* cumulative over the server's life")
    print("\nbatched / unbatched:")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        b, u = results[("batched (max_batch 32)", concurrency)], results[("unbatched (max_batch 1)", concurrency)]
        print(f"  {concurrency:>3} clients: throughput {b[0] / u[0]:.2f}x, p50 latency {b[1] / u[1]:.2f}x, p99 latency {b[2] / u[2]:.2f}x")


if __name__ == "__main__":
    main()
