"""Our own SigLIP 2 NaFlex vision tower: any resolution and aspect ratio in one batch.

Inputs are what ``arrowvision.inputs.naflex`` (and transformers' ``Siglip2ImageProcessor``) make:
patchified pixels (B, L, p*p*3) padded to a patch budget L, a mask of the real patches (B, L)
and each image's patch grid (B, 2) as (rows, columns). The learned square position grid is
resized to every image's grid by antialiased bilinear interpolation; the whole batch's resize is
one matrix product (no per-image loop), so mixed shapes cost what a fixed batch of L tokens costs,
and the graph exports with a dynamic L. Attention and the MAP pooling head skip padded patches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ModelError
from ..weights.format import WeightLoader
from .config import VisionConfig, vision_prefix
from .vision import Encoder, MAPHead, VisionOutput, VisionTransformer, assign_weights


def axis_weights(index: torch.Tensor, size: torch.Tensor, grid: int) -> torch.Tensor:
    """Interpolation weights along one axis: output ``index`` (B, L) of an axis resized from
    ``grid`` to ``size`` (B, 1) cells -> (B, L, grid).

    These are the weights of ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)``: a triangle kernel widened by the scale when shrinking, renormalized at the
    borders (tests check them against ``F.interpolate`` itself)."""
    scale = grid / size
    support = scale.clamp(min=1.0)
    center = (index + 0.5) * scale - 0.5
    source = torch.arange(grid, dtype=torch.float32, device=index.device)
    weights = (1 - (source - center[..., None]).abs() / support[..., None]).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


def resize_positions(table: torch.Tensor, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
    """The (side*side, D) learned position table resized to each image's (rows, columns) grid,
    laid out row-major and padded with zeros to ``length`` positions: (B, length, D)."""
    side = math.isqrt(table.shape[0])
    sizes = spatial_shapes.to(torch.float32)[:, None, :]  # (B, 1, 2)
    position = torch.arange(length, dtype=torch.float32, device=table.device)[None, :]  # (1, L)
    columns = sizes[..., 1]
    rows = torch.div(position, columns, rounding_mode="floor")
    cols = position - rows * columns
    real = (position < sizes[..., 0] * columns).to(torch.float32)  # (B, L): padding gets no position
    row_w = axis_weights(rows * real, sizes[..., 0], side)  # (B, L, side)
    col_w = axis_weights(cols * real, columns, side)
    weights = (row_w[..., :, None] * col_w[..., None, :]).flatten(-2) * real[..., None]  # (B, L, side*side)
    return (weights @ table.float()).to(table.dtype)


class NaFlexEmbeddings(nn.Module):
    """A Linear over flattened (p, p, 3) patches plus the resized learned positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * p * p, d)
        # _weight: skip normal_ init (see vision.Embeddings)
        self.position_embedding = nn.Embedding(config.num_positions, d, _weight=torch.empty(config.num_positions, d))

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x + resize_positions(self.position_embedding.weight, spatial_shapes, pixel_values.shape[1])


class NaFlexVisionTransformer(nn.Module):
    """SigLIP 2 NaFlex vision tower (``Siglip2VisionModel``): masked encoder, masked MAP head."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if not config.naflex:
            raise ModelError("NaFlexVisionTransformer needs a NaFlex config (num_patches set)")
        self.config = config
        self.embeddings = NaFlexEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = MAPHead(config)

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                output_hidden_states: bool = False) -> VisionOutput:
        """``pixel_values`` (B, L, p*p*3), ``pixel_attention_mask`` (B, L) 1 for real patches,
        ``spatial_shapes`` (B, 2) each image's patch rows and columns. The outputs at padded
        positions of ``last_hidden_state`` are not meaningful (transformers' are not either)."""
        keys = pixel_attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, L): attend to real patches
        x = self.embeddings(pixel_values, spatial_shapes)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask=keys)
            if hidden_states is not None:
                hidden_states.append(x)
        last = self.post_layernorm(x)
        pooled = self.head(last, keys)
        return VisionOutput(pooled, last, tuple(hidden_states) if hidden_states is not None else None)

    @classmethod
    def from_weights(cls, weights: WeightLoader, dtype: torch.dtype | None = torch.float32) -> NaFlexVisionTransformer:
        """Built on the meta device, handed the Parquet tensors (as ``VisionTransformer.from_weights``)."""
        config = VisionConfig.from_weights(weights)
        if not config.naflex:
            raise ModelError(f"{weights.path}: not a SigLIP 2 NaFlex model; load it with VisionTransformer")
        with torch.device("meta"):
            model = cls(config)
        return assign_weights(model, weights, vision_prefix(weights.names()), dtype)


def load_vision_tower(weights: WeightLoader, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """The vision tower a weights file holds: fixed-resolution SigLIP/CLIP or SigLIP 2 NaFlex."""
    config = VisionConfig.from_weights(weights)
    tower = NaFlexVisionTransformer if config.naflex else VisionTransformer
    return tower.from_weights(weights, dtype=dtype)
