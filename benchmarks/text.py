#!/usr/bin/env python3
"""Text tower throughput: texts/s at batch 1 and 32, ours (torch, OpenVINO fp32) vs transformers,
tokenization included, ratios from one run; then ``arrowvision score`` end to end on a CSV.

Base-size text towers (SigLIP-B: 768 wide, 12 layers, 64 tokens; CLIP-B: 512 wide, 12 layers,
padded to the batch's longest text), random init, tokenizers built offline (tests/textkit.py).

    python benchmarks/text.py [--pairs 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from arrowvision import TextEncoder
from arrowvision.model.convert import convert
from tests.textkit import (
    SENTENCES,
    TINY_VISION,
    hf_tokenizer,
    train_clip_bpe,
    train_spiece,
)

BASE_TEXT = {
    "siglip-base text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=32000),
    "clip-base text": dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048),
}


def build(folder: Path, name: str) -> Path:
    import transformers as tf

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    text = dict(BASE_TEXT[name])
    if name.startswith("siglip"):
        train_spiece(folder)
        vision = {**TINY_VISION, "hidden_size": 768, "num_attention_heads": 12}
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=vision, text_config=text))
    else:
        train_clip_bpe(folder)
        vocab = json.loads((folder / "vocab.json").read_text())
        text.update(vocab_size=49408, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=TINY_VISION, text_config=text, projection_dim=512))
    model.eval().save_pretrained(folder)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return folder


def rate(run, texts: list[str], seconds: float) -> float:
    run(texts)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        run(texts)
        count += len(texts)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    import transformers as tf

    work = Path(tempfile.mkdtemp(prefix="arrowvision-text-bench-"))
    os.environ.setdefault("ARROWVISION_CACHE", str(work / "cache"))
    corpus = (SENTENCES * 4)[:32]
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"{'model':<18} {'batch':>5} {'transformers':>13} {'ours torch':>11} {'ours OV fp32':>13} {'torch/HF':>9} {'OV/HF':>7}  (texts/s)")
    for name in BASE_TEXT:
        folder = build(work / name.replace(" ", "-"), name)
        siglip = name.startswith("siglip")
        reference = (tf.SiglipModel if siglip else tf.CLIPModel).from_pretrained(folder).eval()
        tokenizer = hf_tokenizer(folder)
        padding = dict(padding="max_length", max_length=64, truncation=True) if siglip else dict(padding=True, truncation=True)

        def transformers_run(texts: list[str]) -> None:
            with torch.inference_mode():
                reference.get_text_features(input_ids=tokenizer(texts, return_tensors="pt", **padding)["input_ids"])

        ours_torch = TextEncoder.from_parquet(folder / "all.parquet")
        ours_ov = TextEncoder.from_parquet(folder / "all.parquet", backend="openvino")
        for batch in (1, 32):
            texts = corpus[:batch]
            hf = rate(transformers_run, texts, args.seconds)
            mine = rate(lambda t: ours_torch.encode(t, batch_size=32), texts, args.seconds)
            ov = rate(lambda t: ours_ov.encode(t, batch_size=32), texts, args.seconds)
            print(f"{name:<18} {batch:>5} {hf:13.1f} {mine:11.1f} {ov:13.1f} {mine / hf:9.2f} {ov / hf:7.2f}")

    # score end to end: CSV of (sample photo, caption) pairs, SigLIP-B text + tiny vision tower
    from arrowvision.cli import main as cli

    photos = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))
    pairs = work / "pairs.csv"
    pairs.write_text("image,text\n" + "".join(f'{photos[i % len(photos)]},"{SENTENCES[i % len(SENTENCES)]}"\n' for i in range(args.pairs)))
    weights = work / "siglip-base-text" / "all.parquet"
    for backend in ("torch", "openvino"):
        start = time.perf_counter()
        code = cli(["score", str(pairs), "--weights", str(weights), "--backend", backend, "-o", str(work / f"scores-{backend}.csv"), "--no-progress"])
        elapsed = time.perf_counter() - start
        print(f"score end to end ({backend}, model load included): {args.pairs} pairs in {elapsed:.2f} s = {args.pairs / elapsed:.1f} pairs/s (exit {code})")


if __name__ == "__main__":
    main()
