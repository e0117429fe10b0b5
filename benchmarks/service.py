#!/usr/bin/env python3
"""Service throughput and latency with and without micro-batching, at several concurrencies,
and image-URL inputs against base64 inputs.

Starts `arrowvision serve` twice on loopback (max_batch=32 vs max_batch=1, i.e. no batching),
sends a bounded number of requests from C concurrent clients, and reports req/s, p50/p99
latency, mean batch size, and the batched/unbatched ratios. Then (``--url-clients``) one
service with ``--allow-private-urls`` gets the same photos as JSON base64 and as ``image_url``
pointing at a local HTTP server, at 16 concurrent clients, in alternating rounds (the machine's
load drifts): URL throughput / base64 throughput (target >= 0.90). Loopback only; stops by itself.

    python benchmarks/service.py [--weights W] [--backend openvino] [--requests 200] [--concurrency 1,8,32]
    python benchmarks/service.py --only urls [--url-clients 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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


def start_server(weights: str, backend: str, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--weights", weights, "--backend", backend,
                             "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", "5", "--max-queue", "1024",
                             "--quiet", *extra],
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


async def load(base: str, payloads: list[bytes], requests: int, concurrency: int,
               bodies: list[dict] | None = None) -> tuple[list[float], float, int]:
    """``bodies``: JSON bodies to cycle through instead of multipart uploads of ``payloads``."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            if bodies:
                response = await http.post(f"{base}/v1/embed", json=bodies[i % len(bodies)])
            else:
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


IMAGE_SERVER = """
import functools, http.server, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as image hosts and CDNs answer

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def url_vs_base64(args: argparse.Namespace, samples: list[Path]) -> None:
    """The same photos as base64 JSON and as image_url (a local HTTP server in its own process,
    HTTP/1.1 keep-alive), alternating rounds."""
    images = subprocess.Popen([sys.executable, "-c", IMAGE_SERVER, str(samples[0].parent)], stdout=subprocess.PIPE, text=True)
    image_port = int(images.stdout.readline())
    as_base64 = [{"image": base64.b64encode(p.read_bytes()).decode()} for p in samples]
    as_url = [{"image_url": f"http://127.0.0.1:{image_port}/{p.name}"} for p in samples]
    proc, base = start_server(args.weights, args.backend, 32, "--allow-private-urls")
    rates: dict[str, list[float]] = {"base64": [], "image_url": []}
    failures = {"base64": 0, "image_url": 0}
    try:
        asyncio.run(load(base, [], 32, 8, as_base64))  # warm-up
        asyncio.run(load(base, [], 32, 8, as_url))
        for _ in range(args.rounds):
            for label, bodies in (("base64", as_base64), ("image_url", as_url)):
                latencies, seconds, errors = asyncio.run(load(base, [], args.requests, args.url_clients, bodies))
                rates[label].append(args.requests / seconds)
                failures[label] += errors
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        images.kill()
        images.wait()
    print(f"\nimage inputs, {args.url_clients} concurrent clients, {args.requests} requests x {args.rounds} alternating rounds "
          f"({args.backend}, max_batch 32, {os.cpu_count()} CPUs):")
    for label, values in rates.items():
        print(f"  {label:<10} req/s per round: {', '.join(f'{v:.1f}' for v in values)}  median {np.median(values):.1f}  "
              f"errors {failures[label]}")
    ratio = float(np.median(rates["image_url"]) / np.median(rates["base64"]))
    print(f"  image_url / base64 throughput: {ratio:.2f} (target >= 0.90)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "weights" / "siglip-demo-random.parquet"))
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--url-clients", type=int, default=16, help="concurrent clients of the URL vs base64 comparison")
    parser.add_argument("--rounds", type=int, default=3, help="alternating base64/URL rounds")
    parser.add_argument("--only", choices=["batching", "urls"], help="run one of the two comparisons")
    args = parser.parse_args()
    samples = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))
    if args.only != "batching":
        url_vs_base64(args, samples)
    if args.only == "urls":
        return
    payloads = [p.read_bytes() for p in samples]
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
