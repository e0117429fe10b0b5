#!/usr/bin/env python3
"""Load time and memory: our Parquet loader vs the tools users would pick instead.

Base SigLIP vision tower (published siglip-base-patch16-224 config, random init, seed 0).
Every measurement runs in a fresh subprocess (imports done before the clock starts), methods
interleaved, several rounds; warm = page cache hot, cold = the file's pages evicted with
posix_fadvise(DONTNEED) first. Reports medians, p95, RSS growth and peak RSS growth, and the
ratio of each method to ours.

    python benchmarks/load_time.py [--rounds 7] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE_SIGLIP = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")

# name -> (file it reads, what "ready" means)
METHODS = {
    "arrowvision WeightLoader -> torch": "parquet",
    "arrowvision WeightLoader -> numpy": "parquet",
    "arrowvision -> torch, all pages touched": "parquet",
    "arrowvision -> ready VisionTransformer": "parquet",
    "safetensors load_file (numpy)": "safetensors",
    "safetensors load_file (torch)": "safetensors",
    "safetensors safe_open get_tensor (torch)": "safetensors",
    "torch.load weights_only": "bin",
    "torch.load weights_only mmap": "bin",
    "transformers from_pretrained": "folder",
}


def prepare(workdir: Path) -> dict[str, Path]:
    folder = workdir / "siglip-base-random"
    paths = {"folder": folder, "safetensors": folder / "model.safetensors", "bin": workdir / "pytorch_model.bin",
             "parquet": workdir / "siglip-base.parquet"}
    if not paths["parquet"].exists():
        import torch
        import transformers as tf

        from arrowvision.model.convert import convert

        torch.manual_seed(0)
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**BASE_SIGLIP)).eval()
        model.save_pretrained(folder)
        torch.save(model.state_dict(), paths["bin"])
        convert(str(folder), paths["parquet"], progress=False)
    return paths


def evict(path: Path) -> None:
    files = path.glob("*") if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(method: str, path: str) -> None:
    """Runs in a fresh process: import, then time one load and measure memory."""
    import psutil
    import torch  # noqa: F401  (imported before timing for every method)

    import arrowvision
    from arrowvision.model.vision import VisionTransformer

    if method.startswith("safetensors"):
        import safetensors.numpy
        import safetensors.torch
        from safetensors import safe_open
    if method.startswith("transformers"):
        import transformers as tf
    process = psutil.Process()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    if method == "arrowvision WeightLoader -> torch":
        result = arrowvision.WeightLoader(path).torch()
    elif method == "arrowvision WeightLoader -> numpy":
        result = arrowvision.WeightLoader(path).numpy()
    elif method == "arrowvision -> torch, all pages touched":
        result = arrowvision.WeightLoader(path).torch()
        for tensor in result.values():
            tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()  # one read per page
    elif method == "arrowvision -> ready VisionTransformer":
        result = VisionTransformer.from_weights(arrowvision.WeightLoader(path))
    elif method == "safetensors load_file (numpy)":
        result = safetensors.numpy.load_file(path)
    elif method == "safetensors load_file (torch)":
        result = safetensors.torch.load_file(path)
    elif method == "safetensors safe_open get_tensor (torch)":
        with safe_open(path, framework="pt") as handle:
            result = {k: handle.get_tensor(k) for k in handle.keys()}
    elif method == "torch.load weights_only":
        result = torch.load(path, weights_only=True)
    elif method == "torch.load weights_only mmap":
        result = torch.load(path, weights_only=True, mmap=True)
    elif method == "transformers from_pretrained":
        result = tf.SiglipVisionModel.from_pretrained(path)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - start
    rss_growth = process.memory_info().rss - rss_before
    # high-water mark (VmHWM, which unlike ru_maxrss does not survive exec) after the load minus
    # the resident size before it: an upper bound, as the import peak can only raise it
    peak_growth = vm_hwm() - rss_before
    del result
    print(json.dumps({"seconds": seconds, "rss_growth": rss_growth, "peak_growth": max(0, peak_growth)}))


def run_one(method: str, path: Path, cold: bool) -> dict:
    if cold:
        evict(path)
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(path)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(__file__).resolve().parent / ".cache"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    weight_bytes = paths["safetensors"].stat().st_size
    print(f"base SigLIP vision tower: parquet {paths['parquet'].stat().st_size / 1e6:.1f} MB, "
          f"safetensors {weight_bytes / 1e6:.1f} MB; {os.cpu_count()} CPUs; rounds: {args.rounds} warm, {args.cold_rounds} cold")
    warm: dict[str, list[dict]] = {m: [] for m in METHODS}
    cold: dict[str, list[dict]] = {m: [] for m in METHODS}
    for method, kind in METHODS.items():  # one unmeasured run each: warms the page cache
        run_one(method, paths[kind], cold=False)
    for round_ in range(args.rounds):
        for method, kind in METHODS.items():
            warm[method].append(run_one(method, paths[kind], cold=False))
        if round_ < args.cold_rounds:
            for method, kind in METHODS.items():
                cold[method].append(run_one(method, paths[kind], cold=True))

    ours = statistics.median(r["seconds"] for r in warm["arrowvision WeightLoader -> torch"])
    ours_cold = statistics.median(r["seconds"] for r in cold["arrowvision WeightLoader -> torch"])
    header = f"{'method':<42} {'warm p50':>9} {'warm p95':>9} {'x ours':>7} {'cold p50':>9} {'x ours':>7} {'RSS +MB':>8} {'peak +MB':>9}"
    print(header)
    print("-" * len(header))
    for method in METHODS:
        times = [r["seconds"] for r in warm[method]]
        cold_times = [r["seconds"] for r in cold[method]]
        rss = statistics.median(r["rss_growth"] for r in warm[method]) / 1e6
        peak = statistics.median(r["peak_growth"] for r in warm[method]) / 1e6
        median, cold_median = statistics.median(times), statistics.median(cold_times)
        print(f"{method:<42} {median * 1e3:8.1f}ms {p95(times) * 1e3:8.1f}ms {median / ours:6.1f}x "
              f"{cold_median * 1e3:8.1f}ms {cold_median / ours_cold:6.1f}x {rss:8.1f} {peak:9.1f}")
    ours_rss = statistics.median(r["rss_growth"] for r in warm["arrowvision WeightLoader -> torch"])
    st_numpy = statistics.median(r["seconds"] for r in warm["safetensors load_file (numpy)"])
    print()
    print(f"targets: ours warm {ours * 1e3:.1f} ms (target <= 50 ms): {'PASS' if ours <= 0.05 else 'MISS'}; "
          f"safetensors->numpy / ours = {st_numpy / ours:.1f}x (target >= 8x): {'PASS' if st_numpy / ours >= 8 else 'MISS'}; "
          f"RSS growth {100 * ours_rss / weight_bytes:.2f}% of weights (target <= 5%): {'PASS' if ours_rss <= 0.05 * weight_bytes else 'MISS'}")


if __name__ == "__main__":
    main()
