#!/usr/bin/env python3
"""End-to-end `embed` throughput vs model-only throughput (target: >= 90%).

Base SigLIP-B/16-224 (random init) on the OpenVINO fp32 path. 64 real photos (scikit-image,
saved as 640-1024 px JPEGs). Model-only: the backend on already-preprocessed batches.
End-to-end: `embed_paths` from files to the Parquet dataset (decode, resize, inference, writes),
decoding running in threads beside inference. Interleaved rounds, medians.

    python benchmarks/embed_throughput.py [--images 64] [--rounds 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def make_corpus(folder: Path, count: int) -> list[str]:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        size = int(rng.integers(640, 1025))
        image = Image.fromarray(photos[i % len(photos)]).resize((size, int(size * 0.75)))
        path = folder / f"img{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", default="throughput", choices=["latency", "throughput"])
    args = parser.parse_args()

    from latency import prepare

    from arrowvision import VisionEncoder
    from arrowvision.datasets.pipeline import embed_paths

    paths_info = prepare()
    os.environ.setdefault("ARROWVISION_CACHE", str(HERE / ".cache" / "arrowvision-cache"))
    encoder = VisionEncoder.from_parquet(paths_info["parquet"], backend="openvino", mode=args.mode)
    work = Path(tempfile.mkdtemp(prefix="arrowvision-embed-bench-"))
    try:
        (work / "images").mkdir()
        files = make_corpus(work / "images", args.images)
        pixels = encoder.preprocess(files)
        encoder.backend(pixels[: args.batch_size])  # warm-up
        model_only, end_to_end, busy = [], [], []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                encoder.backend(pixels[i : i + args.batch_size])
            model_only.append(len(pixels) / (time.perf_counter() - start))
            stats = embed_paths(encoder, files, work / f"out{round_}", batch_size=args.batch_size, progress=False)
            assert stats.embedded == len(files), stats
            end_to_end.append(stats.images_per_second)
            busy.append(stats.model_busy)
        m, e = statistics.median(model_only), statistics.median(end_to_end)
        print(f"SigLIP-B/16-224 OpenVINO fp32 ({args.mode}), {len(files)} JPEGs 640-1024 px, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, {args.rounds} rounds")
        print(f"model-only  {m:7.2f} img/s  (rounds: {', '.join(f'{v:.2f}' for v in model_only)})")
        print(f"end-to-end  {e:7.2f} img/s  (rounds: {', '.join(f'{v:.2f}' for v in end_to_end)}); model busy {100 * statistics.median(busy):.0f}% of wall time")
        print(f"end-to-end / model-only = {100 * e / m:.1f}% (target >= 90%: {'PASS' if e >= 0.9 * m else 'MISS'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
