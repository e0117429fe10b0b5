"""ONNX artifact and the onnxruntime backend: parity with the torch reference, int8 validation,
the cache, the CLI export, and a torch-free runtime."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from arrowvision import BackendError, VisionEncoder, WeightLoader
from arrowvision.backends.cpu import cpu_info
from arrowvision.backends.onnx_export import cache_key, export_onnx
from arrowvision.backends.validation import KINDS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
PHOTO = ROOT / "arrowvision" / "samples" / "chelsea.jpg"


@pytest.mark.parametrize("weights_fixture", ["tiny_siglip_parquet", "tiny_clip_parquet"])
def test_fp32_matches_torch_reference(request, module_cache, weights_fixture):
    path = request.getfixturevalue(weights_fixture)
    reference = VisionEncoder.from_parquet(path, backend="torch")
    fast = VisionEncoder.from_parquet(path, backend="onnxruntime")
    assert (fast.backend.name, fast.backend.precision) == ("onnxruntime", "fp32")
    assert fast.backend.report["max_abs"] <= 1e-4
    size = reference.config.image_size
    for batch in (1, 5, 64):  # dynamic batch dimension
        pixels = np.random.default_rng(batch).standard_normal((batch, 3, size, size), dtype=np.float32)
        diff = np.abs(fast.encode(pixels, normalize=False) - reference.encode(pixels, normalize=False)).max()
        assert diff <= 1e-4, (batch, diff)


def test_int8_holds_on_every_heldout_kind(module_cache):
    encoder = VisionEncoder.from_parquet(DEMO, backend="onnxruntime", precision="int8")
    report = encoder.backend.report
    assert report["reduce_range"] == (not cpu_info().int8_vnni)  # 7-bit weights where u8 x s8 saturates
    assert set(report["by_kind"]) == set(KINDS)
    assert min(row["min_cosine"] for row in report["by_kind"].values()) >= 0.99
    reference = VisionEncoder.from_parquet(DEMO, backend="torch")
    photos = sorted((ROOT / "arrowvision" / "heldout" / "photos").glob("*.jpg"))
    assert (encoder.encode(photos) * reference.encode(photos)).sum(axis=1).min() >= 0.99
    # int8 is a different model from fp32: not an fp32 file under another name
    fp32 = VisionEncoder.from_parquet(DEMO, backend="onnxruntime")
    assert np.abs(encoder.encode(photos) - fp32.encode(photos)).max() > 1e-5
    assert (encoder.backend.entry / "model.onnx").stat().st_size < 0.6 * (fp32.backend.entry / "model.onnx").stat().st_size


def test_cache_is_reused_and_keyed(module_cache, tiny_siglip_parquet):
    weights = WeightLoader(tiny_siglip_parquet)
    entry = export_onnx(weights)
    stamp = (entry / "meta.json").stat().st_mtime_ns
    assert export_onnx(weights) == entry and (entry / "meta.json").stat().st_mtime_ns == stamp
    assert export_onnx(weights, force=True) == entry and (entry / "meta.json").stat().st_mtime_ns != stamp
    assert cache_key(weights, "int8") != cache_key(weights, "fp32")
    assert entry.parent == module_cache / "onnx"


def test_unsupported_options_are_clear_errors(module_cache, tiny_siglip_parquet):
    with pytest.raises(BackendError, match="not available on the onnxruntime backend"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", precision="bf16")
    with pytest.raises(BackendError, match="CPU only"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", device="GPU")
    with pytest.raises(BackendError, match="mode"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", mode="throughput")


def test_cli_exports_a_portable_onnx_file(tmp_path, tiny_clip_parquet):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    env = {**os.environ, "ARROWVISION_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "arrowvision", "export", str(tiny_clip_parquet), "--format", "onnx", "-o", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "max abs diff" in result.stdout
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    reference = VisionEncoder.from_parquet(tiny_clip_parquet, backend="torch")
    pixels = reference.preprocess([PHOTO])
    np.testing.assert_allclose(session.run(None, {"pixel_values": pixels})[0], reference.encode(pixels, normalize=False), atol=1e-4)
    missing = subprocess.run([sys.executable, "-m", "arrowvision", "export", str(tiny_clip_parquet), "--format", "onnx"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode != 0 and "-o" in missing.stderr and "Traceback" not in missing.stderr


def test_runtime_does_not_import_torch(tmp_path, tiny_siglip_parquet):
    cache = tmp_path / "cache"
    env = {**os.environ, "ARROWVISION_CACHE": str(cache)}
    VisionEncoder.from_parquet(tiny_siglip_parquet, backend="onnxruntime", cache_dir=cache)  # warm the cache
    code = textwrap.dedent(f"""
        import sys
        import arrowvision
        encoder = arrowvision.VisionEncoder.from_parquet({str(tiny_siglip_parquet)!r}, backend="onnxruntime")
        assert encoder.encode([{str(PHOTO)!r}]).shape == (1, 64)
        print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "nncf", "openvino")))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "LEAKED []" in result.stdout, result.stdout
