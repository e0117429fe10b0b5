"""Decode modes (exact, fast, gpu) and the feeder (thread and process pools), on the CPU:
exact keeps bit-parity, fast stays within cosine of exact on the bundled photos, gpu without
CUDA/torchvision is a clear error, bad files land in the errors table in every pool."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from arrowvision import ArrowVisionError, VisionEncoder, cli
from arrowvision.datasets.pipeline import embed_paths, read_embeddings
from arrowvision.inputs import feeder
from arrowvision.inputs.decode import decode_path, open_reduced, plain_jpeg
from arrowvision.inputs.feeder import Feeder, choose_pool

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The bundled photos as 640x480 JPEGs, a PNG, an EXIF-rotated JPEG and two bad files."""
    root = tmp_path_factory.mktemp("decode")
    for sample in SAMPLES:
        Image.open(sample).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC).save(root / sample.name, quality=90)
    Image.open(SAMPLES[0]).save(root / "lossless.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(SAMPLES[1]).convert("RGB").resize((640, 480)).save(root / "rotated.jpg", exif=exif)
    (root / "truncated.jpg").write_bytes((root / SAMPLES[0].name).read_bytes()[:3000])
    (root / "notes.jpg").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def encoder(tiny_siglip_parquet) -> VisionEncoder:
    return VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch")


def files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir())


def test_exact_is_todays_preprocessing(encoder, folder):
    for path in files(folder)[:3]:
        item = decode_path(path, encoder.preprocessor, "exact")
        assert np.array_equal(encoder.preprocessor.normalize(item.pixels), encoder.preprocessor(path))
        assert (item.width, item.height) == Image.open(path).size and len(item.digest) == 64


def test_fast_decodes_jpegs_at_reduced_size_and_keeps_the_files_size(folder):
    data = (folder / SAMPLES[0].name).read_bytes()
    image, original = open_reduced(data, "x", 224)
    assert original == (640, 480) and image.size == (320, 240)  # 1/2 scale: the smallest still >= 224
    image, _ = open_reduced(data, "x", 32)
    assert image.size == (80, 60)  # 1/8
    png = io.BytesIO()
    Image.open(SAMPLES[0]).save(png, "PNG")
    assert open_reduced(png.getvalue(), "x", 32)[0].size == Image.open(SAMPLES[0]).size  # not a JPEG: full size


def test_fast_is_close_to_exact_on_the_bundled_photos(tmp_path):
    """Base-size demo model: as shipped (256 px, too small to reduce) fast is exact; re-encoded
    at 640x480 and 1280x960 it stays within the cosines documented in docs/GPU.md."""
    encoder = VisionEncoder.from_parquet(DEMO, backend="torch")
    # same pixels, so the same embeddings up to GEMM rounding (kernels differ between CPU kinds)
    np.testing.assert_allclose(encoder.encode(SAMPLES, decode="fast"), encoder.encode(SAMPLES), rtol=0, atol=1e-6)
    for size in ((640, 480), (1280, 960)):
        paths = []
        for sample in SAMPLES:
            path = tmp_path / f"{sample.stem}-{size[0]}.jpg"
            Image.open(sample).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
            paths.append(path)
        cosines = (encoder.encode(paths, decode="fast") * encoder.encode(paths)).sum(1)
        assert cosines.min() >= 0.999, (size, cosines)


