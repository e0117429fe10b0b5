"""Our VisionTransformer vs transformers, same random-init weights via the Parquet file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arrowvision import VisionEncoder, WeightLoader
from arrowvision.model.convert import convert
from arrowvision.model.vision import VisionTransformer

from .conftest import BASE_SIGLIP, hf_model, save_checkpoint

TINY_CONFIGS = {
    "siglip-64-h4-p8-i32": ("siglip_vision", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)),
    # large eps and other activations: a LayerNorm built without the config's eps, or a wrong
    # activation, differs from transformers far beyond the tolerance
    "siglip-odd-48-h3-p7-i35": ("siglip_vision", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=100, image_size=35, patch_size=7, layer_norm_eps=0.5, hidden_act="gelu")),
    "siglip-96-h6-p4-i20": ("siglip_vision", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, intermediate_size=200, image_size=20, patch_size=4)),
    "siglip-full-model": ("siglip_full", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=24, patch_size=6)),
    "clip-64-h2-p8-i40": ("clip_vision", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=40, patch_size=8, projection_dim=32)),
    "clip-odd-36-h3-p6-i30": ("clip_vision", dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=77, image_size=30, patch_size=6, projection_dim=20, layer_norm_eps=0.5, hidden_act="gelu_new")),
    "clip-no-projection": ("clip_vision_no_projection", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=24, patch_size=8)),
    "clip-full-model": ("clip_full", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8, projection_dim=24)),
}
MAX_ABS = 1e-4
MIN_COSINE = 0.99999


def hf_outputs(model, pixels: torch.Tensor, interpolate: bool = False):
    """(pooled, last_hidden_state, hidden_states) from any of the HF model classes we use."""
    import transformers as tf

    with torch.no_grad():
        if isinstance(model, (tf.SiglipModel, tf.CLIPModel)):
            out = model.vision_model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
            pooled = out.pooler_output
            if isinstance(model, tf.CLIPModel):
                pooled = model.visual_projection(pooled)
            return pooled, out.last_hidden_state, out.hidden_states
        out = model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
        pooled = out.image_embeds if isinstance(model, tf.CLIPVisionModelWithProjection) else out.pooler_output
        return pooled, out.last_hidden_state, out.hidden_states


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = (ours - theirs).abs().max().item()
    assert diff <= MAX_ABS, f"{what}: max abs diff {diff:.2e}"
    assert cosine(ours, theirs).min().item() >= MIN_COSINE, what


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny_pair(request, tmp_path_factory):
    kind, config = TINY_CONFIGS[request.param]
    folder = save_checkpoint(tmp_path_factory.mktemp(request.param), kind, seed=7, **dict(config))
    parquet = folder / "weights.parquet"
    convert(str(folder), parquet, progress=False)
    return hf_model(folder), VisionTransformer.from_weights(WeightLoader(parquet)), config


@pytest.mark.parametrize("batch", [1, 5])
def test_tiny_configs_match_transformers(tiny_pair, batch):
    reference, ours, config = tiny_pair
    torch.manual_seed(batch)
    pixels = torch.randn(batch, 3, config["image_size"], config["image_size"])
    pooled, last, hidden = hf_outputs(reference, pixels)
    with torch.no_grad():
        out = ours(pixels, output_hidden_states=True)
    assert_close(out.pooled, pooled, "pooled")
    assert_close(out.last_hidden_state, last, "last_hidden_state")
    assert len(out.hidden_states) == len(hidden)
    for i, (a, b) in enumerate(zip(out.hidden_states, hidden)):
        assert_close(a, b, f"hidden_states[{i}]")


def test_interpolated_resolution_matches_transformers(tiny_pair):
    reference, ours, config = tiny_pair
    patch = config["patch_size"]
    size = config["image_size"] + 2 * patch  # a different grid: positions are interpolated
    for height, width in ((size, size + patch), (size, size)):  # non-square and square
        pixels = torch.randn(2, 3, height, width)
        pooled, last, _ = hf_outputs(reference, pixels, interpolate=True)
        with torch.no_grad():
            out = ours(pixels)
        assert_close(out.pooled, pooled, f"pooled (interpolated to {height}x{width})")
        assert_close(out.last_hidden_state, last, f"last_hidden_state (interpolated to {height}x{width})")


def test_non_square_input_with_the_stored_patch_count_is_interpolated(tiny_pair):
    """A 1 x side^2 grid has as many patches as the stored side x side table but needs
    interpolated positions."""
    reference, ours, config = tiny_pair
    patch, side = config["patch_size"], config["image_size"] // config["patch_size"]
    pixels = torch.randn(2, 3, patch, patch * side * side)
    pooled, last, _ = hf_outputs(reference, pixels, interpolate=True)
    with torch.no_grad():
        out = ours(pixels)
    assert_close(out.pooled, pooled, "pooled (same patch count, other shape)")
    assert_close(out.last_hidden_state, last, "last_hidden_state (same patch count, other shape)")


def test_loading_from_half_precision_files_casts_to_float32(tmp_path, tiny_siglip):
    out = tmp_path / "bf16.parquet"
    convert(str(tiny_siglip), out, dtype="bfloat16", progress=False)
    model = VisionTransformer.from_weights(WeightLoader(out))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = hf_model(tiny_siglip).to(torch.bfloat16).float()  # same rounding of the weights
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(pixels).pooled, reference(pixel_values=pixels).pooler_output, "pooled from bf16 weights")


@pytest.mark.slow
def test_base_config_matches_transformers(tmp_path):
    folder = save_checkpoint(tmp_path / "base", "siglip_vision", seed=0, **BASE_SIGLIP)
    parquet = tmp_path / "base.parquet"
    convert(str(folder), parquet, progress=False)
    reference = hf_model(folder)
    ours = VisionTransformer.from_weights(WeightLoader(parquet))
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        pooled, last, _ = hf_outputs(reference, pixels)
        with torch.no_grad():
            out = ours(pixels)
        assert_close(out.pooled, pooled, f"base pooled b{batch}")
        assert_close(out.last_hidden_state, last, f"base last_hidden_state b{batch}")


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_real_photos_end_to_end(kind, tiny_siglip, tiny_clip, photos):
    """Our decoding + preprocessing + model vs the HF image processor + model."""
    import transformers as tf

    folder = tiny_siglip if kind == "siglip" else tiny_clip
    parquet = folder / "e2e.parquet"
    convert(str(folder), parquet, progress=False)
    encoder = VisionEncoder.from_parquet(parquet)
    images = list(photos.values())
    ours = encoder.encode(images, batch_size=3)
    size = encoder.config.image_size
    if kind == "siglip":
        processor = tf.SiglipImageProcessorPil(size={"height": size, "width": size})
    else:
        processor = tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    pixels = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
    pooled, _, _ = hf_outputs(hf_model(folder), pixels)
    theirs = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    cosines = (ours * theirs).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
