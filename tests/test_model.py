"""Our VisionTransformer's own contract: clear ModelErrors for weights that do not fit their
config, and the pieces the parity tests exercise only indirectly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arrowvision import ModelError, WeightLoader
from arrowvision.model.vision import VisionTransformer, activation, hf_name
from arrowvision.weights.writer import write_weights


def rewrite_weights(source: Path, target: Path, config: dict | None = None, drop: str | None = None) -> Path:
    """A copy of a weights file with another config and/or one tensor left out."""
    weights = WeightLoader(source)
    tensors = [(name, weights.tensor(name)) for name in weights.names() if name != drop]
    write_weights(target, tensors, config=config or weights.config, family=weights.family)
    return target


def test_model_error_for_weights_that_do_not_fit_their_config(tmp_path, tiny_siglip_parquet):
    config = WeightLoader(tiny_siglip_parquet).config
    wrong_mlp = rewrite_weights(tiny_siglip_parquet, tmp_path / "mlp.parquet", {**config, "intermediate_size": 256})
    with pytest.raises(ModelError, match="tensors do not match the config; wrong shapes: .*mlp.fc1.weight"):
        VisionTransformer.from_weights(WeightLoader(wrong_mlp))
    missing = rewrite_weights(tiny_siglip_parquet, tmp_path / "missing.parquet", drop="head.probe")
    with pytest.raises(ModelError, match="tensors do not match the config; missing tensors: head.probe"):
        VisionTransformer.from_weights(WeightLoader(missing))


def test_unknown_activation_is_a_model_error():
    with pytest.raises(ModelError, match="unsupported activation 'swish'"):
        activation("swish")


@pytest.mark.parametrize("name,expected", [
    ("gelu_pytorch_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("gelu_new", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("gelu_fast", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("gelu", torch.nn.functional.gelu),
    ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
])
def test_activations_match_transformers(name, expected):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 241)
    torch.testing.assert_close(activation(name)(x), ACT2FN[name](x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(activation(name)(x), expected(x))


def test_weight_map_names():
    assert hf_name("encoder.layers.0.mlp.fc1.weight") == "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert hf_name("head.probe", "") == "head.probe"
    assert hf_name("visual_projection.weight") == "visual_projection.weight"  # outside the vision tower in HF


def test_loading_keeps_or_casts_the_file_dtype(tmp_path, tiny_siglip):
    from arrowvision.model.convert import convert

    half = tmp_path / "half.parquet"
    convert(str(tiny_siglip), half, dtype="bfloat16", progress=False)
    kept = VisionTransformer.from_weights(WeightLoader(half), dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    cast = VisionTransformer.from_weights(WeightLoader(half))
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in cast.parameters()) and not cast.training
    pixels = torch.randn(2, 3, 32, 32)  # float32 input into a bf16 model: cast on the way in
    with torch.no_grad():
        low, full = kept(pixels).pooled, cast(pixels).pooled
    assert low.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(low.float(), full).min() > 0.99


def test_hidden_states_only_when_asked(tiny_siglip_parquet):
    model = VisionTransformer.from_weights(WeightLoader(tiny_siglip_parquet))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain, full = model(pixels), model(pixels, output_hidden_states=True)
    assert plain.hidden_states is None
    assert len(full.hidden_states) == model.config.num_layers + 1
    torch.testing.assert_close(plain.pooled, full.pooled)
