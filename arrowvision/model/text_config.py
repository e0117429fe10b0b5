"""Text tower configuration, beside ``VisionConfig``: one dataclass from a HF config or a preset.

Torch-free like ``config.py``. Field names match ``VisionConfig`` where the transformer layers read
them (hidden_size, num_heads, intermediate_size, layer_norm_eps, hidden_act, num_layers), so both
towers are built from the same encoder layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConversionError, ModelError
from .config import FAMILIES

TEXT_PREFIX = "text_model."
TEXT_TENSOR_PREFIXES = (TEXT_PREFIX, "text_projection.")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_LAYER_INDEX = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
CONVERT_HINT = "convert the checkpoint with `arrowvision convert SRC OUT.parquet --tower all`"


@dataclass(frozen=True)
class TextConfig:
    family: str  # "siglip" (last-position pooling + head) or "clip" (causal, pooled at end-of-text)
    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 64
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    projection_dim: int = 768  # SigLIP head / CLIP text_projection output size
    eos_token_id: int = 1  # CLIP pooling only: 2 means "argmax of input_ids" (legacy openai configs)

    def __post_init__(self) -> None:
        if self.family not in ("siglip", "clip"):
            raise ConversionError(f"unsupported model family {self.family!r}; supported: siglip, clip")
        if self.hidden_size % self.num_heads:
            raise ConversionError(f"text hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if min(self.vocab_size, self.max_positions, self.num_layers, self.projection_dim) < 1:
            raise ConversionError("text config sizes (vocab, positions, layers, projection) must be positive")

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim

    @property
    def causal(self) -> bool:
        return self.family == "clip"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> TextConfig:
        """Build from a full HF SiglipConfig/CLIPConfig dict (defaults are transformers')."""
        model_type = hf_config.get("model_type", "")
        if model_type not in ("siglip", "siglip2", "clip"):  # siglip2: NaFlex, same text tower as SigLIP
            kind = "a vision-only checkpoint" if model_type in FAMILIES else f"model_type {model_type!r}"
            raise ModelError(f"{kind} has no text tower; {CONVERT_HINT} from a full SigLIP/CLIP checkpoint")
        family = FAMILIES[model_type]
        text = dict(hf_config.get("text_config") or {})
        clip = family == "clip"
        hidden = int(text.get("hidden_size", 512 if clip else 768))
        try:
            return cls(
                family=family,
                vocab_size=int(text.get("vocab_size", 49408 if clip else 32000)),
                hidden_size=hidden,
                num_layers=int(text.get("num_hidden_layers", 12)),
                num_heads=int(text.get("num_attention_heads", 8 if clip else 12)),
                intermediate_size=int(text.get("intermediate_size", 2048 if clip else 3072)),
                max_positions=int(text.get("max_position_embeddings", 77 if clip else 64)),
                layer_norm_eps=float(text.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
                hidden_act=str(text.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh")),
                projection_dim=int(hf_config.get("projection_dim") or 512) if clip else int(text.get("projection_size") or hidden),
                eos_token_id=int(text.get("eos_token_id", 49407)) if clip else 1,  # SigLIP pools the last position
            )
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"invalid text config: {exc}") from None

    @classmethod
    def from_weights(cls, weights: Any) -> TextConfig:
        """The text config of a loaded weights file, checked against its tensors before anything
        is built (layer count from the names first, then every shape, float dtypes); a clear
        error for vision-only files."""
        if f"{TEXT_PREFIX}embeddings.token_embedding.weight" not in weights:
            raise ModelError(f"{weights.path} holds no text tower (tower={weights.tower or 'vision'!r}); {CONVERT_HINT}")
        try:
            config = cls.from_hf(weights.config)
        except ConversionError as exc:
            raise ConversionError(f"{weights.path}: {exc}") from None
        infos = {name: weights.info(name) for name in weights.names() if name.startswith(TEXT_TENSOR_PREFIXES)}
        problems = config.tensor_problems({name: info.shape for name, info in infos.items()})
        if problems:
            raise ModelError(f"{weights.path}: text tensors do not match the config; " + "; ".join(problems))
        not_float = [f"{name} ({info.dtype})" for name, info in infos.items() if info.dtype not in FLOAT_DTYPES]
        if not_float:
            raise ModelError(f"{weights.path}: text tensors must be floating point: {', '.join(not_float[:4])}")
        return config

    def tensor_problems(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """Where the text tensors ``shapes`` disagree with this config: the layer count first,
        from the names alone, so a config claiming 200 000 layers costs nothing."""
        shapes = {n: s for n, s in shapes.items() if n.startswith(TEXT_TENSOR_PREFIXES)}
        layers = {int(m.group(1)) for name in shapes if (m := _LAYER_INDEX.match(name))}
        if self.num_layers > len(layers):
            return [f"text config num_hidden_layers is {self.num_layers} but the file's text layers are {len(layers)}"]
        expected = self.expected_tensors()
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = sorted(f"{n} {tuple(shapes[n])} != {expected[n]}" for n in set(expected) & set(shapes) if tuple(shapes[n]) != expected[n])
        problems = []
        for label, names in (("missing text tensors", missing), ("unexpected text tensors", unexpected), ("wrong shapes", wrong)):
            if names:
                problems.append(f"{label}: {', '.join(names[:8])}{f' ... ({len(names)} in all)' if len(names) > 8 else ''}")
        return problems

    @classmethod
    def preset(cls, name: str) -> TextConfig:
        try:
            return TEXT_PRESETS[name]
        except KeyError:
            raise ConversionError(f"unknown text preset {name!r}; known: {', '.join(TEXT_PRESETS)}") from None

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """HF tensor names and shapes of the text tower: its explicit weight map."""
        d, m = self.hidden_size, self.intermediate_size
        p = TEXT_PREFIX
        shapes: dict[str, tuple[int, ...]] = {
            f"{p}embeddings.token_embedding.weight": (self.vocab_size, d),
            f"{p}embeddings.position_embedding.weight": (self.max_positions, d),
        }
        for i in range(self.num_layers):
            layer = f"{p}encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
                shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
            for norm in ("layer_norm1", "layer_norm2"):
                shapes[f"{layer}{norm}.weight"] = (d,)
                shapes[f"{layer}{norm}.bias"] = (d,)
            shapes.update({f"{layer}mlp.fc1.weight": (m, d), f"{layer}mlp.fc1.bias": (m,)})
            shapes.update({f"{layer}mlp.fc2.weight": (d, m), f"{layer}mlp.fc2.bias": (d,)})
        shapes[f"{p}final_layer_norm.weight"] = (d,)
        shapes[f"{p}final_layer_norm.bias"] = (d,)
        if self.family == "siglip":
            shapes[f"{p}head.weight"] = (self.projection_dim, d)
            shapes[f"{p}head.bias"] = (self.projection_dim,)
        else:
            shapes["text_projection.weight"] = (self.projection_dim, d)
        return shapes


def _siglip(vocab: int, hidden: int, layers: int, heads: int, mlp: int, projection: int | None = None) -> TextConfig:
    return TextConfig("siglip", vocab, hidden, layers, heads, mlp, 64, 1e-6, "gelu_pytorch_tanh", projection or hidden, 1)


def _clip(hidden: int, layers: int, heads: int, mlp: int, projection: int, eos: int = 2) -> TextConfig:
    return TextConfig("clip", 49408, hidden, layers, heads, mlp, 77, 1e-5, "quick_gelu", projection, eos)


# Published text-tower numbers of the Hugging Face checkpoints (same names as the vision PRESETS).
# The openai CLIP configs on the hub still carry the legacy eos_token_id = 2.
TEXT_PRESETS: dict[str, TextConfig] = {
    **{f"siglip-base-patch16-{s}": _siglip(32000, 768, 12, 12, 3072) for s in (224, 256, 384, 512)},
    **{f"siglip-large-patch16-{s}": _siglip(32000, 1024, 24, 16, 4096) for s in (256, 384)},
    **{f"siglip-so400m-patch14-{s}": _siglip(32000, 1152, 27, 16, 4304) for s in (224, 384)},
    **{f"siglip2-base-patch16-{s}": _siglip(256000, 768, 12, 12, 3072) for s in (224, 256, 384, 512)},
    **{f"siglip2-large-patch16-{s}": _siglip(256000, 1024, 24, 16, 4096) for s in (256, 384, 512)},
    **{f"siglip2-so400m-patch14-{s}": _siglip(256000, 1152, 27, 16, 4304) for s in (224, 384)},
    **{f"siglip2-so400m-patch16-{s}": _siglip(256000, 1152, 27, 16, 4304) for s in (256, 384, 512)},
    # NaFlex: only the vision tower differs; the text tower is SigLIP 2's (Gemma vocabulary, 64 tokens)
    "siglip2-base-patch16-naflex": _siglip(256000, 768, 12, 12, 3072),
    "siglip2-so400m-patch16-naflex": _siglip(256000, 1152, 27, 16, 4304),
    "clip-vit-base-patch32": _clip(512, 12, 8, 2048, 512),
    "clip-vit-base-patch16": _clip(512, 12, 8, 2048, 512),
    "clip-vit-large-patch14": _clip(768, 12, 12, 3072, 768),
    "clip-vit-large-patch14-336": _clip(768, 12, 12, 3072, 768),
}
