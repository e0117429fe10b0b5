"""Text tower vs transformers: full SigLIP / SigLIP 2 (Gemma tokenizer) / CLIP checkpoints with every
parameter perturbed, their tokenizers built offline, processor + model on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import arrowvision
from arrowvision.model.convert import convert

from .textkit import AWKWARD, SENTENCES, TINY_VISION, hf_tokenizer, save_full_checkpoint

EMBED_MAX_ABS = 1e-4
LOGITS_MAX_ABS = 1e-3
KINDS = {
    "siglip": dict(kind="siglip"),
    "siglip2-gemma": dict(kind="siglip2"),
    "clip": dict(kind="clip"),
    "clip-legacy-eos2": dict(kind="clip", eos_token_id=2),
}


def hf_input_ids(tokenizer, family_kind: str, texts: list[str]) -> np.ndarray:
    """transformers' ids on each family's standard settings."""
    if family_kind == "siglip":
        out = tokenizer(texts, padding="max_length", max_length=64, truncation=True)
    elif family_kind == "siglip2":  # SigLIP 2 was trained on lowercased text
        out = tokenizer([t.lower() for t in texts], padding="max_length", max_length=64, truncation=True)
    else:
        out = tokenizer(texts, padding=True, truncation=True)
    return np.array(out["input_ids"], dtype=np.int64)


def features(output) -> torch.Tensor:
    """get_text_features / get_image_features return a tensor (v4) or a model output (v5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tmp_path_factory):
    """(kind, our ImageTextModel, HF model, HF tokenizer, HF image processor)."""
    import transformers as tf

    spec = dict(KINDS[request.param])
    folder = save_full_checkpoint(tmp_path_factory.mktemp(request.param), spec["kind"], seed=3, eos_token_id=spec.get("eos_token_id"))
    parquet = folder / "all.parquet"
    convert(str(folder), parquet, tower="all", progress=False)
    ours = arrowvision.ImageTextModel.from_parquet(parquet)
    reference = (tf.SiglipModel if spec["kind"].startswith("siglip") else tf.CLIPModel).from_pretrained(folder).eval()
    size = {"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]}
    if spec["kind"].startswith("siglip"):
        processor = tf.SiglipImageProcessor(size=size)
    else:
        processor = tf.CLIPImageProcessor(size={"shortest_edge": TINY_VISION["image_size"]}, crop_size=size)
    return spec["kind"], ours, reference, hf_tokenizer(folder), processor


def test_token_ids_equal_transformers(pair):
    kind, ours, _, tokenizer, _ = pair
    for texts in (AWKWARD, SENTENCES[:3], [AWKWARD[0]], [""]):
        expected = hf_input_ids(tokenizer, kind, list(texts))
        np.testing.assert_array_equal(ours.tokenize(texts), expected)


def test_text_embeddings_match_transformers(pair):
    kind, ours, reference, tokenizer, _ = pair
    texts = AWKWARD + SENTENCES
    ids = torch.from_numpy(hf_input_ids(tokenizer, kind, texts))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(features(reference.get_text_features(input_ids=ids)), dim=-1).numpy()
    got = ours.encode_texts(texts, batch_size=7)  # CLIP batches pad to their own longest text
    assert got.shape == expected.shape and got.dtype == np.float32
    diff = np.abs(got - expected).max()
    assert diff <= EMBED_MAX_ABS, f"{kind}: text embeddings max abs diff {diff:.2e}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_logits_and_probabilities_match_transformers(pair, photos):
    kind, ours, reference, tokenizer, processor = pair
    images = list(photos.values())
    texts = ["a photo of an astronaut.", "A CAT!", "a cup of coffee", "rocket launch", ""]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = torch.from_numpy(hf_input_ids(tokenizer, kind, texts))
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
    expected = out.logits_per_image.numpy()
    got = ours.logits(images, texts)
    assert got.shape == (len(images), len(texts))
    diff = np.abs(got - expected).max()
    assert diff <= LOGITS_MAX_ABS, f"{kind}: logits_per_image max abs diff {diff:.2e}"
    if kind.startswith("siglip"):
        expected_probs = torch.sigmoid(out.logits_per_image).numpy()
    else:
        expected_probs = out.logits_per_image.softmax(dim=1).numpy()
    np.testing.assert_allclose(ours.probabilities(images, texts), expected_probs, atol=1e-4)


def test_logit_scale_and_bias_are_the_checkpoints(pair):
    kind, ours, reference, _, _ = pair
    assert ours.logit_scale == pytest.approx(reference.logit_scale.item(), abs=1e-6)
    assert abs(ours.logit_scale - 2.6592) > 1e-3  # perturbed off transformers' init
    if kind.startswith("siglip"):
        assert ours.logit_bias == pytest.approx(reference.logit_bias.item(), abs=1e-6)
        assert ours.logit_bias != 0.0
    else:
        assert ours.logit_bias == 0.0


def test_clip_score_and_zero_shot(pair, photos):
    kind, ours, _, _, _ = pair
    images = [photos["astronaut"], photos["chelsea"]]
    texts = ["an astronaut", "a cat"]
    image_emb, text_emb = ours.encode_images(images), ours.encode_texts(texts)
    expected = np.maximum(100 * (image_emb * text_emb).sum(axis=1), 0)
    np.testing.assert_allclose(ours.clip_score(images, texts), expected, atol=1e-4)
    ranked = ours.zero_shot(images, ["astronaut", "cat", "rocket"])
    probs = ours.probabilities(images, [f"a photo of a {label}." for label in ("astronaut", "cat", "rocket")])
    for row, ranking in zip(probs, ranked):
        assert [p for _, p in ranking] == sorted((float(p) for p in row), reverse=True)
        assert sorted(label for label, _ in ranking) == ["astronaut", "cat", "rocket"]
    if kind == "clip":
        assert all(sum(p for _, p in ranking) == pytest.approx(1.0, abs=1e-5) for ranking in ranked)


def test_text_encoder_matches_image_text_model(pair, tmp_path):
    _, ours, _, _, _ = pair
    encoder = arrowvision.TextEncoder.from_parquet(ours.text.weights.path)
    texts = SENTENCES[:4]
    np.testing.assert_allclose(encoder.encode(texts), ours.encode_texts(texts), rtol=0, atol=1e-6)
    assert encoder.encode(texts, normalize=False).shape == (4, encoder.embedding_dim)


def test_openvino_text_and_scores_match_transformers(pair, photos, tmp_path):
    """fp32 IR for both towers: the same thresholds as the torch path."""
    kind, ours, reference, tokenizer, processor = pair
    fast = arrowvision.ImageTextModel.from_parquet(ours.text.weights.path, backend="openvino", cache_dir=tmp_path)
    assert fast.text.backend.name == "openvino" and fast.vision.backend.name == "openvino"
    texts = AWKWARD + SENTENCES
    ids = torch.from_numpy(hf_input_ids(tokenizer, kind, texts))
    images = list(photos.values())
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected_text = torch.nn.functional.normalize(features(reference.get_text_features(input_ids=ids)), dim=-1).numpy()
        expected_logits = reference(input_ids=ids, pixel_values=pixels).logits_per_image.numpy()
    assert np.abs(fast.encode_texts(texts, batch_size=7) - expected_text).max() <= EMBED_MAX_ABS
    assert np.abs(fast.logits(images, texts) - expected_logits).max() <= LOGITS_MAX_ABS
