"""Fewer, larger kernels for eager inference: a copy of a vision tower with fused layers.

- **Packed q/k/v**: one (3D, D) projection instead of three (D, D) ones: one GEMM reads the
  input once and launches once; q, k and v are views of its output, laid out as SDPA wants them
  (last dimension contiguous), so the flash / cuDNN attention kernels take them as they are.
- **GELU in the GEMM's epilogue** (tanh GELU only, SigLIP's): ``torch._addmm_activation`` runs
  ``gelu_tanh(x @ W1^T + b1)`` as one cuBLASLt call on CUDA, so the (B, N, 4D) activation is
  written once instead of written, read and written again. CUDA only: the CPU kernel of that
  op applies the exact (erf) GELU, so on the CPU the layer runs as before.

Only the torch backend's own copy of the model is fused (``fused=True``): the exported ONNX / IR
graphs, the parity checks and the parameter names stay those of ``vision.py``. The results equal
the unfused model's within float rounding (a GEMM's blocking differs; tests/test_fused.py), and a
half-precision model is validated after fusing, on what actually runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vision import MLP, Attention, VisionTransformer

TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


class PackedAttention(nn.Module):
    """``Attention`` with q, k and v projected by one GEMM."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.num_heads = attention.num_heads
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.qkv_weight = nn.Parameter(torch.cat([p.weight for p in projections]), requires_grad=False)
        self.qkv_bias = nn.Parameter(torch.cat([p.bias for p in projections]), requires_grad=False)
        self.out_proj = attention.out_proj

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh), a view with its last dimension contiguous
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class GeluEpilogueMLP(nn.Module):
    """``MLP`` with tanh GELU applied inside fc1's GEMM on CUDA (as ``MLP`` elsewhere)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.fc1, self.fc2, self.act = mlp.fc1, mlp.fc2, mlp.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:  # torch's CPU kernel of _addmm_activation uses the erf GELU, not tanh
            return self.fc2(self.act(self.fc1(x)))
        rows = x.reshape(-1, x.shape[-1])
        hidden = torch._addmm_activation(self.fc1.bias, rows, self.fc1.weight.t(), use_gelu=True)
        return self.fc2(hidden).view(*x.shape[:-1], -1)


def fuse_for_inference(model: VisionTransformer) -> VisionTransformer:
    """Replace ``model``'s encoder attention and MLP layers in place with fused ones (the q/k/v
    weights are concatenated: a copy; the originals are released). Returns ``model``."""
    gelu_epilogue = model.config.hidden_act in TANH_GELU
    for layer in model.encoder.layers:
        layer.self_attn = PackedAttention(layer.self_attn)
        if gelu_epilogue:
            layer.mlp = GeluEpilogueMLP(layer.mlp)
    if model.config.family == "siglip" and gelu_epilogue:
        model.head.mlp = GeluEpilogueMLP(model.head.mlp)
    return model
