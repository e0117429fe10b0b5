#!/usr/bin/env python3
"""Reference outputs of open_clip itself, for tests/test_open_clip.py (committed as small fixtures).

open_clip imports torchvision, which has no CPU build on the package index here, so this runs in a
separate environment, never in the project's:

    python -m venv /tmp/ocvenv && /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch
    /tmp/ocvenv/bin/python tools/make_open_clip_fixtures.py   # writes tests/fixtures/open_clip/

For each model: a tiny config of the architecture open_clip builds for the published name, made with
``open_clip.create_model(name)``, EVERY parameter perturbed with seeded noise (as tests/checkpoints.py
does: norms off 1/0, biases off 0), saved as an open_clip model folder (``open_clip_config.json``
+ ``open_clip_model.safetensors``), with seeded pixels and open_clip's ``encode_image`` (not
normalized) on them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "open_clip"
MODELS = {
    # OpenAI-style VisionTransformer (class token, ln_pre, fused in_proj, proj), QuickGELU as OpenAI's weights
    "tiny-vit-quickgelu": {
        "embed_dim": 24, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    },
    # the same architecture with nn.GELU (LAION / DFN checkpoints)
    "tiny-vit-gelu": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 48, "layers": 2, "width": 48, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    },
    # ViT-B-16-SigLIP's layout: timm trunk (MAP pooling) + open_clip's bidirectional text tower with a
    # biased projection, pooled at the last position. timm's vit_base_patch16_siglip_224 builder is
    # shrunk (TIMM_SHRINK: depth, width, image size; its 12 heads kept) so that the fixture stays small.
    "tiny-siglip-timm": {
        "embed_dim": 96, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 64, "timm_model_name": "vit_base_patch16_siglip_224", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    },
}
TIMM_SHRINK = {"depth": 2, "embed_dim": 96, "img_size": 64}


def shrink_timm_trunks() -> None:
    """open_clip passes no architecture arguments to timm: add TIMM_SHRINK to its timm.create_model."""
    import open_clip.timm_model as timm_model

    create = timm_model.timm.create_model

    def shrunk(name, *args, **kwargs):
        return create(name, *args, **{**kwargs, **TIMM_SHRINK})

    timm_model.timm.create_model = shrunk


def perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_((0.1 * spread if spread > 0 else 0.1) * noise)
    constant = [n for n, p in model.named_parameters() if p.numel() > 1 and bool((p == p.flatten()[0]).all())]
    assert not constant, constant


def token_ids(rng: np.random.Generator, rows: int, length: int, vocab: int, pad: bool = False) -> np.ndarray:
    """Shaped like open_clip's tokenizer output: start token, words, end-of-text (the largest id),
    zero padding; texts of different lengths, one filling the context. ``pad``: SigLIP's layout
    (words, end-of-text id 1, padding with id 1 to the full length, no start token)."""
    ids = np.full((rows, length), 1 if pad else 0, np.int64)
    for row, words in enumerate([3, 7, 1, length - 2][:rows]):
        if pad:
            ids[row, :words] = rng.integers(2, vocab, words)
            continue
        ids[row, 0] = vocab - 2
        ids[row, 1 : 1 + words] = rng.integers(1, vocab - 2, words)
        ids[row, 1 + words] = vocab - 1
    return ids


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    configs = Path(tempfile.mkdtemp())
    for seed, (name, config) in enumerate(MODELS.items()):
        (configs / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    shrink_timm_trunks()
    for seed, (name, config) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None).eval()
        perturb(model, seed)
        folder = OUT / name
        folder.mkdir(exist_ok=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
        size = config["vision_cfg"]["image_size"]
        pixels = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, 3, size, size), dtype=np.float32))
        text = config["text_cfg"]
        ids = token_ids(np.random.default_rng(100 + seed), 4, text["context_length"], text["vocab_size"],
                        pad=text.get("pool_type") == "last")
        with torch.no_grad():
            features = model.encode_image(pixels)
            text_features = model.encode_text(torch.from_numpy(ids))
        np.save(folder / "pixels.npy", pixels.numpy())
        np.save(folder / "image_features.npy", features.numpy())
        np.save(folder / "input_ids.npy", ids)
        np.save(folder / "text_features.npy", text_features.numpy())
        np.save(folder / "logit_scale.npy", model.logit_scale.detach().numpy())
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, features {tuple(features.shape)}",
              file=sys.stderr)
    (OUT / "VERSIONS.txt").write_text(f"open_clip {open_clip.__version__}, torch {torch.__version__}\n")


if __name__ == "__main__":
    main()
