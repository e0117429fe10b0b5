"""Our own SigLIP / CLIP vision transformer in PyTorch.

Module and parameter names mirror the Hugging Face ones, so the weight map is explicit and
short (``hf_name``), and the model is built on the meta device and handed the Parquet tensors
directly: no random init, no copy. ``forward`` can return every block's output, in the same
order as transformers' ``hidden_states``, for layer-by-layer parity checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..weights.format import WeightLoader
from .config import VisionConfig, vision_prefix
from .text_config import TextConfig

LayerConfig = VisionConfig | TextConfig  # what the shared encoder layers read: sizes, eps, activation


def activation(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ModelError(f"unsupported activation {name!r}")


class VisionOutput(NamedTuple):
    pooled: torch.Tensor  # (B, D_embed): MAP head output (SigLIP) or projected class token (CLIP)
    last_hidden_state: torch.Tensor  # (B, N, D), as transformers' last_hidden_state
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings + each layer, as transformers'


class Embeddings(nn.Module):
    """Conv patchify + learned positions (+ CLIP's class token), interpolated for other sizes."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, bias=config.family == "siglip"
        )
        if config.family == "clip":
            self.class_embedding = nn.Parameter(torch.empty(d))
        # _weight: skip normal_ init, which on the meta device costs a 1.5 s first-call import
        self.position_embedding = nn.Embedding(config.num_positions, d, _weight=torch.empty(config.num_positions, d))

    def positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of ``height x width`` pixels.

        Matches transformers' ``interpolate_pos_encoding``: bicubic, align_corners=False, on the
        patch grid, the class position (CLIP) kept as is."""
        table = self.position_embedding.weight
        p = self.config.patch_size
        grid_h, grid_w = height // p, width // p
        num_extra = 1 if self.config.family == "clip" else 0
        stored = table.shape[0] - num_extra
        if grid_h * grid_w == stored and height == width:
            return table.unsqueeze(0)
        side = math.isqrt(stored)
        patch_pos = table[num_extra:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:num_extra].unsqueeze(0), patch_pos], dim=1) if num_extra else patch_pos

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.config.family == "clip":
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.positions(pixel_values.shape[-2], pixel_values.shape[-1])


class Attention(nn.Module):
    def __init__(self, config: LayerConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """``causal``: each position attends only to itself and earlier ones (CLIP's text tower)."""
        b, n, d = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, config: LayerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block, shared by the vision and text towers."""

    def __init__(self, config: LayerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: LayerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))


class PoolingAttention(nn.Module):
    """The probe-to-tokens attention of SigLIP's MAP head; packed in_proj as in nn.MultiheadAttention."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        d = query.shape[-1]
        w_q, w_kv = self.in_proj_weight[:d], self.in_proj_weight[d:]
        b_q, b_kv = self.in_proj_bias[:d], self.in_proj_bias[d:]
        q = F.linear(query, w_q, b_q)
        k, v = F.linear(tokens, w_kv, b_kv).chunk(2, dim=-1)
        b = tokens.shape[0]
        q, k, v = (t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, d))


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over all tokens, then an MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = PoolingAttention(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.probe.expand(tokens.shape[0], -1, -1), tokens)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class VisionTransformer(nn.Module):
    """SigLIP (MAP head) or CLIP (class token + projection) vision tower."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embeddings = Embeddings(config)
        if config.family == "clip":
            self.pre_layrnorm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # sic, HF's name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        if config.family == "siglip":
            self.head = MAPHead(config)
        elif config.projection_dim:
            self.visual_projection = nn.Linear(d, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> VisionOutput:
        x = self.embeddings(pixel_values)
        if self.config.family == "clip":
            x = self.pre_layrnorm(x)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x)
            if hidden_states is not None:
                hidden_states.append(x)
        if self.config.family == "siglip":
            last = self.post_layernorm(x)
            pooled = self.head(last)
        else:
            last = x  # CLIP's last_hidden_state is taken before post_layernorm
            pooled = self.post_layernorm(x[:, 0])
            if self.config.projection_dim:
                pooled = self.visual_projection(pooled)
        return VisionOutput(pooled, last, tuple(hidden_states) if hidden_states is not None else None)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_weights(cls, weights: WeightLoader, dtype: torch.dtype | None = torch.float32) -> VisionTransformer:
        """Build on the meta device and assign the Parquet tensors (views of the file mapping).

        ``dtype=None`` keeps the file's dtype; otherwise tensors of another dtype are cast (a copy)."""
        config = VisionConfig.from_weights(weights)
        prefix = vision_prefix(weights.names())
        with torch.device("meta"):
            model = cls(config)
        tensors = weights.torch()
        state = {}
        for name in model.state_dict():
            source = hf_name(name, prefix)
            if source not in tensors:
                raise ModelError(f"{weights.path}: missing tensor {source!r} for {config.family} vision tower")
            tensor = tensors[source]
            if dtype is not None and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            state[name] = tensor
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # shape mismatches: name them
            raise ModelError(f"{weights.path}: tensors do not fit the config: {exc}") from None
        return model.eval().requires_grad_(False)


def hf_name(name: str, prefix: str = "vision_model.") -> str:
    """Our parameter name -> the HF tensor name (the whole weight map)."""
    return name if name.startswith("visual_projection.") else prefix + name
