"""open_clip checkpoints (OpenAI-style CLIP, timm-trunk SigLIP): converted files equal open_clip's
own outputs (reference fixtures written by tools/make_open_clip_fixtures.py in a separate
environment, every parameter perturbed), the state-dict + model-config form, and clear refusals
of what does not convert."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from arrowvision import ConversionError, VisionEncoder, WeightLoader
from arrowvision.model.convert import convert

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "open_clip"
MODELS = ["tiny-vit-quickgelu", "tiny-vit-gelu", "tiny-siglip-timm"]


@pytest.mark.parametrize("name", MODELS)
def test_converted_vision_tower_equals_open_clip(name, tmp_path):
    folder = FIXTURES / name
    out = tmp_path / f"{name}.parquet"
    convert(str(folder), out, progress=False)
    weights = WeightLoader(out)
    assert weights.family == ("siglip" if "siglip" in name else "clip")
    assert weights.config["open_clip"]["model_cfg"]["embed_dim"] in (24, 96)
    encoder = VisionEncoder.from_parquet(out)
    pixels, expected = np.load(folder / "pixels.npy"), np.load(folder / "image_features.npy")
    assert np.abs(expected).max() > 0.1  # a real signal
    got = encoder.encode(pixels, normalize=False)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_state_dict_file_with_a_model_config_json(tmp_path):
    """``convert STATE_DICT --config MODEL_CONFIG.json``: the bare model config open_clip ships."""
    folder = FIXTURES / "tiny-vit-quickgelu"
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "tiny.json").write_text(json.dumps(model_cfg))
    weights = tmp_path / "elsewhere" / "state.safetensors"
    weights.parent.mkdir()
    shutil.copy(folder / "open_clip_model.safetensors", weights)
    convert(str(weights), tmp_path / "out.parquet", config_path=str(tmp_path / "tiny.json"), progress=False)
    got = VisionEncoder.from_parquet(tmp_path / "out.parquet").encode(np.load(folder / "pixels.npy"), normalize=False)
    assert np.abs(got - np.load(folder / "image_features.npy")).max() <= 1e-4


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_gap_224", "timm_pool": "avg",
                     "timm_proj": "none"}}, "timm trunk 'vit_base_patch16_siglip_gap_224'"),
    ({"vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_224", "timm_pool": "map"}}, "does not convert"),
    ({"vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64}}, "ModifiedResNet"),
    ({"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "attentional_pool": True}}, "attentional_pool=True"),
    ({"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "ls_init_value": 0.1}}, "ls_init_value"),
])
def test_unsupported_variants_are_refused(change, message, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-vit-quickgelu", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"].update(change)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        convert(str(folder), tmp_path / "out.parquet", progress=False)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("name", MODELS)
def test_converted_text_tower_and_logit_scale_equal_open_clip(name, tmp_path):
    """--tower all: the causal text tower pooled at the end-of-text token, and logit_scale."""
    import torch

    from arrowvision.model.text import TextTransformer

    folder = FIXTURES / name
    out = tmp_path / "all.parquet"
    convert(str(folder), out, tower="all", progress=False)
    weights = WeightLoader(out)
    model = TextTransformer.from_weights(weights)
    ids, expected = np.load(folder / "input_ids.npy"), np.load(folder / "text_features.npy")
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).pooled.numpy()
    assert np.abs(expected).max() > 0.1
    assert np.abs(got - expected).max() <= 1e-4
    stored, expected_scale = weights.tensor("logit_scale").reshape(-1), np.load(folder / "logit_scale.npy").reshape(-1)
    assert stored.shape == (1,) and abs(float(stored[0]) - float(expected_scale[0])) <= 1e-6
    if "siglip" in name:
        assert weights.tensor("logit_bias").reshape(-1)[0] != 0  # SigLIP's bias, perturbed
    image = VisionEncoder.from_parquet(out).encode(np.load(folder / "pixels.npy"), normalize=False)
    assert np.abs(image - np.load(folder / "image_features.npy")).max() <= 1e-4  # the same file's vision tower


def test_text_tower_and_mismatched_tensors_are_refused(tmp_path):
    folder = tmp_path / "hf_text"
    shutil.copytree(FIXTURES / "tiny-vit-quickgelu", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "xlm-roberta-base"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="hf_model_name='xlm-roberta-base' is not supported"):
        convert(str(folder), tmp_path / "out.parquet", tower="all", progress=False)
    convert(str(folder), tmp_path / "vision.parquet", progress=False)  # the vision tower still converts
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-vit-quickgelu", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["layers"] = 3  # the file holds 2 blocks
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="num_hidden_layers is 3 but the file.s encoder layers are 2"):
        convert(str(folder), tmp_path / "out.parquet", progress=False)
