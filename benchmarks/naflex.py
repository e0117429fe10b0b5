#!/usr/bin/env python3
"""SigLIP 2 NaFlex on OpenVINO fp32 vs fixed-resolution SigLIP 2 B/16, same CPU, same run.

Models: the published B/16 vision-tower configs (random init, seed 0, every parameter perturbed):
NaFlex (256 learned positions, patch 16) and fixed 224 px (196 patches) and 256 px (256 patches:
the same token count as NaFlex's default budget). All on our OpenVINO fp32 IR, model call only
(preprocessed inputs), rounds interleaved:

- batch 1: NaFlex at 256 patches (a square image, 16x16) vs fixed 224 and fixed 256: p50, p95
  and the ratio to each fixed peer (issue 28's target: <= 1.1x fixed 224);
- batch 32: NaFlex with 32 images of mixed aspect ratios (1:4 .. 4:1, each padded to the 256
  budget) vs a fixed batch of 32 (throughput mode): img/s and the ratio (target >= 0.8x).

    python benchmarks/naflex.py [--rounds 5] [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
WORK = HERE / ".cache"
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
# (height, width) of the mixed batch: every aspect ratio from 1:4 to 4:1
MIXED_SHAPES = [(128, 512), (512, 128), (300, 400), (400, 300), (360, 640), (640, 360), (500, 500), (240, 720)] * 4


def prepare() -> dict[str, Path]:
    """Perturbed base checkpoints, converted once into benchmarks/.cache."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from checkpoints import save_checkpoint

    from arrowvision.model.convert import convert

    WORK.mkdir(parents=True, exist_ok=True)
    specs = {"naflex": ("siglip2_vision", dict(BASE, num_patches=256)),
             "fixed-224": ("siglip_vision", dict(BASE, image_size=224)),
             "fixed-256": ("siglip_vision", dict(BASE, image_size=256))}
    paths = {}
    for name, (kind, config) in specs.items():
        folder, parquet = WORK / f"siglip2-b16-{name}", WORK / f"siglip2-b16-{name}.parquet"
        if not parquet.exists():
            save_checkpoint(folder, kind, seed=0, **config)
            convert(str(folder), parquet, progress=False)
        paths[name] = parquet
    return paths


def inputs(encoder, rows: int, mixed: bool):
    """Preprocessed model inputs: NaFlex batches from images, fixed (N, 3, S, S) pixels."""
    rng = np.random.default_rng(0)
    if encoder.config.naflex:
        shapes = MIXED_SHAPES[:rows] if mixed else [(512, 512)] * rows
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        return encoder.preprocessor.batch(images)
    size = encoder.config.image_size
    return encoder.preprocessor.normalize(rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8))


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=20, help="batch-1 calls per round and model")
    parser.add_argument("--batch-iters", type=int, default=2, help="batch-32 calls per round and model")
    args = parser.parse_args()

    from arrowvision import VisionEncoder
    from arrowvision.backends.cpu import cpu_info

    paths = prepare()
    latency = {name: VisionEncoder.from_parquet(path, backend="openvino", mode="latency") for name, path in paths.items()}
    throughput = {name: VisionEncoder.from_parquet(path, backend="openvino", mode="throughput") for name, path in paths.items()}
    one = {name: inputs(encoder, 1, mixed=False) for name, encoder in latency.items()}
    batch = {name: inputs(encoder, 32, mixed=name == "naflex") for name, encoder in latency.items()}
    single: dict[str, list[float]] = {name: [] for name in paths}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for name in paths:  # warm-up: compile, first-call allocations
        latency[name].backend(one[name])
        throughput[name].backend(batch[name])
    for _ in range(args.rounds):
        for name in paths:
            for _ in range(args.iters):
                start = time.perf_counter()
                latency[name].backend(one[name])
                single[name].append(time.perf_counter() - start)
            for _ in range(args.batch_iters):
                start = time.perf_counter()
                throughput[name].backend(batch[name])
                rates[name].append(32 / (time.perf_counter() - start))

    tokens = {"naflex": "256 (16x16)", "fixed-224": "196 (14x14)", "fixed-256": "256 (16x16)"}
    print(f"cpu: {cpu_info().describe()}")
    print(f"OpenVINO fp32, SigLIP 2 B/16 vision tower; {args.rounds} rounds x {args.iters} batch-1 calls, "
          f"{args.rounds} x {args.batch_iters} batch-32 calls per model\n")
    print(f"{'model':<11} {'tokens':>12} {'b1 p50':>9} {'b1 p95':>9} {'vs 224':>7} {'vs 256':>7} "
          f"{'b32 img/s':>10} {'vs 224':>7} {'vs 256':>7}")
    for name in paths:
        p50, rate = statistics.median(single[name]), statistics.median(rates[name])
        ratios = [p50 / statistics.median(single[peer]) for peer in ("fixed-224", "fixed-256")]
        rate_ratios = [rate / statistics.median(rates[peer]) for peer in ("fixed-224", "fixed-256")]
        print(f"{name:<11} {tokens[name]:>12} {p50 * 1e3:7.1f}ms {p95(single[name]) * 1e3:7.1f}ms "
              f"{ratios[0]:6.2f}x {ratios[1]:6.2f}x {rate:10.1f} {rate_ratios[0]:6.2f}x {rate_ratios[1]:6.2f}x")
    print("\nnaflex b32 = 32 images of mixed aspect ratios (1:4 .. 4:1), each padded to the 256-patch budget")
    print("targets (issue 28): naflex b1 <= 1.1x fixed-224 latency; naflex mixed b32 >= 0.8x fixed b32 img/s")


if __name__ == "__main__":
    main()
