"""Text tower storage, errors and tokenizer rules (parity with transformers: test_text_parity.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import arrowvision
from arrowvision import ModelError, WeightLoader
from arrowvision.model.convert import convert
from arrowvision.scoring import clip_score, logits, probabilities
from arrowvision.weights.format import FORMAT_VERSION, TOKENIZER_PREFIX

from .conftest import save_checkpoint
from .textkit import SENTENCES, save_full_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Folder and ``--tower all`` Parquet file per family."""
    out = {}
    for kind in ("siglip", "clip"):
        folder = save_full_checkpoint(tmp_path_factory.mktemp(kind), kind, seed=5)
        convert(str(folder), folder / "all.parquet", tower="all", progress=False)
        out[kind] = folder
    return out


def test_tower_all_stores_tokenizer_files_and_logit_scalars(checkpoints):
    folder = checkpoints["siglip"]
    weights = WeightLoader(folder / "all.parquet", verify=True)
    assert weights.metadata["format_version"] == FORMAT_VERSION == "2"
    files = weights.tokenizer_files()
    assert set(files) == {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"}
    for name, data in files.items():
        assert data == (folder / name).read_bytes()
    assert "logit_scale" in weights and "logit_bias" in weights
    assert weights.tensor(f"{TOKENIZER_PREFIX}spiece.model").dtype == np.uint8
    clip_files = WeightLoader(checkpoints["clip"] / "all.parquet").tokenizer_files()
    assert {"vocab.json", "merges.txt"} <= set(clip_files)


def test_parameter_count_excludes_tokenizer_bytes(checkpoints, tmp_path):
    import transformers as tf

    folder = checkpoints["clip"]
    summary = convert(str(folder), tmp_path / "o.parquet", tower="all", progress=False)
    expected = sum(p.numel() for p in tf.CLIPModel.from_pretrained(folder).parameters())
    assert summary["parameters"] == expected


def test_tokenizer_rows_are_plain_parquet(checkpoints):
    import pyarrow.parquet as pq

    table = pq.read_table(checkpoints["siglip"] / "all.parquet", columns=["name", "dtype", "data"])
    rows = {n: (d, b) for n, d, b in zip(*(table.column(c).to_pylist() for c in ("name", "dtype", "data")))}
    dtype, data = rows["tokenizer/tokenizer_config.json"]
    assert dtype == "uint8" and json.loads(data)["model_max_length"] == 64


def test_vision_only_file_asks_for_tower_all(tiny_siglip_parquet):
    with pytest.raises(ModelError, match="--tower all"):
        arrowvision.TextEncoder.from_parquet(tiny_siglip_parquet)
    with pytest.raises(ModelError, match="--tower all"):
        arrowvision.ImageTextModel.from_parquet(tiny_siglip_parquet)


def test_bundled_version_1_file_still_reads():
    weights = WeightLoader(ROOT / "weights" / "siglip-demo-random.parquet")
    assert weights.metadata["format_version"] == "1"
    assert weights.tokenizer_files() == {}
    assert arrowvision.VisionEncoder.from_parquet(weights.path).encode(np.zeros((1, 3, 224, 224), np.float32)).shape[0] == 1


def test_vision_tower_of_an_all_file_matches_the_vision_only_file(checkpoints, tmp_path, photos):
    folder = checkpoints["siglip"]
    convert(str(folder), tmp_path / "vision.parquet", tower="vision", progress=False)
    images = [photos["astronaut"], photos["coffee"]]
    both = arrowvision.VisionEncoder.from_parquet(folder / "all.parquet").encode(images)
    vision = arrowvision.VisionEncoder.from_parquet(tmp_path / "vision.parquet").encode(images)
    np.testing.assert_allclose(both, vision, rtol=0, atol=1e-6)  # same tensors; GEMM rounding may differ


def test_checkpoint_without_tokenizer_converts_with_a_warning_then_names_what_is_missing(tmp_path, caplog):
    folder = save_checkpoint(tmp_path / "ckpt", "siglip_full", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, image_size=16, patch_size=8)
    with caplog.at_level(logging.WARNING, logger="arrowvision"):
        convert(str(folder), tmp_path / "all.parquet", tower="all", progress=False)
    assert "no tokenizer files" in caplog.text
    with pytest.raises(ModelError, match="no usable siglip tokenizer"):
        arrowvision.TextEncoder.from_parquet(tmp_path / "all.parquet")


def test_siglip_ids_are_64_long_and_keep_the_final_eos(checkpoints):
    model = arrowvision.TextEncoder.from_parquet(checkpoints["siglip"] / "all.parquet")
    ids = model.tokenize(["a cat", " ".join(SENTENCES * 5), ""])
    eos = model.tokenizer.eos_id
    assert ids.shape == (3, 64) and ids.dtype == np.int64
    assert ids[1, -1] == eos and (ids[1] != eos).sum() == 63  # truncated: 63 pieces then </s>
    assert ids[0, (ids[0] != eos).sum()] == eos  # </s> after the text, then </s> padding
    assert model.tokenize("A Cat!!").tolist() == model.tokenize("a   cat").tolist()  # canonicalized


def test_clip_pads_to_the_longest_and_padding_does_not_change_embeddings(checkpoints):
    model = arrowvision.TextEncoder.from_parquet(checkpoints["clip"] / "all.parquet")
    short = model.tokenize(["a cat", "a dog in the park"])
    assert short.shape[1] < 77 and short[0, 0] == short[1, 0]  # <|startoftext|>
    long = model.tokenize([" ".join(SENTENCES * 5)])
    assert long.shape == (1, 77) and long[0, -1] == long.max()  # truncated, <|endoftext|> kept
    alone = model.encode(["a cat"])
    with_long = model.encode(["a cat", " ".join(SENTENCES * 5)], batch_size=2)[:1]
    np.testing.assert_allclose(alone, with_long, atol=1e-6)


def test_texts_must_be_strings(checkpoints):
    model = arrowvision.TextEncoder.from_parquet(checkpoints["clip"] / "all.parquet")
    with pytest.raises(ModelError, match="strings"):
        model.tokenize(["ok", 3])
    assert model.encode([]).shape == (0, model.embedding_dim)


def test_scoring_rules():
    image = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    text = np.array([[3.0, 0.0], [1.0, -1.0]], np.float32)
    got = logits(image, text, logit_scale=np.log(10.0), logit_bias=-2.0)
    np.testing.assert_allclose(got, [[10 - 2, 10 / np.sqrt(2) - 2], [-2, -10 / np.sqrt(2) - 2]], atol=1e-5)
    np.testing.assert_allclose(probabilities(got, "siglip"), 1 / (1 + np.exp(-got)), atol=1e-6)
    np.testing.assert_allclose(probabilities(got, "clip").sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(clip_score(image, text), [100.0, 0.0], atol=1e-4)  # negative cosine clipped to 0
    with pytest.raises(arrowvision.ArrowVisionError, match="pairs"):
        clip_score(image, text[:1])


def test_text_presets_match_transformers_defaults_and_vision_presets():
    import dataclasses

    import transformers as tf

    from arrowvision.model.config import PRESETS
    from arrowvision.model.text_config import TEXT_PRESETS, TextConfig

    assert set(TEXT_PRESETS) == set(PRESETS)  # one name, both towers
    assert TextConfig.from_hf(tf.SiglipConfig().to_dict()) == TEXT_PRESETS["siglip-base-patch16-224"]
    clip = TextConfig.from_hf(tf.CLIPConfig().to_dict())
    assert dataclasses.replace(clip, eos_token_id=2) == TEXT_PRESETS["clip-vit-base-patch32"]  # hub configs: legacy eos 2
    for name, preset in TEXT_PRESETS.items():
        vision = PRESETS[name]
        assert preset.family == vision.family and preset.embedding_dim == vision.embedding_dim, name


def _rewrite(source: Path, target: Path, *, config=None, replace_files=None) -> Path:
    """Copy a weights file with another config or other tokenizer file bytes."""
    from arrowvision.weights.writer import write_weights

    weights = WeightLoader(source)
    tensors = dict(weights.numpy())
    for name, data in (replace_files or {}).items():
        tensors[TOKENIZER_PREFIX + name] = np.frombuffer(data, np.uint8)
    write_weights(target, tensors.items(), config=config or weights.config, family=weights.family, tower="all")
    return target


def test_text_config_claiming_more_layers_than_the_file_is_refused_before_building(checkpoints, tmp_path):
    source = checkpoints["siglip"] / "all.parquet"
    config = json.loads(json.dumps(WeightLoader(source).config))
    config["text_config"]["num_hidden_layers"] = 200_000
    bomb = _rewrite(source, tmp_path / "bomb.parquet", config=config)
    with pytest.raises(ModelError, match="num_hidden_layers is 200000 but the file's text layers are 2"):
        arrowvision.TextEncoder.from_parquet(bomb)


@pytest.mark.parametrize("payload", [b'{"model_max_length": NaN}', b"[" * 200 + b"]" * 200, b"\xff\xfe"])
def test_hostile_tokenizer_json_is_a_clear_error(checkpoints, tmp_path, payload):
    bad = _rewrite(checkpoints["clip"] / "all.parquet", tmp_path / "bad.parquet", replace_files={"tokenizer_config.json": payload})
    with pytest.raises(ModelError, match="stored tokenizer file tokenizer_config.json"):
        arrowvision.TextEncoder.from_parquet(bad)
