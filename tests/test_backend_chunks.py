"""The torch (CPU) and ONNX Runtime backends run large batches in chunks of ~CPU_CHUNK_TOKENS
tokens (bounded activation memory; see backends/base.py): same rows out as one whole call."""

from __future__ import annotations

import numpy as np
import pytest

from arrowvision import VisionEncoder
from arrowvision.backends import base


@pytest.mark.parametrize("backend_name, inner", [("torch", "_forward"), ("onnxruntime", "_run")])
def test_large_batches_run_in_chunks_with_the_same_result(backend_name, inner, module_cache, tiny_siglip_parquet,
                                                          monkeypatch):
    backend = VisionEncoder.from_parquet(tiny_siglip_parquet, backend=backend_name).backend
    size = backend.config.image_size
    pixels = np.random.default_rng(0).standard_normal((7, 3, size, size)).astype(np.float32)
    whole = backend(pixels)
    monkeypatch.setattr(base, "CPU_CHUNK_TOKENS", 3 * (size // backend.config.patch_size) ** 2)  # 3 images a chunk
    sizes = []
    call = getattr(backend, inner)
    monkeypatch.setattr(backend, inner, lambda batch: sizes.append(len(batch)) or call(batch))
    chunked = backend(pixels)
    assert sizes == [3, 3, 1]
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)
