"""Vision tower configuration: one dataclass, built from a Hugging Face config or a preset.

Torch-free on purpose: the OpenVINO fast path and the converter's tensor checks use it too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConversionError, ModelError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# HF model_type -> our family. Siglip2 fixed-resolution checkpoints are plain "siglip"; "siglip2"
# is the NaFlex layout (any resolution and aspect ratio), a SigLIP with ``num_patches`` set.
FAMILIES = {
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "siglip2": "siglip",
    "siglip2_vision_model": "siglip",
    "clip": "clip",
    "clip_vision_model": "clip",
}

# What our models accept (model.activation implements exactly these).
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu", "gelu")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Generous upper bounds, far above any published vision tower; the real bound is that every
# shape the config implies must equal a tensor stored in the file (``VisionConfig.from_weights``).
MAX_IMAGE_SIZE = 8192
MAX_WIDTH = 1 << 16  # hidden, intermediate and projection sizes
MAX_LAYERS = 1024
MAX_POSITION_PATCHES = 1 << 20  # NaFlex learned position grid (256 in every published checkpoint)
NAFLEX_MODEL_TYPES = ("siglip2", "siglip2_vision_model")
# our field -> (HF key, smallest, largest) for the integer fields
INT_FIELDS = {
    "image_size": ("image_size", 1, MAX_IMAGE_SIZE),
    "patch_size": ("patch_size", 1, MAX_IMAGE_SIZE),
    "num_channels": ("num_channels", 3, 3),  # the preprocessor feeds RGB
    "hidden_size": ("hidden_size", 1, MAX_WIDTH),
    "num_layers": ("num_hidden_layers", 1, MAX_LAYERS),
    "num_heads": ("num_attention_heads", 1, MAX_WIDTH),
    "intermediate_size": ("intermediate_size", 1, MAX_WIDTH * 4),
    "projection_dim": ("projection_dim", 1, MAX_WIDTH),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    # NaFlex (SigLIP 2 "siglip2" checkpoints): the learned position grid holds num_patches
    # (a square) positions, resized per image; None for fixed-resolution models.
    num_patches: int | None = None

    def __post_init__(self) -> None:
        """Validate against what our models accept: types first, then ranges, then relations,
        so no arithmetic ever runs on a bad value. Names in messages are the HF config keys."""
        if self.family not in ("siglip", "clip"):
            raise ConversionError(f"unsupported model family {self.family!r}; supported: siglip, clip")
        for name, (key, low, high) in INT_FIELDS.items():
            value = getattr(self, name)
            if name == "projection_dim" and value is None:  # SigLIP, or CLIP saved without projection
                continue
            if not _is_int(value):
                raise ConversionError(f"config {key}: expected an integer, got {_brief(value)}")
            if not low <= value <= high:
                raise ConversionError(f"config {key}: {value} is out of range [{low}, {high}]")
        eps = self.layer_norm_eps
        if not _is_real(eps) or not math.isfinite(eps) or not 0 < eps < 1:
            raise ConversionError(f"config layer_norm_eps: expected a finite number in (0, 1), got {_brief(eps)}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ConversionError(f"config hidden_act: unsupported activation {_brief(self.hidden_act)}; supported: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ConversionError(
                f"config num_attention_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}"
            )
        if self.image_size < self.patch_size:
            raise ConversionError(f"config patch_size: {self.patch_size} is larger than image_size {self.image_size}")
        if self.num_patches is not None:
            self._check_naflex()

    def _check_naflex(self) -> None:
        value = self.num_patches
        if self.family != "siglip":
            raise ConversionError("config num_patches: only SigLIP 2 (NaFlex) checkpoints have one")
        if not _is_int(value) or not 1 <= value <= MAX_POSITION_PATCHES:
            raise ConversionError(f"config num_patches: expected an integer in [1, {MAX_POSITION_PATCHES}], got {_brief(value)}")
        if math.isqrt(value) ** 2 != value:
            raise ConversionError(f"config num_patches: {value} is not a square (the position grid is side x side)")

    @property
    def naflex(self) -> bool:
        """Variable resolution and aspect ratio (SigLIP 2 NaFlex): patchified inputs with a mask."""
        return self.num_patches is not None

    @property
    def variant(self) -> str:
        """What ``info`` names beside the family: ``naflex`` (SigLIP 2, any resolution and aspect
        ratio) or ``fixed-<size>`` (square inputs of one size)."""
        return "naflex" if self.naflex else f"fixed-{self.image_size}"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        if self.num_patches is not None:
            return self.num_patches
        return self.grid_size**2 + (1 if self.family == "clip" else 0)

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim if self.family == "clip" and self.projection_dim else self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """The fields; ``num_patches`` only for NaFlex models, so the cache keys (which hash this)
        of fixed-resolution models stay what they were."""
        fields = asdict(self)
        if fields["num_patches"] is None:
            del fields["num_patches"]
        return fields

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> VisionConfig:
        """Build from a HF config dict: a full SiglipConfig/CLIPConfig or a vision-only one.

        Values are taken as they are (no int()/float() coercion: 2.5 heads is an error, not 2);
        absent keys get the HF defaults. Raises ConversionError naming the key."""
        if not isinstance(hf_config, Mapping):
            raise ConversionError(f"config must be a JSON object, not {type(hf_config).__name__}")
        model_type = hf_config.get("model_type", "")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise ConversionError(
                f"unsupported model_type {_brief(model_type)}; supported: {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[model_type]
        vision = hf_config.get("vision_config", hf_config)
        vision = {} if vision is None else vision
        if not isinstance(vision, Mapping):
            raise ConversionError(f"config vision_config: expected a JSON object, got {_brief(vision)}")
        use_head = vision.get("vision_use_head", True)
        if not isinstance(use_head, bool):
            raise ConversionError(f"config vision_use_head: expected true or false, got {_brief(use_head)}")
        if not use_head:
            raise ConversionError("SigLIP checkpoints without the attention-pooling head are not supported")
        clip = family == "clip"
        projection_dim = None
        if clip:
            projection_dim = next((v for v in (hf_config.get("projection_dim"), vision.get("projection_dim")) if v is not None), 512)
        naflex = model_type in NAFLEX_MODEL_TYPES
        num_patches = vision.get("num_patches", 256) if naflex else None
        patch_size = vision.get("patch_size", 32 if clip else 16)
        image_size = vision.get("image_size", 224)
        if naflex and _is_int(num_patches) and _is_int(patch_size) and num_patches > 0:
            # no fixed size: the side of the learned grid, in pixels, is what ``image_size`` names
            image_size = max(math.isqrt(num_patches), 1) * patch_size
        return cls(
            family=family,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=vision.get("num_channels", 3),
            hidden_size=vision.get("hidden_size", 768),
            num_layers=vision.get("num_hidden_layers", 12),
            num_heads=vision.get("num_attention_heads", 12),
            intermediate_size=vision.get("intermediate_size", 3072),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-5 if clip else 1e-6),
            hidden_act=vision.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
            projection_dim=projection_dim,
            image_mean=CLIP_MEAN if clip else SIGLIP_MEAN,
            image_std=CLIP_STD if clip else SIGLIP_STD,
            num_patches=num_patches,
        )

    @classmethod
    def from_weights(cls, weights: Any) -> VisionConfig:
        """The validated config of a loaded weights file (a ``WeightLoader``).

        Checks the config against the schema, then against the tensors in the file (layer count
        from the tensor names, every implied shape equal to the stored one, float dtypes), before
        anything is built: building then costs what the file's own tensors cost. CLIP checkpoints
        saved without a projection (``CLIPVisionModel``) get ``projection_dim=None``.
        Raises ConversionError (bad config) or ModelError (config and tensors disagree), naming the file."""
        try:
            config = cls.from_hf(weights.config)
            prefix = vision_prefix(weights.names())
        except ConversionError as exc:
            raise ConversionError(f"{weights.path}: {exc}") from None
        if config.family == "clip" and "visual_projection.weight" not in weights:
            config = replace(config, projection_dim=None)
        names = weights.names() if prefix == "" else [n for n in weights.names() if n.startswith(VISION_PREFIXES)]
        infos = {name: weights.info(name) for name in names}
        problems = tensor_problems(config, {name: info.shape for name, info in infos.items()})
        if problems:
            raise ModelError(f"{weights.path}: tensors do not match the config; " + "; ".join(problems))
        not_float = [f"{name} ({info.dtype})" for name, info in infos.items() if info.dtype not in FLOAT_DTYPES]
        if not_float:
            raise ModelError(f"{weights.path}: vision tensors must be floating point: {', '.join(not_float[:4])}")
        return config

    @classmethod
    def preset(cls, name: str) -> VisionConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConversionError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF vision config dict (what ``SiglipVisionConfig``/``CLIPVisionConfig`` take)."""
        config: dict[str, Any] = {
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }
        if self.naflex:  # what Siglip2VisionConfig takes: a patch count instead of an image size
            return {"model_type": "siglip2_vision_model", "num_patches": self.num_patches, **config}
        config = {"model_type": "siglip_vision_model" if self.family == "siglip" else "clip_vision_model",
                  "image_size": self.image_size, **config}
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
        if self.naflex:  # a Linear over flattened (p, p, c) patches
            shapes["vision_model.embeddings.patch_embedding.weight"] = (d, p * p * c)
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


