#!/usr/bin/env python3
"""Parity table: our backends vs transformers, same random-init weights through Parquet.

For each config (tiny ones of odd shapes and the published base configs), random pixels at
batch 1 and N: max abs diff, mean abs diff and min cosine of the pooled embedding (and the last
hidden state for torch) against the HF model, for every backend and precision.

Text rows: full SigLIP / SigLIP 2 (Gemma tokenizer) / CLIP (and CLIP with the legacy
eos_token_id = 2) checkpoints, every parameter perturbed, tokenizers built offline: token ids vs
transformers' tokenizer, normalized text embeddings and logits_per_image (real photos) vs the HF
model, on torch and OpenVINO.

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
from arrowvision.model.convert import convert  # noqa: E402
from arrowvision.model.vision import VisionTransformer  # noqa: E402
from arrowvision.parity import compare  # noqa: E402
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
    parser.add_argument("--text-only", action="store_true", help="only the text-tower rows")
    args = parser.parse_args()
    if args.text_only:
        text_rows(args)
        return
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
    text_rows(args)


def text_rows(args: argparse.Namespace) -> None:
    """Text tower and image-text logits vs transformers (thresholds: 1e-4 embeddings, 1e-3 logits)."""
    import transformers as tf
    from skimage import data

    from arrowvision import ImageTextModel
    from tests.test_text_parity import features, hf_input_ids
    from tests.textkit import AWKWARD, SENTENCES, TINY_VISION, hf_tokenizer, save_full_checkpoint

    work = Path(tempfile.mkdtemp(prefix="arrowvision-text-parity-"))
    images = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    texts = AWKWARD + SENTENCES
    size = {"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]}
    print(f"\n{'text config':<20} {'backend':<16} {'ids equal':>9} {'emb max abs':>12} {'logits max abs':>15}")
    worst_emb = worst_logits = 0.0
    for name, kind, eos in (("siglip", "siglip", None), ("siglip2-gemma", "siglip2", None), ("clip", "clip", None),
                            ("clip-legacy-eos2", "clip", 2)):
        folder = save_full_checkpoint(work / name, kind, seed=3, eos_token_id=eos)
        parquet = folder / "all.parquet"
        convert(str(folder), parquet, tower="all", progress=False)
        siglip = kind.startswith("siglip")
        reference = (tf.SiglipModel if siglip else tf.CLIPModel).from_pretrained(folder).eval()
        processor = tf.SiglipImageProcessor(size=size) if siglip else tf.CLIPImageProcessor(size={"shortest_edge": size["height"]}, crop_size=size)
        ids = torch.from_numpy(hf_input_ids(hf_tokenizer(folder), kind, texts))
        with torch.no_grad():
            expected = torch.nn.functional.normalize(features(reference.get_text_features(input_ids=ids)), dim=-1).numpy()
            logits = reference(input_ids=ids, pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).logits_per_image.numpy()
        variants = {"torch": {}, "openvino fp32": {"backend": "openvino"},
                    "openvino fp16": {"backend": "openvino", "text_precision": "fp16", "precision": "fp16"}}
        for label, options in variants.items():
            model = ImageTextModel.from_parquet(parquet, **options)
            same = np.array_equal(model.tokenize(texts), ids.numpy())
            emb = float(np.abs(model.encode_texts(texts) - expected).max())
            lg = float(np.abs(model.logits(images, texts) - logits).max())
            if "fp16" not in label:
                worst_emb, worst_logits = max(worst_emb, emb), max(worst_logits, lg)
            print(f"{name:<20} {label:<16} {str(same):>9} {emb:12.2e} {lg:15.2e}")
    verdict = "PASS" if worst_emb <= 1e-4 and worst_logits <= 1e-3 else "MISS"
    print(f"\nworst fp32 text: embeddings {worst_emb:.2e} (<= 1e-4), logits_per_image {worst_logits:.2e} (<= 1e-3): {verdict}")


if __name__ == "__main__":
    main()
