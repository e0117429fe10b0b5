"""Our SigLIP / CLIP text transformer in PyTorch, built from the vision tower's encoder layers.

The two families differ only around the shared stack: SigLIP attends bidirectionally and pools
the last position through ``head`` (Linear with bias); CLIP is causal and pools the end-of-text
position through ``text_projection`` (no bias). Names mirror the Hugging Face ones, so the model
is built on the meta device and handed the Parquet tensors directly, as the vision tower is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import ModelError
from ..weights.format import WeightLoader
from .text_config import TEXT_PREFIX, TextConfig
from .vision import Encoder


class TextOutput(NamedTuple):
    pooled: torch.Tensor  # (B, D_embed): after head (SigLIP) / text_projection (CLIP), unnormalized
    last_hidden_state: torch.Tensor  # (B, L, D) after final_layer_norm, as transformers'


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        d = config.hidden_size
        # _weight: no random init on the meta device (see vision Embeddings)
        self.token_embedding = nn.Embedding(config.vocab_size, d, _weight=torch.empty(config.vocab_size, d))
        self.position_embedding = nn.Embedding(config.max_positions, d, _weight=torch.empty(config.max_positions, d))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]].unsqueeze(0)


class TextTransformer(nn.Module):
    """SigLIP (last position + head) or CLIP (causal, end-of-text + projection) text tower."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.family == "siglip":
            self.head = nn.Linear(config.hidden_size, config.projection_dim)
        else:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def pooling_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where CLIP reads the sequence embedding, by transformers' two rules: the highest id
        (end-of-text is the last vocabulary entry) for legacy configs with ``eos_token_id == 2``,
        else the first ``eos_token_id``."""
        ids = input_ids.to(torch.int32)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor) -> TextOutput:
        if input_ids.shape[1] > self.config.max_positions:
            raise ModelError(f"{input_ids.shape[1]} tokens exceed the text tower's {self.config.max_positions} positions")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x, causal=self.config.causal)
        last = self.final_layer_norm(x)
        if self.config.family == "siglip":
            pooled = self.head(last[:, -1])
        else:
            rows = torch.arange(last.shape[0], device=last.device)
            pooled = self.text_projection(last[rows, self.pooling_positions(input_ids)])
        return TextOutput(pooled, last)

    @classmethod
    def from_weights(cls, weights: WeightLoader, dtype: torch.dtype | None = torch.float32) -> TextTransformer:
        """Build on the meta device and assign the Parquet tensors (views of the file mapping)."""
        config = TextConfig.from_weights(weights)
        with torch.device("meta"):
            model = cls(config)
        tensors = weights.torch()
        state = {}
        for name in model.state_dict():
            source = text_hf_name(name)
            if source not in tensors:
                raise ModelError(f"{weights.path}: missing tensor {source!r} for {config.family} text tower")
            tensor = tensors[source]
            state[name] = tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelError(f"{weights.path}: text tensors do not fit the config: {exc}") from None
        return model.eval().requires_grad_(False)


def text_hf_name(name: str) -> str:
    """Our parameter name -> the HF tensor name (the whole text weight map)."""
    return name if name.startswith("text_projection.") else TEXT_PREFIX + name
