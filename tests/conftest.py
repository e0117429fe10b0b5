"""Shared fixtures: real HF checkpoints (fixed seed, every parameter perturbed; see checkpoints.py)
saved with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from .checkpoints import save_checkpoint  # noqa: F401  (re-exported for the test modules)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_SIGLIP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
TINY_CLIP = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, projection_dim=48)
BASE_SIGLIP = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def hf_model(folder: Path):
    import json

    import transformers as tf

    config = json.loads((folder / "config.json").read_text())
    return getattr(tf, config["architectures"][0]).from_pretrained(folder).eval()


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny_siglip"), "siglip_vision", **TINY_SIGLIP)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny_clip"), "clip_vision", **TINY_CLIP)


@pytest.fixture(scope="session")
def tiny_siglip_parquet(tiny_siglip, tmp_path_factory) -> Path:
    from arrowvision.model.convert import convert

    out = tmp_path_factory.mktemp("pq") / "tiny_siglip.parquet"
    convert(str(tiny_siglip), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_clip_parquet(tiny_clip, tmp_path_factory) -> Path:
    from arrowvision.model.convert import convert

    out = tmp_path_factory.mktemp("pq") / "tiny_clip.parquet"
    convert(str(tiny_clip), out, progress=False)
    return out


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos shipped inside scikit-image's wheel (RGB uint8 HWC)."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
    }


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory) -> Path:
    """One artifact cache (ARROWVISION_CACHE) shared by a test module's exports."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("ARROWVISION_CACHE")
    os.environ["ARROWVISION_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ARROWVISION_CACHE")
    else:
        os.environ["ARROWVISION_CACHE"] = old


@pytest.fixture(scope="session")
def siglip_all_parquet(tmp_path_factory) -> Path:
    """A tiny SigLIP with both towers (converted with --tower all), shared by the service tests."""
    from arrowvision.model.convert import convert

    from .textkit import save_full_checkpoint

    folder = save_full_checkpoint(tmp_path_factory.mktemp("siglip_all"), "siglip", seed=23)
    convert(str(folder), folder / "siglip-all.parquet", tower="all", progress=False)
    return folder / "siglip-all.parquet"
