"""Vision tower configuration: one dataclass, built from a Hugging Face config or a preset.

Torch-free on purpose: the OpenVINO fast path and the converter's tensor checks use it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConversionError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF model_type -> our family. Siglip2 fixed-resolution checkpoints are plain "siglip".
FAMILIES = {
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "clip": "clip",
    "clip_vision_model": "clip",
}


@dataclass(frozen=True)
class VisionConfig:
    family: str  # "siglip" (MAP head) or "clip" (class token + projection)
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    projection_dim: int | None = None  # CLIP visual projection; None for SigLIP
    image_mean: tuple[float, float, float] = field(default=SIGLIP_MEAN)
    image_std: tuple[float, float, float] = field(default=SIGLIP_STD)

    def __post_init__(self) -> None:
        if self.family not in ("siglip", "clip"):
            raise ConversionError(f"unsupported model family {self.family!r}; supported: siglip, clip")
        if self.hidden_size % self.num_heads:
            raise ConversionError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ConversionError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + (1 if self.family == "clip" else 0)

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim if self.family == "clip" and self.projection_dim else self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> VisionConfig:
        """Build from a HF config dict: a full SiglipConfig/CLIPConfig or a vision-only one."""
        model_type = hf_config.get("model_type", "")
        if model_type not in FAMILIES:
            raise ConversionError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[model_type]
        vision = dict(hf_config.get("vision_config") or {}) if "vision_config" in hf_config else dict(hf_config)
        if not vision.get("vision_use_head", True):
            raise ConversionError("SigLIP checkpoints without the attention-pooling head are not supported")
        projection_dim = hf_config.get("projection_dim") if family == "clip" else None
        clip = family == "clip"
        try:
            return cls(
                family=family,
                image_size=int(vision.get("image_size", 224)),
                patch_size=int(vision.get("patch_size", 32 if clip else 16)),
                num_channels=int(vision.get("num_channels", 3)),
                hidden_size=int(vision.get("hidden_size", 768)),
                num_layers=int(vision.get("num_hidden_layers", 12)),
                num_heads=int(vision.get("num_attention_heads", 12)),
                intermediate_size=int(vision.get("intermediate_size", 3072)),
                layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
                hidden_act=str(vision.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh")),
                projection_dim=int(projection_dim or vision.get("projection_dim") or 512) if clip else None,
                image_mean=CLIP_MEAN if clip else SIGLIP_MEAN,
                image_std=CLIP_STD if clip else SIGLIP_STD,
            )
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"invalid vision config: {exc}") from None

    @classmethod
    def from_weights(cls, weights: Any) -> VisionConfig:
        """The config of a loaded weights file (a ``WeightLoader``): its HF config, and no
        projection for CLIP checkpoints saved without one (``CLIPVisionModel``)."""
        config = cls.from_hf(weights.config)
        if config.family == "clip" and "visual_projection.weight" not in weights:
            config = replace(config, projection_dim=None)
        return config

    @classmethod
    def preset(cls, name: str) -> VisionConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConversionError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF vision config dict (what ``SiglipVisionConfig``/``CLIPVisionConfig`` take)."""
        config = {
            "model_type": "siglip_vision_model" if self.family == "siglip" else "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }
        if self.family == "clip":
            config["projection_dim"] = self.projection_dim
        return config

    def expected_tensors(self, prefix: str = "vision_model.") -> dict[str, tuple[int, ...]]:
        """HF tensor names and shapes of the vision tower: the explicit weight map.

        ``prefix`` is "vision_model." in full SigLIP/CLIP checkpoints and "" in the vision-only
        models transformers 5 saves (see ``vision_prefix``)."""
        shapes = self._expected_tensors()
        return {(prefix + n[len("vision_model.") :] if n.startswith("vision_model.") else n): s for n, s in shapes.items()}

    def _expected_tensors(self) -> dict[str, tuple[int, ...]]:
        d, m, p, c = self.hidden_size, self.intermediate_size, self.patch_size, self.num_channels
        shapes: dict[str, tuple[int, ...]] = {"vision_model.embeddings.patch_embedding.weight": (d, c, p, p)}
        if self.family == "siglip":
            shapes["vision_model.embeddings.patch_embedding.bias"] = (d,)
        else:
            shapes["vision_model.embeddings.class_embedding"] = (d,)
        shapes["vision_model.embeddings.position_embedding.weight"] = (self.num_positions, d)
        if self.family == "clip":
            shapes["vision_model.pre_layrnorm.weight"] = (d,)  # sic: HF's spelling
            shapes["vision_model.pre_layrnorm.bias"] = (d,)
        for i in range(self.num_layers):
            prefix = f"vision_model.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{prefix}self_attn.{proj}.weight"] = (d, d)
                shapes[f"{prefix}self_attn.{proj}.bias"] = (d,)
            for norm in ("layer_norm1", "layer_norm2"):
                shapes[f"{prefix}{norm}.weight"] = (d,)
                shapes[f"{prefix}{norm}.bias"] = (d,)
            shapes.update({f"{prefix}mlp.fc1.weight": (m, d), f"{prefix}mlp.fc1.bias": (m,)})
            shapes.update({f"{prefix}mlp.fc2.weight": (d, m), f"{prefix}mlp.fc2.bias": (d,)})
        shapes["vision_model.post_layernorm.weight"] = (d,)
        shapes["vision_model.post_layernorm.bias"] = (d,)
        if self.family == "siglip":
            head = "vision_model.head."
            shapes[f"{head}probe"] = (1, 1, d)
            shapes[f"{head}attention.in_proj_weight"] = (3 * d, d)
            shapes[f"{head}attention.in_proj_bias"] = (3 * d,)
            shapes[f"{head}attention.out_proj.weight"] = (d, d)
            shapes[f"{head}attention.out_proj.bias"] = (d,)
            shapes[f"{head}layernorm.weight"] = (d,)
            shapes[f"{head}layernorm.bias"] = (d,)
            shapes[f"{head}mlp.fc1.weight"] = (m, d)
            shapes[f"{head}mlp.fc1.bias"] = (m,)
            shapes[f"{head}mlp.fc2.weight"] = (d, m)
            shapes[f"{head}mlp.fc2.bias"] = (d,)
        else:
            shapes["visual_projection.weight"] = (self.projection_dim, d)
        return shapes


