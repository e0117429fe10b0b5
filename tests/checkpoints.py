"""Test checkpoints: transformers SigLIP/CLIP models built from a config with a fixed seed and
EVERY parameter perturbed.

Why: transformers' random init leaves every LayerNorm at weight 1 / bias 0 and most biases at 0
(29 of 48 SigLIP vision tensors). On such a model, swapping ``layer_norm1``/``layer_norm2`` or
dropping an attention bias changes nothing, so parity tests cannot see those bugs. Here every
floating-point parameter (LayerNorms, biases, positions, the MAP probe, CLIP's class embedding,
``logit_scale``/``logit_bias`` and the text tower of full models) gets seeded Gaussian noise on
top of the init, and ``assert_no_degenerate_tensors`` checks that none is left constant.

Used by the test fixtures (conftest), the parity and conversion tests, and
tools/make_demo_assets.py (the bundled demo model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEXT_CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
KINDS = ("siglip_vision", "clip_vision", "clip_vision_no_projection", "siglip_full", "clip_full", "siglip2_vision", "siglip2_full")
MIN_NOISE = 0.1  # std of the noise added to parameters that init leaves constant (LN 1/0, zero biases)
RELATIVE_NOISE = 0.1  # noise std, relative to the tensor's own spread, for parameters that are already random


def build_model(kind: str, seed: int = 0, **config: Any):
    """A transformers model of ``kind`` (see KINDS) from a vision config, perturbed, in eval mode."""
    import torch
    import transformers as tf

    config = dict(config)
    torch.manual_seed(seed)
    if kind == "siglip_vision":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**config))
    elif kind == "clip_vision":
        model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**config))
    elif kind == "clip_vision_no_projection":  # pooled output is the post-LN class token
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**config))
    elif kind == "siglip_full":  # the layout the hub publishes: vision_model.* + text_model.*
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=config, text_config=dict(TEXT_CONFIG)))
    elif kind == "siglip2_vision":  # SigLIP 2 NaFlex: Linear patch embedding, resized position grid
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**config))
    elif kind == "siglip2_full":
        model = tf.Siglip2Model(tf.Siglip2Config(vision_config=config, text_config=dict(TEXT_CONFIG)))
    elif kind == "clip_full":
        projection = config.pop("projection_dim", 48)
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=config, text_config=dict(TEXT_CONFIG), projection_dim=projection))
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    perturb(model, seed)
    assert_no_degenerate_tensors(model)
    return model.eval()


def perturb(model, seed: int = 0) -> None:
    """Add seeded Gaussian noise to every floating-point parameter, in place.

    Tensors that init leaves constant get noise of std ``MIN_NOISE``: LayerNorm weights end up
    around 1 +- 0.1 and biases around 0 +- 0.1, different in every position. Tensors that are
    already random get a tenth of their own spread, so activations keep a realistic scale (a
    base-size tower's outputs stay O(1), where fp32 backends agree to ~1e-5)."""
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for _name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            if not parameter.is_floating_point():
                continue
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(((RELATIVE_NOISE * spread if spread > 0 else MIN_NOISE) * noise).to(parameter.dtype))


def assert_no_degenerate_tensors(model) -> None:
    """Fail if any parameter is constant (all ones, all zeros, ...): a bug could hide behind it."""
    constant = [name for name, p in model.named_parameters() if p.numel() > 1 and bool((p == p.flatten()[0]).all())]
    assert not constant, f"parameters left constant: {constant}"


def save_checkpoint(folder: Path, kind: str, seed: int = 0, **config: Any) -> Path:
    """A perturbed checkpoint of ``kind`` saved like a hub checkpoint (config.json + safetensors)."""
    build_model(kind, seed, **config).save_pretrained(folder)
    return folder