def _naflex(patch: int, hidden: int, layers: int, heads: int, mlp: int) -> VisionConfig:
    return replace(_siglip(16 * patch, patch, hidden, layers, heads, mlp), num_patches=256)


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
    "siglip2-base-patch16-naflex": _naflex(16, 768, 12, 12, 3072),
    "siglip2-so400m-patch16-naflex": _naflex(16, 1152, 27, 16, 4304),
    "clip-vit-base-patch32": _clip(224, 32, 768, 12, 12, 3072, 512),
    "clip-vit-base-patch16": _clip(224, 16, 768, 12, 12, 3072, 512),
    "clip-vit-large-patch14": _clip(224, 14, 1024, 24, 16, 4096, 768),
    "clip-vit-large-patch14-336": _clip(336, 14, 1024, 24, 16, 4096, 768),
}


VISION_PREFIXES = ("vision_model.", "visual_projection.")
_LAYER_INDEX = re.compile(r"(?:vision_model\.)?encoder\.layers\.(\d+)\.")


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def tensor_problems(config: VisionConfig, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Where the vision tensors ``shapes`` (name -> shape) disagree with ``config``: the layer
    count first, from the names alone, so a config claiming 200 000 layers costs nothing."""
    prefix = vision_prefix(shapes)
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name)) and name.startswith(prefix + "encoder.")}
    if config.num_layers > len(layers):  # listing the expected tensors would cost O(num_layers)
        held = f"{len(layers)} (indices {min(layers)}..{max(layers)})" if layers else "none"
        return [f"config num_hidden_layers is {config.num_layers} but the file's encoder layers are {held}"]
    expected = config.expected_tensors(prefix)
    if config.family == "clip" and "visual_projection.weight" not in shapes:
        expected.pop("visual_projection.weight", None)  # CLIPVisionModel: pooled output, no projection
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{n} {tuple(shapes[n])} != {expected[n]}" for n in set(expected) & set(shapes) if tuple(shapes[n]) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing tensors: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_list(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_list(wrong)}")
    return problems


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
