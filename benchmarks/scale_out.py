#!/usr/bin/env python3
"""Ray vs local, on this machine: `embed --engine ray` against the local engine on the same
corpus (target: Ray >= 85% of local throughput), the Ray actors' start-up time, and the service
on Ray Serve against the plain `arrowvision serve` (req/s, p50/p99 at 1, 8, 32 clients). All
ratios come from this one run. Prints the CPU model and the load average: on a shared machine,
read the numbers with the load in mind.

Base SigLIP-B/16-224 (random init, from benchmarks/latency.py's prepare()) on OpenVINO fp32
unless --weights is given; JPEG photos 640-1024 px as in embed_throughput.py.

    python benchmarks/scale_out.py [--weights W] [--images 128] [--requests 64] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def default_weights() -> str:
    cached = HERE / ".cache" / "siglip-base-perturbed.parquet"
    if cached.exists():
        return str(cached)
    from latency import prepare

    return str(prepare()["parquet"])


def bench_engines(weights: str, files: list[str], work: Path, batch_size: int, cpus: int) -> list[str]:
    from arrowvision import VisionEncoder
    from arrowvision.datasets.pipeline import embed_paths
    from arrowvision.distributed.data import embed_paths_ray

    lines = []
    start = time.perf_counter()
    encoder = VisionEncoder.from_parquet(weights, backend="openvino", mode="throughput")
    encoder.backend(encoder.preprocess(files[:2]))  # warm-up (and the IR export on a first run)
    lines.append(f"local model load + warm-up {time.perf_counter() - start:.1f} s")
    local = embed_paths(encoder, files, work / "local", batch_size=batch_size, progress=False)
    assert local.embedded == len(files), local
    lines.append(f"local engine            {local.images_per_second:7.2f} img/s  ({len(files)} images, "
                 f"{local.seconds:.1f} s, model busy {100 * local.model_busy:.0f}%)")
    parts = sum(p.stat().st_size for p in (work / "local").glob("part-*.parquet"))
    jpegs = sum(Path(f).stat().st_size for f in files)
    lines.append(f"    per image: {local.images_per_second / os.cpu_count():.2f} img/s per CPU; "
                 f"{parts / local.embedded:.0f} bytes of output on disk; input JPEG {jpegs / len(files) / 1024:.0f} KiB mean")
    del encoder
    for actors in sorted({cpus, 1}, reverse=True):
        per_actor = cpus / actors
        first: list[tuple[float, int]] = []  # (when, rows) of the first batch back
        started = time.perf_counter()
        stats = embed_paths_ray(weights, files, work / f"ray{actors}", backend="openvino", batch_size=batch_size,
                                backend_options={"mode": "throughput"},
                                actors=actors, cpus_per_actor=per_actor, progress=False,
                                on_batch=lambda batch: first or first.append((time.perf_counter(), len(batch["path"]))))
        assert stats.embedded == len(files), stats
        steady = stats.embedded / max(1e-9, stats.working_seconds)
        lines.append(f"ray {actors} actor(s) x {per_actor:g} CPU  {stats.images_per_second:7.2f} img/s end to end "
                     f"({100 * stats.images_per_second / local.images_per_second:.0f}% of local), "
                     f"{steady:7.2f} img/s once the actors were up ({100 * steady / local.images_per_second:.0f}% of local)")
        lines.append(f"    actor start-up: first batch back after {first[0][0] - started:.1f} s; model load in an actor "
                     f"{stats.actor_start_seconds:.1f} s at most")
    return lines


async def load(base: str, payloads: list[bytes], requests: int, concurrency: int) -> tuple[list[float], float, int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            response = await http.post(f"{base}/v1/embed", files={"file": ("x.jpg", payloads[i % len(payloads)], "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


def wait_healthy(base: str, seconds: float = 600) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base} did not become healthy")


def measure(base: str, payloads: list[bytes], requests: int, levels: list[int]) -> dict[int, tuple[float, float, float, int]]:
    asyncio.run(load(base, payloads, 8, 2))  # warm-up
    results = {}
    for clients in levels:
        latencies, seconds, errors = asyncio.run(load(base, payloads, requests, clients))
        results[clients] = (requests / seconds, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), errors)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="Parquet weights (default: base SigLIP-B/16-224, random init)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    os.environ.setdefault("ARROWVISION_CACHE", str(HERE / ".cache" / "arrowvision-cache"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    weights = args.weights or default_weights()
    levels = [int(c) for c in args.concurrency.split(",")]

    import ray

    from embed_throughput import make_corpus

    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average at start {load_average()}")
    print(f"weights {weights}; OpenVINO fp32; Ray {ray.__version__}, local cluster of {args.cpus} CPUs")
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    print(f"ray.init (local cluster start) {time.perf_counter() - started:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="arrowvision-scale-out-"))
    try:
        (work / "images").mkdir()
        files = make_corpus(work / "images", args.images)
        print("\n== corpus embedding")
        for line in bench_engines(weights, files, work, args.batch_size, args.cpus):
            print(line, flush=True)
        print(f"\n== service ({args.requests} requests per row; load average now {load_average()})")
        payloads = [Path(f).read_bytes() for f in files[:8]]
        plain, served = run_services(weights, payloads, args.requests, levels, args.cpus)
        print(f"{'service':<30} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for label, results in (("plain (uvicorn, max_batch 32)", plain), (f"Ray Serve ({args.cpus} replicas x 1 CPU)", served)):
            for clients, (rps, p50, p99, errors) in results.items():
                print(f"{label:<30} {clients:>7} {rps:8.1f} {p50 * 1e3:8.1f} {p99 * 1e3:8.1f} {errors:>7}")
        print("Ray Serve / plain:")
        for clients in levels:
            s, p = served[clients], plain[clients]
            print(f"  {clients:>3} clients: throughput {s[0] / p[0]:.2f}x, p50 latency {s[1] / p[1]:.2f}x, p99 latency {s[2] / p[2]:.2f}x")
        print(f"\nload average at the end {load_average()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_services(weights: str, payloads: list[bytes], requests: int, levels: list[int], cpus: int):
    import socket
    import subprocess

    from ray import serve

    from arrowvision.distributed.serve import Replicas, build_app, start
    from arrowvision.service.config import ServiceConfig

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--weights", weights, "--backend", "openvino",
                             "--port", str(port), "--max-batch", "32", "--max-wait-ms", "5", "--max-queue", "1024", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        plain = measure(f"http://127.0.0.1:{port}", payloads, requests, levels)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    port = free_port()
    config = ServiceConfig(max_batch=32, max_wait_ms=5, max_queue=1024)
    started = time.perf_counter()
    start(build_app(weights, config=config, replicas=Replicas(count=cpus)), port=port)
    wait_healthy(f"http://127.0.0.1:{port}")
    print(f"Ray Serve deploy ({cpus} replicas) {time.perf_counter() - started:.1f} s", flush=True)
    try:
        served = measure(f"http://127.0.0.1:{port}", payloads, requests, levels)
    finally:
        serve.shutdown()
    return plain, served


if __name__ == "__main__":
    main()