def _siglip(image_size: int, patch: int, hidden: int, layers: int, heads: int, mlp: int) -> VisionConfig:
    return VisionConfig("siglip", image_size, patch, 3, hidden, layers, heads, mlp, 1e-6, "gelu_pytorch_tanh")


def _clip(image_size: int, patch: int, hidden: int, layers: int, heads: int, mlp: int, proj: int) -> VisionConfig:
    return VisionConfig("clip", image_size, patch, 3, hidden, layers, heads, mlp, 1e-5, "quick_gelu", proj, CLIP_MEAN, CLIP_STD)


# Published vision-tower numbers of the Hugging Face checkpoints.
PRESETS: dict[str, VisionConfig] = {
    **{f"siglip-base-patch16-{s}": _siglip(s, 16, 768, 12, 12, 3072) for s in (224, 256, 384, 512)},
    **{f"siglip-large-patch16-{s}": _siglip(s, 16, 1024, 24, 16, 4096) for s in (256, 384)},
    **{f"siglip-so400m-patch14-{s}": _siglip(s, 14, 1152, 27, 16, 4304) for s in (224, 384)},
    **{f"siglip2-base-patch16-{s}": _siglip(s, 16, 768, 12, 12, 3072) for s in (224, 256, 384, 512)},
    **{f"siglip2-large-patch16-{s}": _siglip(s, 16, 1024, 24, 16, 4096) for s in (256, 384, 512)},
    **{f"siglip2-so400m-patch14-{s}": _siglip(s, 14, 1152, 27, 16, 4304) for s in (224, 384)},
    **{f"siglip2-so400m-patch16-{s}": _siglip(s, 16, 1152, 27, 16, 4304) for s in (256, 384, 512)},
    "clip-vit-base-patch32": _clip(224, 32, 768, 12, 12, 3072, 512),
    "clip-vit-base-patch16": _clip(224, 16, 768, 12, 12, 3072, 512),
    "clip-vit-large-patch14": _clip(224, 14, 1024, 24, 16, 4096, 768),
    "clip-vit-large-patch14-336": _clip(336, 14, 1024, 24, 16, 4096, 768),
}


def vision_prefix(names: Iterable[str]) -> str:
    """Where the vision tower lives in a checkpoint's tensor names.

    Full SigLIP/CLIP checkpoints (what the hub publishes) and transformers-4 vision models use
    ``vision_model.``; transformers-5 ``SiglipVisionModel``/``CLIPVisionModel`` save without it."""
    names = set(names)
    if "vision_model.embeddings.patch_embedding.weight" in names:
        return "vision_model."
    if "embeddings.patch_embedding.weight" in names:
        return ""
    raise ConversionError("no vision tower found: no tensor named [vision_model.]embeddings.patch_embedding.weight")
