#!/usr/bin/env python3
"""Parity table: our backends vs transformers, same random-init weights through Parquet.

For each config (tiny ones of odd shapes and the published base configs), random pixels at
batch 1 and N: max abs diff, mean abs diff and min cosine of the pooled embedding (and the last
hidden state for torch) against the HF model, for every backend and precision.

    python benchmarks/parity.py [--batch 8] [--skip-base] [--precisions fp32,fp16,int8-weights,int8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from arrowvision import VisionEncoder, WeightLoader  # noqa: E402
from arrowvision.convert import convert  # noqa: E402
from arrowvision.model import VisionTransformer  # noqa: E402
from arrowvision.validate import compare  # noqa: E402
from tests.conftest import hf_model, save_checkpoint  # noqa: E402
from tests.test_parity import TINY_CONFIGS, hf_outputs  # noqa: E402

BASE_CONFIGS = {
    "siglip-base-patch16-224": ("siglip_vision", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, image_size=224, patch_size=16, layer_norm_eps=1e-6)),
    "clip-vit-base-patch32": ("clip_vision", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu")),
}


def stats(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    row = compare("", ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1), max_abs=0, min_cosine=0)
    return row["max_abs"], row["mean_abs"], row["min_cosine"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--precisions", default="fp32,fp16,int8-weights,int8")
    args = parser.parse_args()
    configs = dict(TINY_CONFIGS)
    if not args.skip_base:
        configs.update(BASE_CONFIGS)
    work = Path(tempfile.mkdtemp(prefix="arrowvision-parity-"))
    os.environ.setdefault("ARROWVISION_CACHE", str(work / "cache"))
    print(f"{'config':<26} {'backend':<22} {'output':<18} {'batch':>5} {'max abs':>10} {'mean abs':>10} {'min cos':>10}")
    worst = 0.0
    for name, (kind, config) in configs.items():
        folder = save_checkpoint(work / name, kind, seed=0, **dict(config))
        parquet = work / f"{name}.parquet"
        convert(str(folder), parquet, progress=False)
        reference = hf_model(folder)
        ours = VisionTransformer.from_weights(WeightLoader(parquet))
        size = config["image_size"]
        backends = {f"openvino {p}": VisionEncoder.from_parquet(parquet, backend="openvino", precision=p, min_cosine=0.0)
                    for p in args.precisions.split(",")}
        backends.update({f"onnxruntime {p}": VisionEncoder.from_parquet(parquet, backend="onnxruntime", precision=p, min_cosine=0.0)
                         for p in ("fp32", "int8")})
        for label, encoder in backends.items():
            kinds = encoder.backend.report.get("by_kind")
            if kinds:
                print(f"{name:<26} {label:<22} export validation on held-out images, min cosine vs fp32 torch: "
                      + ", ".join(f"{kind} {row['min_cosine']:.5f}" for kind, row in kinds.items()))
        for batch in (1, args.batch):
            pixels = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32))
            pooled, last, _ = hf_outputs(reference, pixels)
            with torch.no_grad():
                out = ours(pixels)
            rows = [("torch", "pooled", out.pooled.numpy()), ("torch", "last_hidden_state", out.last_hidden_state.numpy())]
            rows += [(label, "pooled", encoder.encode(pixels.numpy(), normalize=False)) for label, encoder in backends.items()]
            for label, output, values in rows:
                expected = pooled.numpy() if output == "pooled" else last.numpy()
                max_abs, mean_abs, min_cos = stats(values, expected)
                if label in ("torch", "openvino fp32", "onnxruntime fp32"):
                    worst = max(worst, max_abs)
                print(f"{name:<26} {label:<22} {output:<18} {batch:>5} {max_abs:10.2e} {mean_abs:10.2e} {min_cos:10.6f}")
    print("\nnote: the rows use random normal pixels; int8 is calibrated on photos, so its rows on noise are out of its"
          " calibration range (compare the export validation lines, measured on held-out real images)")
    verdict = "PASS" if worst <= 1e-4 else "MISS"
    print(f"\nworst fp32 max abs diff (torch, openvino fp32, onnxruntime fp32): {worst:.2e} (target <= 1e-4: {verdict})")


if __name__ == "__main__":
    main()
