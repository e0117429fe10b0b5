"""Behaviours no other test pinned down: the resume guard, sketch embedding and search end to end,
search ranking past the top hit and its mismatch checks, `export --force`, weights that do not fit
their config, and `arrowvision demo`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arrowvision import ArrowVisionError, VisionEncoder, WeightLoader
from arrowvision.datasets.pipeline import embed_paths, read_embeddings
from arrowvision.inputs.preprocess import normalize_sketch
from arrowvision.search.scan import top_k

from .test_pipeline import DEMO, cli
from .test_sketch import draw

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))


@pytest.fixture(scope="module")
def demo() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO, backend="torch")


@pytest.fixture(scope="module")
def sketches(tmp_path_factory) -> Path:
    """Dark-on-light sketches in one folder (the corpus) and their light-on-dark twins beside it."""
    folder = tmp_path_factory.mktemp("sketches")
    (folder / "corpus").mkdir()
    (folder / "inverted").mkdir()
    for kind in ("house", "face", "zigzag"):
        Image.fromarray(draw(kind)).save(folder / "corpus" / f"{kind}.png")
        Image.fromarray(draw(kind, ink=255, paper=0)).save(folder / "inverted" / f"{kind}.png")
    return folder


# ----------------------------------------------------------------------------- resume guard


def test_resume_guard_refuses_output_of_another_model_or_sketch_setting(tmp_path, demo, tiny_siglip_parquet):
    out = tmp_path / "emb"
    first = embed_paths(demo, [str(p) for p in SAMPLES[:2]], out, progress=False)
    assert first.embedded == 2
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(ArrowVisionError, match="another model or preprocessing"):
        embed_paths(demo, [str(p) for p in SAMPLES[:3]], out, sketch=True, progress=False)
    other = VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch")
    with pytest.raises(ArrowVisionError, match="another model or preprocessing"):
        embed_paths(other, [str(p) for p in SAMPLES[:3]], out, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing written
    resumed = embed_paths(demo, [str(p) for p in SAMPLES[:3]], out, progress=False)  # same settings: resumes
    assert (resumed.skipped, resumed.embedded) == (2, 1)


def test_resume_guard_from_the_command_line(tmp_path):
    out = tmp_path / "emb"
    first = cli("embed", str(SAMPLES[0]), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--no-progress")
    assert first.returncode == 0, first.stderr
    refused = cli("embed", str(SAMPLES[0]), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--sketch", "--no-progress")
    assert refused.returncode == 1 and refused.stderr.startswith("error:") and "another model or preprocessing" in refused.stderr
    assert "Traceback" not in refused.stderr


# ------------------------------------------------------------------------ sketches end to end


def test_embed_sketch_and_search_sketch_end_to_end(tmp_path, demo, sketches):
    out = tmp_path / "emb"
    run = cli("embed", str(sketches / "corpus"), "-o", str(out), "--weights", str(DEMO), "--backend", "torch", "--sketch",
              "--no-progress")
    assert run.returncode == 0, run.stderr
    table = read_embeddings(out)
    assert pq.read_schema(next(out.glob("part-*.parquet"))).metadata[b"arrowvision.sketch"] == b"true"
    paths = table.column("path").to_pylist()
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    expected = demo.encode([normalize_sketch(p) for p in paths])  # rows are of the normalized sketches
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    plain = demo.encode(paths)
    assert np.abs(plain - vectors).max() > 1e-3  # --sketch changed what was embedded

    query = sketches / "inverted" / "face.png"  # the light-on-dark twin finds its drawing first
    search = cli("search", str(out), str(query), "--weights", str(DEMO), "--backend", "torch", "--sketch", "-k", "3")
    assert search.returncode == 0, search.stderr
    ranks = [line.split() for line in search.stdout.strip().splitlines()[1:]]
    assert [r[0] for r in ranks] == ["1", "2", "3"]
    assert ranks[0][2].endswith("corpus/face.png") and float(ranks[0][1]) > 0.999, search.stdout
    query_vector = demo.encode([normalize_sketch(str(query))])[0]
    for _rank, score, path in ranks:  # every printed score is the true cosine of that row
        assert float(score) == pytest.approx(float(vectors[paths.index(path)] @ query_vector), abs=1e-4)
    for kind in ("house", "zigzag"):  # the same through the API for the other drawings
        hits = top_k(out, demo.encode([normalize_sketch(str(sketches / "inverted" / f"{kind}.png"))])[0], k=1)
        assert hits[0][1].endswith(f"corpus/{kind}.png") and hits[0][0] > 0.999


# ------------------------------------------------------------------------------------ search


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory, demo, photos) -> tuple[Path, list[str], np.ndarray]:
    """Photos and crops of them, embedded in chunks of 3 rows (several part files)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, photo in photos.items():
        for i, crop in enumerate((photo, photo[: photo.shape[0] // 2], photo[:, photo.shape[1] // 3 :])):
            paths.append(str(folder / f"{name}-{i}.png"))
            Image.fromarray(np.ascontiguousarray(crop)).save(paths[-1])
    out = folder / "emb"
    embed_paths(demo, paths, out, chunk_size=3, batch_size=2, progress=False)
    assert len(list(out.glob("part-*.parquet"))) >= 3
    table = read_embeddings(out)
    order = [table.column("path").to_pylist().index(p) for p in paths]
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[order]
    return out, paths, vectors


def test_search_ranks_every_row_like_brute_force(demo, photo_dataset, photos):
    out, paths, vectors = photo_dataset
    query = demo.encode([photos["coffee"][::2, ::2]])[0]  # a resized photo: not in the corpus as is
    scores = vectors @ query
    expected = sorted(zip(scores.tolist(), paths), reverse=True)
    hits = top_k(out, query, k=len(paths), model_checksum=demo.checksum)
    assert [p for _, p in hits] == [p for _, p in expected]
    np.testing.assert_allclose([s for s, _ in hits], [s for s, _ in expected], atol=1e-6)
    for k in (1, 4, 7):  # a smaller k is exactly the prefix, across chunk boundaries
        assert top_k(out, query, k=k) == hits[:k]
    scaled = top_k(out, query * 3.0, k=5)  # the query's norm does not matter
    assert [p for _, p in scaled] == [p for _, p in hits[:5]]
    np.testing.assert_allclose([s for s, _ in scaled], [s for s, _ in hits[:5]], atol=1e-6)
    assert hits[0][1].endswith("coffee-0.png")


def test_search_refuses_other_dimensions_and_warns_on_another_model(demo, photo_dataset, caplog):
    out, _, vectors = photo_dataset
    with pytest.raises(ArrowVisionError, match=f"dim {vectors.shape[1]}.*query has {vectors.shape[1] + 1}"):
        top_k(out, np.ones(vectors.shape[1] + 1, np.float32))
    with caplog.at_level(logging.WARNING, logger="arrowvision"):
        top_k(out, vectors[0], model_checksum=demo.checksum)
        assert not caplog.records
        top_k(out, vectors[0], model_checksum="sha256:" + "0" * 64)
    assert len(caplog.records) == 1 and "not comparable" in caplog.records[0].getMessage()


def test_search_command_with_another_models_query_dimension_fails_cleanly(tmp_path, photo_dataset, tiny_siglip_parquet):
    out, paths, _ = photo_dataset  # 128-dim demo embeddings; the tiny model gives 64-dim queries
    run = cli("search", str(out), paths[0], "--weights", str(tiny_siglip_parquet), "--backend", "torch")
    assert run.returncode == 1 and run.stderr.count("error:") == 1 and "Traceback" not in run.stderr, run.stderr
    error = run.stderr[run.stderr.index("error:"):].splitlines()[0]  # after the "another model" warning
    assert "embeddings have dim 128, the query has 64" in error, run.stderr


# ------------------------------------------------------------------------------------ export


def test_export_force_rebuilds_the_cached_ir(tmp_path):
    env = {"ARROWVISION_CACHE": str(tmp_path / "cache")}
    first = cli("export", str(DEMO), env=env)
    assert first.returncode == 0, first.stderr
    xml = Path(re.search(r"IR: (\S+model\.xml)", first.stdout).group(1))
    meta = xml.parent / "meta.json"
    stamp = (meta.stat().st_ino, meta.stat().st_mtime_ns)
    again = cli("export", str(DEMO), env=env)
    assert again.returncode == 0 and (meta.stat().st_ino, meta.stat().st_mtime_ns) == stamp  # cached: not rebuilt
    forced = cli("export", str(DEMO), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert str(xml) in forced.stdout and (meta.stat().st_ino, meta.stat().st_mtime_ns) != stamp  # rebuilt in place
    assert [p for p in xml.parent.parent.iterdir() if p.is_dir()] == [xml.parent]  # no staging leftovers


# ------------------------------------------------------------------------- weights vs config


def test_weights_that_do_not_fit_their_config_fail_cleanly_on_the_command_line(tmp_path, tiny_siglip_parquet):
    from .test_model import rewrite_weights

    config = WeightLoader(tiny_siglip_parquet).config
    wrong_mlp = rewrite_weights(tiny_siglip_parquet, tmp_path / "mlp.parquet", {**config, "intermediate_size": 256})
    run = cli("embed", str(SAMPLES[0]), "-o", str(tmp_path / "o"), "--weights", str(wrong_mlp), "--backend", "torch")
    assert run.returncode == 1 and run.stderr.startswith("error:") and "Traceback" not in run.stderr


# -------------------------------------------------------------------------------------- demo


def test_demo_command_embeds_the_bundled_photos(demo):
    run = cli("demo", "--backend", "torch")
    assert run.returncode == 0, run.stderr
    assert f"weights checksum {demo.checksum}" in run.stdout
    assert f"{len(SAMPLES)} images embedded" in run.stdout and f"dim {demo.embedding_dim}" in run.stdout
    header = run.stdout.split("cosine similarity (L2-normalized embeddings)\n")[1].splitlines()
    rows = [line.split() for line in header[1 : 1 + len(SAMPLES)]]
    assert [r[0] for r in rows] == [p.stem[:10] for p in SAMPLES]
    matrix = np.array([[float(v) for v in r[1:]] for r in rows])
    embeddings = demo.encode(SAMPLES)
    np.testing.assert_allclose(matrix, embeddings @ embeddings.T, atol=1e-3)  # printed with 3 decimals
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-3)
    first = re.search(r"first 8 values: \[([^\]]+)\]", run.stdout).group(1).split()
    np.testing.assert_allclose([float(v) for v in first], embeddings[0, :8], atol=1e-4)
