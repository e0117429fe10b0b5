"""``VisionConfig.from_hf`` on config.json files as the hub ships them, checked against what
transformers itself derives from the same file.

Hub configs leave out most keys that equal transformers' defaults (google/siglip-base-patch16-224
gives its vision tower only a patch size), so our fallbacks decide the model: a wrong default eps
or activation would silently change every embedding. Each dict below keeps only the keys the hub
repo's config.json carries (bookkeeping keys such as ``transformers_version`` included, since
from_hf must ignore them); transformers reads the same file with ``AutoConfig.from_pretrained``
and builds the vision tower on the meta device, and every field we derive must agree.
"""

from __future__ import annotations

import json

import pytest

from arrowvision.model.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VisionConfig

HUB_CONFIGS = {
    # google/siglip-base-patch16-224: the vision tower is all defaults except the patch size
    "google/siglip-base-patch16-224": {
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "model_type": "siglip_text_model",
                        "num_attention_heads": 12, "vocab_size": 32000},
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16},
    },
    # google/siglip-so400m-patch14-384: sizes given, eps and activation left to the defaults
    "google/siglip-so400m-patch14-384": {
        "architectures": ["SiglipModel"],
        "initializer_factor": 1.0,
        "model_type": "siglip",
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                        "num_attention_heads": 16, "num_hidden_layers": 27},
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
    },
    # google/siglip-large-patch16-384
    "google/siglip-large-patch16-384": {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "model_type": "siglip_text_model",
                        "num_attention_heads": 16, "num_hidden_layers": 24},
        "vision_config": {"hidden_size": 1024, "image_size": 384, "intermediate_size": 4096, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 16},
    },
    # a SiglipModel config.json with no vision_config at all: every field is a default
    "siglip-empty-vision-config": {"architectures": ["SiglipModel"], "model_type": "siglip"},
    # a vision-only checkpoint (SiglipVisionModel.save_pretrained of a hub model)
    "siglip-vision-only": {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "patch_size": 16,
                           "image_size": 256},
    # openai/clip-vit-base-patch32: full vision/text dicts (plus the legacy *_config_dict keys)
    "openai/clip-vit-base-patch32": {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 512,
        "text_config": {"hidden_act": "quick_gelu", "hidden_size": 512, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
                        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 8,
                        "num_hidden_layers": 12, "projection_dim": 512, "vocab_size": 49408},
        "text_config_dict": None,
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224, "intermediate_size": 3072,
                          "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 12,
                          "num_channels": 3, "num_hidden_layers": 12, "patch_size": 32, "projection_dim": 512},
        "vision_config_dict": None,
    },
    # openai/clip-vit-large-patch14-336: only the non-default vision keys
    "openai/clip-vit-large-patch14-336": {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
    },
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K style: gelu (not quick_gelu), eps left to the default
    "laion/CLIP-ViT-H-14": {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 1024,
        "text_config": {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                        "num_hidden_layers": 24, "projection_dim": 1024},
        "vision_config": {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                          "num_hidden_layers": 32, "patch_size": 14, "projection_dim": 1024},
    },
    # a CLIPModel config.json with nothing but the model type
    "clip-empty-vision-config": {"architectures": ["CLIPModel"], "model_type": "clip"},
    # CLIPVisionModelWithProjection saved alone
    "clip-vision-only": {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
                         "patch_size": 16, "projection_dim": 256},
}


def transformers_view(folder, config: dict):
    """(vision config, vision tower state-dict shapes, projection dim) as transformers reads config.json."""
    import torch
    import transformers as tf

    (folder / "config.json").write_text(json.dumps(config))
    hf = tf.AutoConfig.from_pretrained(folder)
    vision = getattr(hf, "vision_config", hf)
    projection = getattr(hf, "projection_dim", None)
    with torch.device("meta"):
        if vision.model_type == "siglip_vision_model":
            tower = tf.SiglipVisionModel(vision)
        else:
            tower = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**{**vision.to_dict(), "projection_dim": projection}))
    shapes = {name: tuple(t.shape) for name, t in tower.state_dict().items() if not name.endswith("position_ids")}
    return vision, shapes, projection


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_minimal_hub_config_matches_transformers_defaults(tmp_path, name):
    config = HUB_CONFIGS[name]
    ours = VisionConfig.from_hf(json.loads(json.dumps(config)))
    vision, shapes, projection = transformers_view(tmp_path, config)
    derived = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": vision.num_channels,
        "hidden_size": vision.hidden_size,
        "num_layers": vision.num_hidden_layers,
        "num_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "layer_norm_eps": vision.layer_norm_eps,
        "hidden_act": vision.hidden_act,
    }
    for field, expected in derived.items():
        assert getattr(ours, field) == expected, (field, getattr(ours, field), expected)
    if ours.family == "clip":
        assert ours.projection_dim == projection
        assert (ours.image_mean, ours.image_std) == (CLIP_MEAN, CLIP_STD)
    else:
        assert ours.projection_dim is None
        assert (ours.image_mean, ours.image_std) == (SIGLIP_MEAN, SIGLIP_STD)
    # the whole weight map: every tensor name and shape transformers would build from this file
    expected_shapes = {(n if n.startswith("visual_projection.") else "vision_model." + n.removeprefix("vision_model.")): s
                       for n, s in shapes.items()}
    assert ours.expected_tensors() == expected_shapes  # full-checkpoint names by default
    assert ours.embedding_dim == (projection if ours.family == "clip" else vision.hidden_size)


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_preprocessing_constants_match_transformers(family):
    """Mean/std fall back to the values transformers' image processors use for the family."""
    import transformers as tf

    processor = tf.SiglipImageProcessorPil() if family == "siglip" else tf.CLIPImageProcessorPil()
    ours = VisionConfig.from_hf({"model_type": family})
    assert ours.image_mean == pytest.approx(tuple(processor.image_mean))
    assert ours.image_std == pytest.approx(tuple(processor.image_std))


