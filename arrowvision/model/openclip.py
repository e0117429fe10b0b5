"""open_clip checkpoints -> the Hugging Face CLIP layout our converter and towers read.

Supported here: open_clip's OpenAI-style ``CLIP`` (OpenAI CLIP in open_clip form, LAION, DFN, Marqo
fine-tunes of those): the ``VisionTransformer`` (class token, ``ln_pre``, blocks with a fused
``in_proj``, ``ln_post`` on the class token, ``proj``) and the causal text ``Transformer`` pooled at
the end-of-text token (the largest id, open_clip's ``argmax`` pooling), QuickGELU or GELU.
timm-trunk SigLIP models (``ViT-B-16-SigLIP`` ...) are ``openclip_timm``'s. Everything else (HF
text towers, ResNets, attentional pooling, layer scale, other timm trunks, ...) is refused with a
ConversionError naming what is not supported.
open_clip's own BPE tokenizer is not stored in its checkpoints: tokenizer files beside the weights
(CLIP's ``vocab.json`` + ``merges.txt``) are kept, as for HF checkpoints.

The model config is open_clip's: the ``model_cfg`` of an ``open_clip_config.json`` (what open_clip
saves beside the weights on the hub) or a bare model-config JSON (``embed_dim``, ``vision_cfg``,
``text_cfg``, as in open_clip's ``model_configs/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConversionError
from .openclip_timm import split_block

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# vision_cfg keys whose non-default value changes the architecture (open_clip's defaults)
UNSUPPORTED_VISION = {
    "timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "final_ln_after_pool": False, "pool_type": "tok", "pos_embed_type": "learnable", "act_kwargs": None,
    "norm_kwargs": None, "mlp_ratio": 4.0, "output_tokens": False,
}
# text_cfg keys whose non-default value changes the architecture
UNSUPPORTED_TEXT = {
    "hf_model_name": None, "ls_init_value": None, "embed_cls": False, "pool_type": "argmax", "proj_type": "linear",
    "proj_bias": False, "no_causal_mask": False, "final_ln_after_pool": False, "act_kwargs": None, "norm_kwargs": None,
    "mlp_ratio": 4.0, "output_tokens": False, "pad_id": 0,
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def is_open_clip_config(config: Mapping[str, Any]) -> bool:
    """An open_clip config (``open_clip_config.json`` or a bare model config), not a HF one."""
    return "model_type" not in config and ("model_cfg" in config or "vision_cfg" in config)


def model_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = config.get("model_cfg", config)
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("vision_cfg"), Mapping):
        raise ConversionError("open_clip config: expected a JSON object with a vision_cfg object")
    return cfg


def to_hf(config: Mapping[str, Any], tensors: Iterator[tuple[str, Any]], tower: str) -> tuple[dict[str, Any], Iterator[tuple[str, Any]]]:
    """(the HF config dict, the tensors renamed to its layout) of an open_clip checkpoint: OpenAI-style
    CLIP here, timm-trunk SigLIP in ``openclip_timm``. Unsupported architectures are refused."""
    cfg = model_config(config)
    if cfg["vision_cfg"].get("timm_model_name"):
        from . import openclip_timm

        named = {name.removeprefix("module."): tensor for name, tensor in tensors}  # its sizes come from the shapes
        hf = openclip_timm.hf_config(cfg, {name: tuple(tensor.shape) for name, tensor in named.items()})
        return hf, openclip_timm.hf_tensors(named, cfg, tower)
    return hf_config(config), hf_tensors(tensors, config, tower)


def hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The HF ``CLIPConfig`` dict of an OpenAI-style open_clip model config; refuses what we cannot build."""
    cfg = model_config(config)
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        raise ConversionError(f"open_clip timm trunk {vision['timm_model_name']!r}: convert it through to_hf")
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ConversionError("open_clip ModifiedResNet (RN50 ...) models are not supported; "
                              "supported: OpenAI-style VisionTransformer models")
    changed = [key for key, default in UNSUPPORTED_VISION.items() if key in vision and vision[key] != default]
    if changed:
        raise ConversionError(f"open_clip vision_cfg {', '.join(f'{k}={vision[k]!r}' for k in changed)} is not supported; "
                              "supported: OpenAI-style VisionTransformer models (class token, ln_pre, ln_post, proj)")
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, head_width)):
        raise ConversionError(f"open_clip vision_cfg width / head_width: expected positive integers, got {width!r}, {head_width!r}")
    activation = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    config = {
        "model_type": "clip",
        "projection_dim": cfg.get("embed_dim", 512),
        "vision_config": {
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 16),
            "hidden_size": width,
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": width // head_width,
            "intermediate_size": int(width * 4),
            "layer_norm_eps": 1e-5,
            "hidden_act": activation,
        },
        "open_clip": {"model_cfg": dict(cfg)},  # provenance, kept in the file's config
    }
    text = cfg.get("text_cfg")
    if isinstance(text, Mapping):
        config["text_config"] = _text_config(text, activation)
    return config


