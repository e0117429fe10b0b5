"""open_clip SigLIP models with a timm trunk (``ViT-B-16-SigLIP``, ``ViT-L-16-SigLIP-256``,
``ViT-SO400M-14-SigLIP``, Marqo's fine-tunes of them) -> the Hugging Face SigLIP layout.

The trunk is timm's ``vit_{base,large,so400m}_patch*_siglip_*`` with MAP pooling and no projection;
the text tower open_clip's bidirectional ``TextTransformer`` pooled at the last position through a
biased projection. open_clip gives timm no size arguments, so the published name decides the head
count, and the stored tensors decide everything else (width, depth, MLP, patch and image size).
Both use exact GELU (timm's and open_clip's default), not HF SigLIP's tanh approximation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ConversionError

TRUNK = re.compile(r"^vit_(base|large|so400m)_patch(\d+)_siglip_(\d+)$")
HEADS = {"base": 12, "large": 16, "so400m": 16}  # timm's published SigLIP trunks
P = "visual.trunk."
_BLOCK = re.compile(r"^visual\.trunk\.blocks\.(\d+)\.(.+)$")
_TEXT_BLOCK = re.compile(r"^text\.transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_TEXT_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RENAMED = {
    f"{P}patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    f"{P}patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    f"{P}norm.weight": "vision_model.post_layernorm.weight",
    f"{P}norm.bias": "vision_model.post_layernorm.bias",
    f"{P}attn_pool.proj.weight": "vision_model.head.attention.out_proj.weight",
    f"{P}attn_pool.proj.bias": "vision_model.head.attention.out_proj.bias",
    f"{P}attn_pool.norm.weight": "vision_model.head.layernorm.weight",
    f"{P}attn_pool.norm.bias": "vision_model.head.layernorm.bias",
    f"{P}attn_pool.mlp.fc1.weight": "vision_model.head.mlp.fc1.weight",
    f"{P}attn_pool.mlp.fc1.bias": "vision_model.head.mlp.fc1.bias",
    f"{P}attn_pool.mlp.fc2.weight": "vision_model.head.mlp.fc2.weight",
    f"{P}attn_pool.mlp.fc2.bias": "vision_model.head.mlp.fc2.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.text_projection.weight": "text_model.head.weight",
    "text.text_projection.bias": "text_model.head.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
# the text_cfg of open_clip's SigLIP models; anything else is another architecture
SIGLIP_TEXT = {"no_causal_mask": True, "proj_bias": True, "pool_type": "last"}
TEXT_DEFAULTS = {"hf_model_name": None, "ls_init_value": None, "embed_cls": False, "proj_type": "linear",
                 "final_ln_after_pool": False, "act_kwargs": None, "mlp_ratio": 4.0}


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ConversionError(f"open_clip timm SigLIP checkpoint has no tensor {name!r}")
    return shapes[name]


def hf_config(cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The HF ``SiglipConfig`` dict of an open_clip timm SigLIP model (``cfg``: its model config)."""
    vision = cfg["vision_cfg"]
    name = vision["timm_model_name"]
    match = TRUNK.match(str(name))
    if not match or vision.get("timm_pool") != "map" or vision.get("timm_proj") not in ("none", "", None):
        raise ConversionError(f"open_clip timm trunk {name!r} (pool {vision.get('timm_pool')!r}, proj "
                              f"{vision.get('timm_proj')!r}) does not convert; supported: vit_{{base,large,so400m}}"
                              "_patch*_siglip_* with timm_pool 'map' and timm_proj 'none' (open_clip's SigLIP models)")
    tokens, width = _shape(shapes, f"{P}pos_embed")[-2:]
    patch = _shape(shapes, f"{P}patch_embed.proj.weight")[-1]
    depth = len({m.group(1) for n in shapes if (m := _BLOCK.match(n))})
    config = {
        "model_type": "siglip",
        "vision_config": {
            "image_size": math.isqrt(tokens) * patch, "patch_size": patch, "hidden_size": width,
            "num_hidden_layers": depth, "num_attention_heads": HEADS[match.group(1)],
            "intermediate_size": _shape(shapes, f"{P}blocks.0.mlp.fc1.weight")[0],
            "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        },
        "open_clip": {"model_cfg": dict(cfg)},
    }
    text = cfg.get("text_cfg")
    if isinstance(text, Mapping) and not unsupported_text(cfg):
        width = text.get("width", 512)
        eps = (text.get("norm_kwargs") or {}).get("eps", 1e-5)
        config["text_config"] = {
            "vocab_size": text.get("vocab_size", 49408), "hidden_size": width, "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8), "intermediate_size": int(width * 4),
            "max_position_embeddings": text.get("context_length", 77), "layer_norm_eps": eps,
            "hidden_act": "quick_gelu" if cfg.get("quick_gelu") else "gelu", "projection_size": cfg.get("embed_dim"),
        }
    return config


def unsupported_text(cfg: Mapping[str, Any]) -> str:
    text = cfg.get("text_cfg")
    if not isinstance(text, Mapping):
        return "the config has no text_cfg"
    wrong = [f"{k}={text.get(k)!r}" for k, v in SIGLIP_TEXT.items() if text.get(k) != v]
    wrong += [f"{k}={text[k]!r}" for k, v in TEXT_DEFAULTS.items() if k in text and text[k] != v]
    return f"text_cfg {', '.join(wrong)} is not supported" if wrong else ""


def hf_tensors(tensors: Mapping[str, Any], cfg: Mapping[str, Any], tower: str) -> Iterator[tuple[str, Any]]:
    """timm trunk + open_clip SigLIP text tensors -> HF SigLIP names and layouts (qkv split, the
    pooling head's q and kv packed into one in_proj, the position table unbatched)."""
    if tower in ("text", "all") and (reason := unsupported_text(cfg)):
        raise ConversionError(f"--tower {tower}: this open_clip text tower does not convert ({reason}); "
                              "convert with --tower vision")
    for name, tensor in tensors.items():
        if name in ("text.attn_mask", f"{P}attn_pool.q.weight", f"{P}attn_pool.q.bias"):
            continue  # the q halves join the kv halves below
        if name in _RENAMED:
            yield _RENAMED[name], tensor
        elif name == f"{P}pos_embed":
            yield "vision_model.embeddings.position_embedding.weight", tensor[0]
        elif name == f"{P}attn_pool.latent":
            yield "vision_model.head.probe", tensor
        elif name in (f"{P}attn_pool.kv.weight", f"{P}attn_pool.kv.bias"):
            kind = name.rsplit(".", 1)[1]
            query = tensors.get(f"{P}attn_pool.q.{kind}")
            if query is None:
                raise ConversionError(f"open_clip timm SigLIP checkpoint has {name} but no {P}attn_pool.q.{kind}")
            yield f"vision_model.head.attention.in_proj_{kind}", _cat(query, tensor)
        elif match := _BLOCK.match(name):
            yield from split_block(f"vision_model.encoder.layers.{match.group(1)}.", match.group(2), tensor, name,
                                    "attn.qkv", _BLOCK_PARTS)
        elif match := _TEXT_BLOCK.match(name):
            yield from split_block(f"text_model.encoder.layers.{match.group(1)}.", match.group(2), tensor, name,
                                    "attn.in_proj", _TEXT_PARTS)
        else:
            raise ConversionError(f"open_clip tensor {name!r} has no place in a timm SigLIP model")


def _cat(first: Any, second: Any) -> Any:
    import torch

    return torch.cat([first, second], dim=0)


def split_block(prefix: str, part: str, tensor: Any, name: str, fused: str, parts: Mapping[str, str]) -> Iterator[tuple[str, Any]]:
    """One transformer-block tensor in HF names: the fused q/k/v projection (``fused``) split in
    three, the rest renamed through ``parts``; for both open_clip layouts (OpenAI-style and timm)."""
    if part in (f"{fused}.weight", f"{fused}.bias", f"{fused}_weight", f"{fused}_bias"):
        kind = "weight" if part.endswith("weight") else "bias"
        if tensor.ndim == 0 or tensor.shape[0] % 3:
            raise ConversionError(f"open_clip tensor {name!r}: first dimension is not 3 x width")
        for projection, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            yield f"{prefix}self_attn.{projection}.{kind}", chunk.contiguous()
        return
    module, _, leaf = part.rpartition(".")
    if module not in parts:
        raise ConversionError(f"open_clip tensor {name!r} is not supported (layer scale, attention norms, ...)")
    yield f"{prefix}{parts[module]}.{leaf}", tensor
