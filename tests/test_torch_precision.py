"""The torch backend's precisions (fp32, bf16, fp16) and its uint8 input path, on the CPU:
half precisions are validated against fp32 like the other lossy ones, the uint8 path is
bit-identical to the float32 one in fp32, and CUDA that is missing is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arrowvision import BackendError, VisionEncoder, cli
from arrowvision.backends import torch_backend
from arrowvision.parity import validate

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "arrowvision" / "samples").glob("*.jpg"))


@pytest.fixture(scope="module")
def fp32(tiny_siglip_parquet):
    return VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch")


def test_cpu_default_is_fp32_and_uint8_path_matches_the_float_path(fp32):
    assert fp32.backend.precision == "fp32" and fp32.backend.report == {}
    pixels = fp32.preprocessor.batch(SAMPLES)
    from_floats = fp32.encode(pixels)  # the (N, 3, S, S) float32 path
    from_files = fp32.encode(SAMPLES)  # decoded to uint8, normalized inside the backend
    np.testing.assert_allclose(from_floats, from_files, rtol=0, atol=1e-6)  # same pixels (exact table, below)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precisions_run_validated_and_close_to_fp32(tiny_siglip_parquet, fp32, module_cache, precision, dtype):
    half = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision=precision)
    assert half.backend.precision == precision and half.backend.model.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    report = half.backend.report
    assert set(report["by_kind"]) == {"photos", "grayscale", "sketches", "graphics", "small"}
    assert report["min_cosine"] >= 0.999
    embeddings = half.encode(SAMPLES)
    assert embeddings.dtype == np.float32
    assert (embeddings * fp32.encode(SAMPLES)).sum(1).min() >= 0.999
    assert list(module_cache.glob("torch/*.json")), "the validation report is cached"


def test_validation_is_measured_once_and_held_to_each_callers_threshold(tiny_siglip_parquet, module_cache, monkeypatch):
    VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16")
    monkeypatch.setattr(torch_backend, "_measure", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(torch_backend, "_validated", {})  # only the disk cache is left
    again = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16")
    assert again.backend.report["min_cosine"] >= 0.999
    with pytest.raises(BackendError, match="bf16 export is too inaccurate"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16", min_cosine=0.9999999)


def test_a_report_known_to_this_process_is_still_written_to_another_cache_folder(tiny_siglip_parquet, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16", cache_dir=first)
    VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="bf16", cache_dir=second)
    assert [p.name for p in second.glob("torch/*.json")] == [p.name for p in first.glob("torch/*.json")] != []


def test_a_half_precision_below_the_threshold_is_refused(tiny_siglip_parquet, tmp_path):
    with pytest.raises(BackendError, match=r"fp16 export is too inaccurate: min cosine .* < threshold 1\.0"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="fp16", min_cosine=1.0,
                                   cache_dir=tmp_path)


def test_bad_precision_option_and_device_are_clear_errors(tiny_siglip_parquet):
    with pytest.raises(BackendError, match="not available on the torch backend"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", precision="int8")
    with pytest.raises(BackendError, match="do not apply to the torch backend"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", mode="latency")
    with pytest.raises(BackendError, match="runs on cpu or cuda"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_without_cuda_says_so(tiny_siglip_parquet):
    with pytest.raises(BackendError, match="CUDA is not available to this PyTorch"):
        VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda")


def test_uint8_input_is_checked(fp32):
    with pytest.raises(BackendError, match=r"expected uint8 \(N, S, S, 3\)"):
        fp32.backend.embed_uint8(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(BackendError, match="expected uint8"):
        fp32.backend.stage(np.zeros((1, 32, 32, 3), np.float32))


def test_normalization_on_the_device_is_the_preprocessors_table(fp32):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    staged = fp32.backend.stage(pixels)
    on_device = fp32.backend.normalize(staged.pixels).numpy()
    assert np.array_equal(on_device, fp32.preprocessor.normalize(pixels))


def test_validate_reports_torch_half_precisions(tiny_siglip_parquet, module_cache):
    rows, passed = validate(tiny_siglip_parquet, "torch", "bf16", SAMPLES[:3])
    names = [row["name"] for row in rows]
    assert passed and names[0] == "torch bf16 vs torch"
    assert any("held-out sketches" in name for name in names) and names[-1] == "torch vs transformers"
    assert rows[0]["min_cosine"] >= 0.999


def test_cli_precision_and_compile_options(capsys, tiny_siglip_parquet, tmp_path, module_cache):
    code = cli.main(["embed", str(SAMPLES[0].parent), "-o", str(tmp_path / "out"), "--weights", str(tiny_siglip_parquet),
                     "--backend", "torch", "--precision", "bf16", "--decode", "fast", "--no-progress"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert f"{len(SAMPLES)} embedded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", "x", "-o", "y", "--backend", "onnxruntime", "--compile"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "--compile applies to the torch backends only, not onnxruntime" in capsys.readouterr().err


def test_fixed_shape_batches_reuse_the_full_batch_size(fp32, monkeypatch):
    """Compiled / CUDA-graphed models pad a short last batch to a size they already run (a new
    size would compile again in the middle of a run), else to the next power of two."""
    seen = []
    backend = fp32.backend
    monkeypatch.setattr(backend, "compiled", True)
    monkeypatch.setattr(backend, "fixed_sizes", set())
    monkeypatch.setattr(backend, "forward", lambda pixels: seen.append(pixels.shape[0]) or backend._forward(pixels))
    batch = torch.zeros((256, 3, 32, 32))
    for rows in (256, 128, 3, 300):
        assert backend._run(batch[:rows] if rows <= 256 else torch.zeros((rows, 3, 32, 32))).shape[0] == rows
    assert seen == [256, 256, 256, 512]
    monkeypatch.setattr(backend, "fixed_sizes", set())
    seen.clear()
    backend._run(batch[:3])
    assert seen == [4]
