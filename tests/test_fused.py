"""The torch backend's fused copy of the model (model/fused.py, ``fused=True``) on the CPU: same
results as the layers it replaces, validated under its own key. The CUDA-only part (tanh GELU in
cuBLASLt's epilogue) is checked in tests/test_cuda.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arrowvision import VisionEncoder
from arrowvision.model.fused import GeluEpilogueMLP, PackedAttention, fuse_for_inference
from arrowvision.model.vision import MLP, VisionTransformer
from arrowvision.weights.format import WeightLoader


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("checkpoint", ["tiny_siglip_parquet", "tiny_clip_parquet"])
def test_fused_model_matches_the_unfused_one(request, checkpoint, pixels):
    weights = WeightLoader(request.getfixturevalue(checkpoint))
    plain = VisionTransformer.from_weights(weights)
    fused = fuse_for_inference(VisionTransformer.from_weights(weights))
    assert all(isinstance(layer.self_attn, PackedAttention) for layer in fused.encoder.layers)
    assert not any("q_proj" in name for name in fused.state_dict()), "the separate projections are released"
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    with torch.inference_mode():
        x = torch.from_numpy(pixels)
        np.testing.assert_allclose(fused(x).pooled.numpy(), plain(x).pooled.numpy(), atol=1e-5)


def test_gelu_epilogue_only_where_the_activation_is_tanh_gelu(tiny_siglip_parquet, tiny_clip_parquet):
    siglip = fuse_for_inference(VisionTransformer.from_weights(WeightLoader(tiny_siglip_parquet)))
    clip = fuse_for_inference(VisionTransformer.from_weights(WeightLoader(tiny_clip_parquet)))
    assert isinstance(siglip.encoder.layers[0].mlp, GeluEpilogueMLP) and isinstance(siglip.head.mlp, GeluEpilogueMLP)
    assert type(clip.encoder.layers[0].mlp) is MLP  # quick_gelu: no epilogue for it


def test_gelu_epilogue_layer_keeps_tanh_gelu_on_the_cpu(tiny_siglip_parquet):
    """torch's CPU kernel of _addmm_activation applies the erf GELU: the layer must not use it there."""
    mlp = VisionTransformer.from_weights(WeightLoader(tiny_siglip_parquet)).encoder.layers[0].mlp
    x = torch.randn(2, 17, mlp.fc1.in_features) * 3
    with torch.inference_mode():
        np.testing.assert_array_equal(GeluEpilogueMLP(mlp)(x).numpy(), mlp(x).numpy())


def test_fused_backend_matches_and_half_precision_is_validated_apart(tiny_siglip_parquet, pixels, tmp_path, monkeypatch):
    from arrowvision.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_validated", {})  # this process's memo: keep other tests' reports out of it
    plain = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16", cache_dir=tmp_path)
    fused = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16", fused=True, cache_dir=tmp_path)
    assert fused.backend.fused and not plain.backend.fused
    assert fused.backend.report["min_cosine"] >= 0.999
    assert len(list((tmp_path / "torch").glob("*.json"))) == 2, "the fused model's report has its own key"
    fp32 = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", fused=True)
    reference = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch")
    np.testing.assert_allclose(fp32.backend(pixels), reference.backend(pixels), atol=1e-5)