def _text_config(text: Mapping[str, Any], activation: str) -> dict[str, Any] | None:
    """The HF ``CLIPTextConfig`` dict, or None for a text tower we cannot build (refused only if
    the text tower is asked for, see ``hf_tensors``)."""
    if any(key in text and text[key] != default for key, default in UNSUPPORTED_TEXT.items()):
        return None
    width = text.get("width", 512)
    vocab = text.get("vocab_size", 49408)
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "num_hidden_layers": text.get("layers", 12),
        "num_attention_heads": text.get("heads", 8),
        "intermediate_size": int(width * 4) if isinstance(width, int) else width,
        "max_position_embeddings": text.get("context_length", 77),
        "layer_norm_eps": 1e-5,
        "hidden_act": activation,
        "eos_token_id": 2,  # HF's legacy value: pool at the largest id, as open_clip's argmax pooling
        "bos_token_id": vocab - 2 if isinstance(vocab, int) else None,
        "pad_token_id": 0,
    }


def unsupported_text(config: Mapping[str, Any]) -> str:
    """Why the text tower of an open_clip model config does not convert ('' when it does)."""
    text = model_config(config).get("text_cfg")
    if not isinstance(text, Mapping):
        return "the config has no text_cfg"
    changed = [f"{k}={text[k]!r}" for k, default in UNSUPPORTED_TEXT.items() if k in text and text[k] != default]
    return f"text_cfg {', '.join(changed)} is not supported" if changed else ""


def hf_tensors(tensors: Iterator[tuple[str, Any]], config: Mapping[str, Any], tower: str) -> Iterator[tuple[str, Any]]:
    """open_clip state-dict tensors -> HF CLIP names and layouts (``in_proj`` split into q/k/v,
    ``proj`` / ``text_projection`` transposed to Linear weights). ``config``: the open_clip one."""
    if tower in ("text", "all") and (reason := unsupported_text(config)):
        raise ConversionError(f"--tower {tower}: this open_clip text tower does not convert ({reason}); "
                              "convert with --tower vision")
    for name, tensor in tensors:
        name = name.removeprefix("module.")  # checkpoints saved from DistributedDataParallel
        if name in ("attn_mask", "visual.attn_mask"):  # the causal mask buffer of older checkpoints
            continue
        if name in _TOP:
            yield _TOP[name], tensor
        elif name in ("visual.proj", "text_projection"):
            yield ("visual_projection.weight" if name == "visual.proj" else "text_projection.weight"), tensor.t().contiguous()
        elif match := _BLOCK.match(name):
            tower_prefix = "vision_model" if match.group(1) else "text_model"
            yield from split_block(f"{tower_prefix}.encoder.layers.{match.group(2)}.", match.group(3), tensor, name,
                                   "attn.in_proj", _BLOCK_PARTS)
        else:
            raise ConversionError(f"open_clip tensor {name!r} has no place in an OpenAI-style CLIP model")
