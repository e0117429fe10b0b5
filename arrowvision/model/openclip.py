"""open_clip checkpoints -> the Hugging Face CLIP layout our converter and towers read.

Supported: open_clip's OpenAI-style ``VisionTransformer`` (OpenAI CLIP in open_clip form, LAION,
DFN, Marqo fine-tunes of those): class token, ``ln_pre``, blocks with a fused ``in_proj``,
``ln_post`` on the class token, ``proj``; QuickGELU or GELU. The vision tower converts; everything
else (text towers, timm trunks such as ``ViT-B-16-SigLIP``, ResNets, attentional pooling, layer
scale, ...) is refused with a ConversionError naming what is missing.

The model config is open_clip's: the ``model_cfg`` of an ``open_clip_config.json`` (what open_clip
saves beside the weights on the hub) or a bare model-config JSON (``embed_dim``, ``vision_cfg``,
``text_cfg``, as in open_clip's ``model_configs/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConversionError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# vision_cfg keys whose non-default value changes the architecture (open_clip's defaults)
UNSUPPORTED_VISION = {
    "timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "final_ln_after_pool": False, "pool_type": "tok", "pos_embed_type": "learnable", "act_kwargs": None,
    "norm_kwargs": None, "mlp_ratio": 4.0, "output_tokens": False,
}
_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
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
}


def is_open_clip_config(config: Mapping[str, Any]) -> bool:
    """An open_clip config (``open_clip_config.json`` or a bare model config), not a HF one."""
    return "model_type" not in config and ("model_cfg" in config or "vision_cfg" in config)


def model_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    cfg = config.get("model_cfg", config)
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("vision_cfg"), Mapping):
        raise ConversionError("open_clip config: expected a JSON object with a vision_cfg object")
    return cfg


def hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The HF ``CLIPConfig`` dict of an open_clip model config; refuses what we cannot build."""
    cfg = model_config(config)
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        raise ConversionError(f"open_clip model with a timm trunk ({vision['timm_model_name']}, e.g. ViT-B-16-SigLIP) "
                              "does not convert yet; supported: OpenAI-style VisionTransformer models")
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
    return {
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
            "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        },
        "open_clip": {"model_cfg": dict(cfg)},  # provenance, kept in the file's config
    }


def hf_tensors(tensors: Iterator[tuple[str, Any]], tower: str) -> Iterator[tuple[str, Any]]:
    """open_clip state-dict tensors -> HF CLIP vision names and layouts (``in_proj`` split into
    q/k/v, ``proj`` transposed to a Linear weight); a text tower is refused."""
    if tower != "vision":
        raise ConversionError(f"--tower {tower}: open_clip text towers do not convert yet; convert with --tower vision")
    for name, tensor in tensors:
        name = name.removeprefix("module.")  # checkpoints saved from DistributedDataParallel
        if not name.startswith("visual."):
            continue
        if name in _TOP:
            yield _TOP[name], tensor
        elif name == "visual.proj":
            yield "visual_projection.weight", tensor.t().contiguous()
        elif match := _BLOCK.match(name):
            yield from _block(int(match.group(1)), match.group(2), tensor)
        else:
            raise ConversionError(f"open_clip tensor {name!r} has no place in an OpenAI-style VisionTransformer")


def _block(index: int, part: str, tensor: Any) -> Iterator[tuple[str, Any]]:
    prefix = f"vision_model.encoder.layers.{index}."
    if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = part.rsplit("_", 1)[1]  # weight | bias
        if tensor.shape[0] % 3:
            raise ConversionError(f"open_clip block {index} {part}: first dimension {tensor.shape[0]} is not 3 x width")
        for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            yield f"{prefix}self_attn.{projection}.{kind}", chunk.contiguous()
        return
    module, _, leaf = part.rpartition(".")
    if module not in _BLOCK_PARTS:
        raise ConversionError(f"open_clip tensor visual.transformer.resblocks.{index}.{part} is not supported")
    yield f"{prefix}{_BLOCK_PARTS[module]}.{leaf}", tensor