def test_plain_jpeg_sends_odd_files_to_the_cpu(folder):
    assert plain_jpeg((folder / SAMPLES[0].name).read_bytes()) == (640, 480)
    for name in ("lossless.png", "rotated.jpg", "notes.jpg", "truncated.jpg"):
        assert plain_jpeg((folder / name).read_bytes()) is None
    cmyk = io.BytesIO()
    Image.open(SAMPLES[0]).convert("CMYK").save(cmyk, "JPEG")
    assert plain_jpeg(cmyk.getvalue()) is None


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("pool", ["thread", "process", "process-copied"])
def test_embed_in_every_pool_and_mode_keeps_bad_files_in_the_errors_table(encoder, folder, tmp_path, monkeypatch, mode, pool):
    if pool == "process-copied":  # a /dev/shm too small for the slots: rows come back pickled
        monkeypatch.setattr(feeder, "shared_memory_fits", lambda nbytes: False)
    paths = files(folder)
    stats = embed_paths(encoder, paths, tmp_path / "out", batch_size=3, workers=2, progress=False, decode=mode,
                        decode_pool=pool.split("-")[0])
    bad = {str(folder / "truncated.jpg"), str(folder / "notes.jpg")}
    assert (stats.embedded, stats.failed) == (len(paths) - 2, 2)
    assert {path for path, _ in stats.errors} == bad
    assert "not an image" in dict(stats.errors)[str(folder / "notes.jpg")]
    table = read_embeddings(tmp_path / "out")
    got = dict(zip(table.column("path").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))
    good = [p for p in paths if p not in bad]
    expected = encoder.encode(good, decode=mode)
    np.testing.assert_allclose(np.stack([got[p] for p in good]), expected, atol=1e-5)  # as encode(), in any pool
    upright = [ImageOps.exif_transpose(Image.open(p)).size for p in table.column("path").to_pylist()]
    assert list(zip(table.column("width").to_pylist(), table.column("height").to_pylist())) == upright


def test_process_pool_leaves_no_shared_memory_behind(encoder, folder, tmp_path):
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    fed = Feeder(encoder.preprocessor, batch_size=2, workers=2, pool="process")
    batches = fed.batches(files(folder))
    first = next(batches)
    assert first.pixels.dtype == np.uint8 and first.pixels.shape[1:] == (32, 32, 3)
    batches.close()  # a consumer that stops early
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {name for name in after - before if name.startswith("psm_")}


def test_gpu_decode_without_cuda_is_a_clear_error(encoder, folder, tmp_path, capsys):
    with pytest.raises(ArrowVisionError, match="--decode gpu needs the torch backend on a CUDA device"):
        embed_paths(encoder, files(folder), tmp_path / "out", progress=False, decode="gpu")
    code = cli.main(["embed", str(folder), "-o", str(tmp_path / "cli"), "--weights", str(DEMO), "--backend", "torch",
                     "--decode", "gpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "error: --decode gpu needs" in err and "Traceback" not in err
    with pytest.raises(ArrowVisionError, match="decode='gpu'"):
        encoder.encode(SAMPLES[:1], decode="gpu")


def test_decode_pool_choice():
    assert choose_pool("auto", "cuda:0") == "process" and choose_pool("auto", "cpu") == "thread"
    assert choose_pool("thread", "cuda") == "thread"
    with pytest.raises(ArrowVisionError, match="decode pool"):
        choose_pool("fibers", "cpu")


def test_gpu_resize_matches_pillow_on_the_cpu(encoder, folder):
    """The GPU path's resize (antialiased bicubic in torch, rounded to uint8) run on the CPU."""
    torch = pytest.importorskip("torch")
    from arrowvision.inputs.gpu_decode import resize_on_device
    from arrowvision.inputs.preprocess import Preprocessor, load_image

    paths = [str(folder / s.name) for s in SAMPLES]
    for preprocessor in (encoder.preprocessor, Preprocessor(224, (0.5,) * 3, (0.5,) * 3, True)):  # SigLIP, CLIP crop
        images = [torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1).contiguous() for p in paths]
        ours = resize_on_device(images, preprocessor).permute(0, 2, 3, 1).numpy().astype(int)
        pillow = np.stack([preprocessor.resized(load_image(p)) for p in paths]).astype(int)
        assert ours.shape == pillow.shape
        assert np.abs(ours - pillow).mean() < 1.0 and np.abs(ours - pillow).max() <= 16


def test_gpu_mode_leaves_a_share_of_jpegs_to_the_workers():
    from arrowvision.inputs.decode import gpu_cpu_share, row_mode

    share = gpu_cpu_share(16)
    assert 0.3 < share < 0.5 and gpu_cpu_share(2) < 0.1  # 16 workers decode ~40%; 2 workers hardly any
    modes = [row_mode("gpu", i, share) for i in range(1000)]
    assert abs(modes.count("fast") - 1000 * share) <= 1  # spread evenly, whatever the batch boundaries
    assert "fast" not in modes[:1] or share >= 1  # and deterministic
    assert [row_mode("exact", i, share) for i in range(3)] == ["exact"] * 3
    assert [row_mode("gpu", i, 0.0) for i in range(3)] == ["gpu"] * 3