@pytest.mark.parametrize("preset,hub", [
    ("siglip-base-patch16-224", "google/siglip-base-patch16-224"),
    ("siglip-so400m-patch14-384", "google/siglip-so400m-patch14-384"),
    ("siglip-large-patch16-384", "google/siglip-large-patch16-384"),
    ("clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    ("clip-vit-large-patch14-336", "openai/clip-vit-large-patch14-336"),
])
def test_presets_equal_the_hub_configs(preset, hub):
    assert VisionConfig.preset(preset) == VisionConfig.from_hf(HUB_CONFIGS[hub])


def test_config_errors_name_the_problem():
    from arrowvision import ConversionError
    from arrowvision.model.config import vision_prefix

    with pytest.raises(ConversionError, match="unsupported model family 'bert'; supported: siglip, clip"):
        VisionConfig("bert")
    with pytest.raises(ConversionError, match="num_attention_heads: 3 does not divide hidden_size 10"):
        VisionConfig("siglip", hidden_size=10, num_heads=3)
    with pytest.raises(ConversionError, match="patch_size: 16 is larger than image_size 8"):
        VisionConfig("siglip", image_size=8)
    assert VisionConfig("siglip", image_size=16, patch_size=16).grid_size == 1  # one patch is fine
    with pytest.raises(ConversionError, match="unsupported model_type ''; supported: clip, clip_vision_model, siglip, "
                                              "siglip_vision_model"):
        VisionConfig.from_hf({"vision_config": {}})
    with pytest.raises(ConversionError, match="^SigLIP checkpoints without the attention-pooling head are not supported$"):
        VisionConfig.from_hf({"model_type": "siglip", "vision_config": {"vision_use_head": False}})
    with pytest.raises(ConversionError, match=r"^no vision tower found: no tensor named \[vision_model\.\]embeddings\.patch_embedding\.weight$"):
        vision_prefix(["text_model.embeddings.token_embedding.weight"])


def test_channel_count_comes_from_the_config():
    from arrowvision import ConversionError

    config = VisionConfig.from_hf({"model_type": "siglip_vision_model", "num_channels": 3})
    assert config.expected_tensors("")["embeddings.patch_embedding.weight"] == (768, 3, 16, 16)
    with pytest.raises(ConversionError, match="num_channels: 1 is out of range"):  # the key is read, and RGB only
        VisionConfig.from_hf({"model_type": "siglip_vision_model", "num_channels": 1})


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_to_hf_round_trips_and_builds_the_same_tower(tmp_path, name):
    """``to_hf`` (what validate and the exporter hand transformers) describes the same tower."""
    ours = VisionConfig.from_hf(HUB_CONFIGS[name])
    hf = ours.to_hf()
    assert VisionConfig.from_hf(hf) == ours
    assert ours.to_dict()["hidden_size"] == ours.hidden_size and ours.to_dict()["family"] == ours.family
    vision, shapes, projection = transformers_view(tmp_path, hf)
    assert (vision.layer_norm_eps, vision.hidden_act, vision.num_channels) == (ours.layer_norm_eps, ours.hidden_act, ours.num_channels)
    assert {n.removeprefix("vision_model."): s for n, s in ours.expected_tensors("").items()} == \
        {n.removeprefix("vision_model."): s for n, s in shapes.items()}


def test_to_hf_keeps_non_default_values_and_unknown_presets_are_named():
    from arrowvision import ConversionError

    for family in ("siglip", "clip"):
        odd = VisionConfig(family, layer_norm_eps=0.25, hidden_act="gelu",
                           projection_dim=24 if family == "clip" else None,
                           image_mean=CLIP_MEAN if family == "clip" else SIGLIP_MEAN,
                           image_std=CLIP_STD if family == "clip" else SIGLIP_STD)
        assert VisionConfig.from_hf(odd.to_hf()) == odd
    with pytest.raises(ConversionError, match=r"^unknown preset 'vit-h'; known: siglip-base-patch16-224, siglip-base-patch16-256, "):
        VisionConfig.preset("vit-h")
