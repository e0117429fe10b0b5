"""SigLIP 2 NaFlex: our preprocessing and vision tower against transformers' ``Siglip2ImageProcessor``
and ``Siglip2VisionModel`` (computed here, every parameter perturbed), for mixed aspect ratios and
patch budgets in one batch; the patch budget per call, its range, and the embed dataset stamp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from arrowvision import VisionEncoder, WeightLoader
from arrowvision.errors import ArrowVisionError, BackendError, ConversionError, ModelError, OptionError
from arrowvision.inputs.naflex import NaFlexBatch, NaFlexPreprocessor, check_patch_budget
from arrowvision.model.config import VisionConfig
from arrowvision.model.convert import convert
from arrowvision.model.naflex import NaFlexVisionTransformer, load_vision_tower, resize_positions
from arrowvision.model.vision import VisionTransformer

from .conftest import save_checkpoint

# 16 learned positions (a 4x4 grid), patch 8: budgets of 64..1024 patches resize that grid both ways
TINY_NAFLEX = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=8, num_patches=16)
# (height, width): 1:1, 4:3, 3:4, 16:9, 1:4, 4:1, and one smaller than a patch on a side
SHAPES = [(96, 96), (120, 160), (160, 120), (90, 160), (60, 240), (240, 60), (5, 70)]
BUDGETS = (64, 256, 1024)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def naflex_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("naflex"), "siglip2_vision", seed=3, **TINY_NAFLEX)


@pytest.fixture(scope="module")
def naflex_parquet(naflex_checkpoint) -> Path:
    out = naflex_checkpoint / "naflex.parquet"
    convert(str(naflex_checkpoint), out, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_naflex(naflex_checkpoint):
    import transformers as tf

    return tf.Siglip2VisionModel.from_pretrained(naflex_checkpoint).eval()


@pytest.fixture(scope="module")
def images(photos) -> list[Image.Image]:
    """Real photo content cut to each aspect ratio of SHAPES (resized from a crop of that ratio)."""
    sources = list(photos.values())
    out = []
    for i, (height, width) in enumerate(SHAPES):
        photo = sources[i % len(sources)]
        ratio = width / height
        h = min(photo.shape[0], int(photo.shape[1] / ratio))
        w = min(photo.shape[1], int(h * ratio))
        out.append(Image.fromarray(photo[:h, :w]).resize((width, height), Image.Resampling.BICUBIC))
    return out


def hf_processor():
    import transformers as tf

    return tf.Siglip2ImageProcessorPil(patch_size=TINY_NAFLEX["patch_size"])


def as_torch(batch: NaFlexBatch) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(part)) for part in batch)


def pad_to(batch: NaFlexBatch, length: int) -> NaFlexBatch:
    """The same images with more padding patches (what a larger budget's batch holds)."""
    extra = length - batch.pixel_values.shape[1]
    return NaFlexBatch(np.pad(batch.pixel_values, ((0, 0), (0, extra), (0, 0))),
                       np.pad(batch.pixel_attention_mask, ((0, 0), (0, extra))), batch.spatial_shapes)


def test_preprocessing_equals_transformers_for_every_shape_and_budget(images):
    processor = hf_processor()
    config = VisionConfig.from_hf({"model_type": "siglip2_vision_model", **TINY_NAFLEX})
    for budget in BUDGETS:
        theirs = processor(images=images, max_num_patches=budget, return_tensors="np")
        ours = NaFlexPreprocessor.from_config(config, budget).batch(images)
        np.testing.assert_array_equal(ours.spatial_shapes, theirs["spatial_shapes"])
        np.testing.assert_array_equal(ours.pixel_attention_mask, theirs["pixel_attention_mask"])
        assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == theirs["pixel_values"].shape
        assert np.abs(ours.pixel_values - theirs["pixel_values"]).max() <= 1e-6, budget
        patches = ours.spatial_shapes.prod(axis=1)
        assert (patches <= budget).all() and (patches > budget // 2).all()  # the budget used, not exceeded
        rows, columns = ours.spatial_shapes[SHAPES.index((60, 240))]
        assert columns == 4 * rows  # 1:4 kept


def test_position_resize_is_antialiased_bilinear_per_image():
    """Our one-matmul resize of the whole batch equals F.interpolate(bilinear, antialias) run on
    each image's grid: shrinking, growing, and mixed within an image."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(36, 5, generator=generator)  # a 6x6 grid of 5-dim positions
    grids = torch.tensor([[2, 3], [6, 6], [12, 3], [1, 1], [4, 9]])
    length = int(grids.prod(-1).max()) + 3
    resized = resize_positions(table, grids, length)
    square = table.reshape(1, 6, 6, 5).permute(0, 3, 1, 2)
    for i, (rows, columns) in enumerate(grids.tolist()):
        expected = F.interpolate(square, size=(rows, columns), mode="bilinear", align_corners=False, antialias=True)
        expected = expected.permute(0, 2, 3, 1).reshape(rows * columns, 5)
        assert (resized[i, : rows * columns] - expected).abs().max() < 1e-5, (rows, columns)
        assert resized[i, rows * columns :].abs().max() == 0  # padding gets no position


def test_mixed_shapes_and_budgets_in_one_batch_match_transformers(naflex_parquet, hf_naflex, images):
    """Every image of every budget in ONE batch of our model (padded to the largest budget) vs
    transformers fed its own processor output per budget: pooled and real-patch hidden states."""
    processor = hf_processor()
    model = NaFlexVisionTransformer.from_weights(WeightLoader(naflex_parquet))
    config = model.config
    references, last_states, ours_inputs = [], [], []
    with torch.no_grad():
        for budget in BUDGETS:
            inputs = processor(images=images, max_num_patches=budget, return_tensors="pt")
            output = hf_naflex(**inputs)
            references.append(output.pooler_output)
            last_states.append((output.last_hidden_state, inputs["pixel_attention_mask"]))
            ours_inputs.append(pad_to(NaFlexPreprocessor.from_config(config, budget).batch(images), max(BUDGETS)))
        batch = NaFlexBatch(*(np.concatenate(parts) for parts in zip(*ours_inputs)))
        ours = model(*as_torch(batch))
    reference = torch.cat(references)
    assert reference.shape == ours.pooled.shape == (len(BUDGETS) * len(images), config.hidden_size)
    assert reference.abs().max() > 0.5  # a real signal, not a degenerate model
    assert (ours.pooled - reference).abs().max() <= TOLERANCE
    for index, (state, mask) in enumerate(last_states):
        rows = ours.last_hidden_state[index * len(images) : (index + 1) * len(images), : state.shape[1]]
        real = mask.bool()
        assert (rows[real] - state[real]).abs().max() <= TOLERANCE


def test_padding_and_batch_company_do_not_change_an_embedding(naflex_parquet, images):
    encoder = VisionEncoder.from_parquet(naflex_parquet)
    alone = np.concatenate([encoder.encode([image]) for image in images])
    together = encoder.encode(images)
    assert np.abs(alone - together).max() < 1e-5
    batch = encoder.preprocessor.batch(images)
    padded = encoder.encode(pad_to(batch, 1024))
    assert np.abs(padded - together).max() < 1e-5


def test_encoder_budget_per_call_matches_transformers(naflex_parquet, hf_naflex, images):
    encoder = VisionEncoder.from_parquet(naflex_parquet, max_num_patches=64)
    assert encoder.max_num_patches == 64
    for budget in (None, 128):
        inputs = hf_processor()(images=images, max_num_patches=budget or 64, return_tensors="pt")
        with torch.no_grad():
            reference = F.normalize(hf_naflex(**inputs).pooler_output, dim=-1).numpy()
        ours = encoder.encode(images, batch_size=3, max_num_patches=budget)
        assert np.abs(ours - reference).max() <= TOLERANCE
    small, large = encoder.encode(images[:1]), encoder.encode(images[:1], max_num_patches=1024)
    assert float((small @ large.T)[0, 0]) < 0.9999  # the budget is honoured: more patches, another embedding


@pytest.mark.parametrize("budget", [63, 1025, 0, -5, 2.5, "256", True])
def test_patch_budget_outside_the_range_is_refused(naflex_parquet, budget):
    with pytest.raises(OptionError, match="max_num_patches"):
        check_patch_budget(budget)
    encoder = VisionEncoder.from_parquet(naflex_parquet)
    with pytest.raises(OptionError, match="max_num_patches"):
        encoder.encode([np.zeros((32, 32, 3), np.uint8)], max_num_patches=budget)


def test_budget_on_a_fixed_resolution_model_is_refused(tiny_siglip_parquet):
    with pytest.raises(OptionError, match="NaFlex models only"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, max_num_patches=256)
    with pytest.raises(OptionError, match="NaFlex models only"):
        VisionEncoder.from_parquet(tiny_siglip_parquet).encode([np.zeros((32, 32, 3), np.uint8)], max_num_patches=256)


def test_wrong_inputs_and_loaders_are_clear_errors(naflex_parquet):
    encoder = VisionEncoder.from_parquet(naflex_parquet)
    with pytest.raises(ArrowVisionError, match="not fixed-size"):
        encoder.encode(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(BackendError, match="NaFlexBatch"):
        encoder.backend(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ArrowVisionError, match="exact"):
        encoder.encode([np.zeros((32, 32, 3), np.uint8)], decode="fast")
    with pytest.raises(ModelError, match="NaFlex"):
        VisionTransformer.from_weights(WeightLoader(naflex_parquet))
    assert isinstance(load_vision_tower(WeightLoader(naflex_parquet)), NaFlexVisionTransformer)
    with pytest.raises(BackendError, match="not available on the torch backend"):
        VisionEncoder.from_parquet(naflex_parquet, precision="int8")


def test_torch_half_precision_is_validated_on_the_heldout_kinds(naflex_parquet, images, tmp_path):
    from arrowvision.backends.validation import KINDS

    half = VisionEncoder.from_parquet(naflex_parquet, precision="bf16", cache_dir=tmp_path)
    assert set(half.backend.report["by_kind"]) == set(KINDS) and half.backend.report["min_cosine"] >= 0.99
    cosines = (half.encode(images) * VisionEncoder.from_parquet(naflex_parquet).encode(images)).sum(axis=1)
    assert cosines.min() >= 0.99
    with pytest.raises(BackendError, match="too inaccurate"):
        VisionEncoder.from_parquet(naflex_parquet, precision="bf16", cache_dir=tmp_path, min_cosine=0.9999999)


def test_config_and_conversion_checks(naflex_checkpoint, tmp_path):
    config = json.loads((naflex_checkpoint / "config.json").read_text())
    parsed = VisionConfig.from_hf(config)
    assert parsed.naflex and parsed.num_positions == 16 and parsed.family == "siglip"
    assert VisionConfig.from_hf({"model_type": "siglip", "vision_config": {}}).naflex is False
    assert VisionConfig.preset("siglip2-base-patch16-naflex").num_patches == 256
    with pytest.raises(ConversionError, match="not a square"):
        VisionConfig.from_hf({**config, "num_patches": 15})
    with pytest.raises(ConversionError, match="num_patches"):
        VisionConfig.from_hf({**config, "num_patches": "16"})
    # a checkpoint whose position grid disagrees with its config is refused, naming the tensor
    (tmp_path / "bad").mkdir()
    for file in naflex_checkpoint.glob("*.safetensors"):
        (tmp_path / "bad" / file.name).symlink_to(file)
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "num_patches": 25}))
    with pytest.raises(ConversionError, match="position_embedding"):
        convert(str(tmp_path / "bad"), tmp_path / "bad.parquet", progress=False)


def test_full_siglip2_checkpoint_converts_with_both_towers(tmp_path, photos):
    """The hub layout (Siglip2Model: vision_model.* + text_model.*): the vision tower equals
    transformers' get_image_features."""
    import transformers as tf

    folder = save_checkpoint(tmp_path / "full", "siglip2_full", seed=5, **TINY_NAFLEX)
    convert(str(folder), tmp_path / "full.parquet", tower="all", progress=False)
    encoder = VisionEncoder.from_parquet(tmp_path / "full.parquet", max_num_patches=64)
    image = Image.fromarray(photos["rocket"])
    inputs = hf_processor()(images=[image], max_num_patches=64, return_tensors="pt")
    with torch.no_grad():
        reference = tf.Siglip2Model.from_pretrained(folder).eval().get_image_features(**inputs).pooler_output
    reference = F.normalize(reference, dim=-1).numpy()
    assert np.abs(encoder.encode([image]) - reference).max() <= TOLERANCE


def test_embed_stamps_the_patch_budget_and_matches_encode(tmp_path, naflex_parquet, images):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    out = tmp_path / "emb"
    run = subprocess.run([sys.executable, "-m", "arrowvision", "embed", str(folder), "-o", str(out), "--weights",
                          str(naflex_parquet), "--backend", "torch", "--max-num-patches", "128", "--batch-size", "3",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    parts = sorted(out.glob("part-*.parquet"))
    metadata = pq.read_schema(parts[0]).metadata
    assert metadata[b"arrowvision.max_num_patches"] == b"128"
    table = pq.read_table(parts)
    paths = table.column("path").to_pylist()
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    direct = VisionEncoder.from_parquet(naflex_parquet).encode(paths, max_num_patches=128)
    assert np.abs(direct - vectors).max() < 1e-5
    again = subprocess.run([sys.executable, "-m", "arrowvision", "embed", str(folder), "-o", str(out), "--weights",
                            str(naflex_parquet), "--backend", "torch", "--max-num-patches", "64", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "max_num_patches" in again.stderr  # another budget never mixes in
    refused = subprocess.run([sys.executable, "-m", "arrowvision", "embed", str(folder), "-o", str(tmp_path / "x"),
                              "--weights", str(naflex_parquet), "--max-num-patches", "2000"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "out of range [64, 1024]" in refused.stderr


@pytest.fixture(scope="module")
def naflex_pair(tmp_path_factory):
    """(our ImageTextModel, transformers' Siglip2Model, its tokenizer) of a full NaFlex checkpoint."""
    import transformers as tf

    from .textkit import hf_tokenizer, save_full_checkpoint

    folder = save_full_checkpoint(tmp_path_factory.mktemp("naflex_full"), "siglip2-naflex", seed=7)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    import arrowvision

    ours = arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")
    with pytest.raises(OptionError, match="out of range"):  # the image tower's budget, checked here too
        arrowvision.ImageTextModel.from_parquet(folder / "all.parquet", max_num_patches=32)
    assert arrowvision.ImageTextModel.from_parquet(folder / "all.parquet", max_num_patches=64).vision.max_num_patches == 64
    return ours, tf.Siglip2Model.from_pretrained(folder).eval(), hf_tokenizer(folder)


def test_naflex_text_tower_and_scores_match_transformers(naflex_pair, images):
    """SigLIP 2 NaFlex's text tower is SigLIP's with the Gemma tokenizer: ids, embeddings and
    image-text logits (NaFlex images of mixed shapes) against Siglip2Model."""
    from .textkit import SENTENCES

    ours, reference, tokenizer = naflex_pair
    texts = [text.lower() for text in SENTENCES[:6]]  # SigLIP 2 was trained on lowercased text
    ids = np.array(tokenizer(texts, padding="max_length", max_length=64, truncation=True)["input_ids"], dtype=np.int64)
    np.testing.assert_array_equal(ours.tokenize(texts), ids)
    inputs = hf_processor()(images=images, max_num_patches=256, return_tensors="pt")
    with torch.no_grad():
        expected_text = F.normalize(reference.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output, dim=-1)
        logits = reference(input_ids=torch.from_numpy(ids), **inputs).logits_per_image
    assert np.abs(ours.encode_texts(texts) - expected_text.numpy()).max() <= TOLERANCE
    assert np.abs(ours.logits(images, texts) - logits.numpy()).max() <= 1e-3
    assert ours.logit_bias == pytest.approx(reference.logit_bias.item(), abs=1e-6)


def test_info_names_family_and_variant(naflex_parquet, tiny_siglip_parquet, capsys):
    from arrowvision.cli import main

    assert main(["info", str(naflex_parquet)]) == 0
    out = capsys.readouterr().out
    assert "model: siglip naflex (vision tower)" in out and "any size (NaFlex: a 16-position grid" in out
    assert main(["info", str(naflex_parquet), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["variant"] == "naflex" and report["vision_config"]["num_patches"] == 16
    assert main(["info", str(tiny_siglip_parquet), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variant"] == "fixed-32"


def test_bench_command_runs_naflex_weights(naflex_parquet, capsys):
    from arrowvision.cli import main

    assert main(["bench", "--weights", str(naflex_parquet), "--backend", "torch", "--batch-sizes", "1 2", "--iters", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NaFlex 256 patches" in out and "peak RSS" in out


def test_arrow_column_embeds_naflex_images_and_refuses_fast_decode(naflex_parquet, images):
    import io

    import pyarrow as pa

    encoder = VisionEncoder.from_parquet(naflex_parquet)
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    column = pa.array(blobs + [None, b"not an image"], pa.binary())
    errors: dict[int, str] = {}
    vectors = encoder.encode_arrow(column, batch_size=3, errors=errors)
    got = np.stack(vectors.to_numpy(zero_copy_only=False)[: len(images)])
    assert np.abs(got - encoder.encode(images)).max() < 1e-5
    assert vectors[len(images)].as_py() is None and set(errors) == {len(images) + 1}
    with pytest.raises(ArrowVisionError, match="decode images exactly"):
        encoder.encode_arrow(column, decode="fast")
