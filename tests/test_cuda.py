"""The torch backend and the input pipeline on a CUDA GPU (skipped without one): precisions,
the uint8 device path, every decode mode end to end with bad files in the errors table, and
torch.compile. Run on a GPU machine by tools/gpu_check.sh."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")

from arrowvision import VisionEncoder
from arrowvision.datasets.pipeline import embed_paths, read_embeddings

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Photos as 640x480 JPEGs, a grayscale JPEG, an EXIF-rotated JPEG, a PNG, a small JPEG
    (below the model size on the GPU path: HF pads it), and two bad files."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("cuda_images")
    samples = sorted((Path(__file__).resolve().parents[1] / "arrowvision" / "samples").glob("*.jpg"))
    for i, sample in enumerate(samples):
        Image.open(sample).convert("RGB").resize((640, 480)).save(root / f"photo{i}.jpg", quality=90)
    photo = Image.open(samples[0]).convert("RGB").resize((320, 240))
    photo.convert("L").save(root / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    photo.save(root / "rotated.jpg", exif=exif)
    photo.save(root / "lossless.png")
    photo.resize((20, 16)).save(root / "small.jpg")
    (root / "truncated.jpg").write_bytes((root / "photo0.jpg").read_bytes()[:2000])
    (root / "text.jpg").write_text("not an image")
    return root


def paths_of(folder):
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture(scope="module")
def reference(tiny_siglip_parquet):
    return VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cpu")


def test_default_precision_on_cuda_is_half_and_validated(tiny_siglip_parquet, module_cache):
    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert encoder.backend.precision == expected
    assert encoder.backend.report["min_cosine"] >= 0.99


@pytest.mark.parametrize("precision,min_cosine", [("fp32", 0.99999), ("bf16", 0.999), ("fp16", 0.999)])
def test_cuda_precisions_match_the_cpu_reference(tiny_siglip_parquet, reference, folder, module_cache, precision, min_cosine):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    photos = [p for p in paths_of(folder) if "photo" in p]
    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision=precision)
    ours = encoder.encode(photos)
    expected = reference.encode(photos)
    assert ours.dtype == np.float32
    assert (ours * expected).sum(1).min() >= min_cosine
    floats = encoder.backend(reference.preprocessor.batch(photos))  # the float32 pixel path agrees with the uint8 one
    assert np.allclose(floats / np.linalg.norm(floats, axis=1, keepdims=True), ours, atol=1e-2 if precision != "fp32" else 1e-5)


@pytest.mark.parametrize("decode", ["exact", "fast", pytest.param("gpu", marks=needs_torchvision)])
@pytest.mark.parametrize("pool", ["process", "thread"])
def test_embed_on_cuda_every_decode_mode(tiny_siglip_parquet, reference, folder, tmp_path, module_cache, decode, pool):
    encoder = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32")
    paths = paths_of(folder)
    stats = embed_paths(encoder, paths, tmp_path / "out", batch_size=4, workers=2, progress=False, decode=decode,
                        decode_pool=pool)
    bad = {str(folder / "truncated.jpg"), str(folder / "text.jpg")}
    assert (stats.embedded, stats.failed) == (len(paths) - 2, 2)
    assert {path for path, _ in stats.errors} == bad
    assert 0 < stats.model_busy <= 1
    table = read_embeddings(tmp_path / "out")
    got = dict(zip(table.column("path").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    good = [p for p in paths if p not in bad]
    expected = reference.encode(good)
    cosines = np.array([got[p] @ e for p, e in zip(good, expected)])
    assert cosines.min() >= (0.99999 if decode == "exact" else 0.99), dict(zip(good, cosines))


@needs_torchvision
def test_gpu_resize_matches_pillow(reference, folder):
    from arrowvision.inputs.gpu_decode import resize_on_device
    from arrowvision.inputs.preprocess import load_image

    preprocessor = reference.preprocessor
    photos = [p for p in paths_of(folder) if "photo" in p]
    images = [torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1).cuda() for p in photos]
    ours = resize_on_device(images, preprocessor).permute(0, 2, 3, 1).cpu().numpy().astype(int)
    pillow = np.stack([preprocessor.resized(load_image(p)) for p in photos]).astype(int)
    assert np.abs(ours - pillow).mean() < 1.0 and np.abs(ours - pillow).max() <= 16


def test_compiled_model_matches_eager(tiny_siglip_parquet, folder, module_cache):
    photos = [p for p in paths_of(folder) if "photo" in p]
    eager = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32")
    compiled = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", compile=True)
    first = compiled.encode(photos, batch_size=4)  # 7 photos: a full batch and a padded one
    assert (first * eager.encode(photos, batch_size=4)).sum(1).min() >= 0.9999


def test_cuda_graphs_match_eager_at_every_batch_size(tiny_siglip_parquet, folder, module_cache):
    photos = [p for p in paths_of(folder) if "photo" in p]
    graphed = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32")
    eager = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", cuda_graphs=False)
    assert graphed.backend.graphs is not None and eager.backend.graphs is None
    expected = eager.encode(photos)
    for batch_size in (1, 3, len(photos)):  # 3 and 7 are padded to 4 and 8
        assert (graphed.encode(photos, batch_size=batch_size) * expected).sum(1).min() >= 0.99999
    assert graphed.backend.graphs, "a graph was captured (no silent fall-back to eager)"
    assert {shape[0] for shape in graphed.backend.graphs} == {1, 4, 8}


def test_compiled_model_as_cuda_graphs_matches_eager_and_is_cached(tiny_siglip_parquet, folder, module_cache):
    photos = [p for p in paths_of(folder) if "photo" in p]
    eager = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", cuda_graphs=False)
    both = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", compile=True,
                                      cuda_graphs=True)
    assert (both.encode(photos, batch_size=4) * eager.encode(photos, batch_size=4)).sum(1).min() >= 0.9999
    assert {shape[0] for shape in both.backend.graphs} == {4}, "the compiled model was captured, not run eagerly"
    assert both.backend.compile_cache.path.exists(), "the compiled artifacts are kept for the next process"


def test_a_second_process_compiles_from_our_cache_on_cuda(tiny_siglip_parquet, tmp_path):
    """Fresh Inductor and Triton folders in both processes: the second one's hits (Triton kernels
    included, bundled in the FX-graph entries) can only come from our entry."""
    from .compilekit import run_child

    pixels = tmp_path / "pixels.npy"
    np.save(pixels, np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    first, _ = run_child(tiny_siglip_parquet, tmp_path / "cache", tmp_path / "inductor1", pixels, "cuda")
    second, _ = run_child(tiny_siglip_parquet, tmp_path / "cache", tmp_path / "inductor2", pixels, "cuda")
    assert first["loaded"] is False and second["loaded"] is True
    assert second["counters"]["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["counters"]["inductor"].get("fxgraph_cache_miss", 0) == 0
    np.testing.assert_allclose(second["output"], first["output"], atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_fused_model_matches_on_cuda(tiny_siglip_parquet, folder, module_cache, graphs):
    """Packed q/k/v and tanh GELU in cuBLASLt's epilogue: the unfused model's results (an erf GELU
    would differ by up to 4e-4 per activation)."""
    photos = [p for p in paths_of(folder) if "photo" in p]
    plain = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", cuda_graphs=False)
    fused = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", precision="fp32", fused=True,
                                       cuda_graphs=graphs)
    pixels = plain.preprocessor.batch(photos)
    assert np.abs(fused.backend(pixels) - plain.backend(pixels)).max() < 1e-4
    half = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch", device="cuda", fused=True, cuda_graphs=graphs)
    assert half.backend.report["min_cosine"] >= 0.999
    assert (half.encode(photos) * plain.encode(photos)).sum(1).min() >= 0.999
