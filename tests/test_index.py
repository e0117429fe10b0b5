"""The FAISS vector index: exact = the scan, IVF recall, incremental updates, atomic writes,
refusing another model's index, and the CLI (`index`, indexed `search`, `embed` keeping it current)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from arrowvision.cli import main
from arrowvision.search import index as vindex
from arrowvision.errors import (
    ArrowVisionError,
    IndexCorrupt,
    IndexMismatch,
    SearchIndexError,
)
from arrowvision.datasets.pipeline import EmbeddingWriter, _Item
from arrowvision.search.scan import top_k

SAMPLES = Path(__file__).resolve().parents[1] / "arrowvision" / "samples"
DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
CHECKSUM = "sha256:" + "ab" * 32


def clustered(rows: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centers[rng.integers(0, clusters, rows)] + 0.4 * rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write_parts(folder: Path, vectors: np.ndarray, chunk: int, start: int = 0, checksum: str = CHECKSUM) -> list[str]:
    """Rows written the way `embed` writes them (chunked part files), with made-up paths."""
    paths = [f"/corpus/img-{start + i:06d}.jpg" for i in range(len(vectors))]
    with EmbeddingWriter(folder, vectors.shape[1], {"model_checksum": checksum, "family": "siglip",
                                                    "dim": str(vectors.shape[1]), "sketch": "false", "normalized": "true"}) as writer:
        for s in range(0, len(vectors), chunk):
            items = [_Item(p, None, 1, 1, "x", embedding=v) for p, v in zip(paths[s:s + chunk], vectors[s:s + chunk])]
            writer.write(items, [], relpath=lambda p: p)
    return paths


@pytest.fixture
def small(tmp_path) -> tuple[Path, np.ndarray]:
    vectors = clustered(300)
    write_parts(tmp_path / "ds", vectors, chunk=70)
    return tmp_path / "ds", vectors


def test_exact_index_equals_the_scan(small):
    dataset, vectors = small
    info = vindex.build(dataset)
    assert (info.kind, info.rows, info.action) == ("exact", 300, "built")
    index = vindex.VectorIndex.open(dataset, model_checksum=CHECKSUM)
    queries = clustered(5, seed=7)
    for query in queries:
        expected = top_k(dataset, query, k=20)
        hits = index.search(query * 2.5, k=20)  # the query's norm does not matter
        assert [p for _, p in hits] == [p for _, p in expected]
        np.testing.assert_allclose([s for s, _ in hits], [s for s, _ in expected], atol=1e-5)
    assert index.search(vectors[42], k=1) == [(pytest.approx(1.0, abs=1e-5), "/corpus/img-000042.jpg")]  # itself (AVX-512 kernels: 0.99999994)
    assert "/corpus/img-000042.jpg" in index and "/corpus/../corpus/img-000042.jpg" not in index


def test_ivf_index_recall_and_full_probe_equals_exact(tmp_path):
    vectors = clustered(4000, dim=32, clusters=40)
    write_parts(tmp_path / "ds", vectors, chunk=1000)
    info = vindex.build(tmp_path / "ds", exact_below=1000)
    assert info.kind == "ivfpq" and info.details["nlist"] == vindex.ivf_lists(4000)
    index = vindex.VectorIndex.open(tmp_path / "ds")
    queries = clustered(40, dim=32, clusters=40, seed=0)[:40] + 0.05  # near the corpus, not in it
    exact = vectors @ (queries / np.linalg.norm(queries, axis=1, keepdims=True)).T
    truth = [set(np.argsort(-exact[:, q])[:10]) for q in range(len(queries))]
    found = [{int(p[-10:-4]) for _, p in hits} for hits in index.search_many(queries, k=10)]
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.9, recall
    everything = index.search_many(queries, k=10, nprobe=info.details["nlist"])  # every list probed: the PQ's
    found = [{int(p[-10:-4]) for _, p in hits} for hits in everything]  # best candidates, re-ranked exactly
    assert np.mean([len(f & t) / 10 for f, t in zip(found, truth)]) >= 0.97  # (4-bit codes of 4 dims: coarse)
    for q, hits in enumerate(everything):  # scores from float16 rows: the float32 cosine within 2e-4 (32 dims)
        np.testing.assert_allclose([s for s, _ in hits], [exact[int(p[-10:-4]), q] for _, p in hits], atol=2e-4)
        assert [s for s, _ in hits] == sorted((s for s, _ in hits), reverse=True)


def test_incremental_update_adds_new_chunks_only(small):
    dataset, _ = small
    vindex.build(dataset)
    before = vindex.read_meta(dataset)
    more = clustered(50, seed=3)
    write_parts(dataset, more, chunk=25, start=300)  # what a second `embed` run does: new part files
    assert vindex.VectorIndex.open(dataset).is_stale()
    info = vindex.update(dataset)
    assert (info.action, info.added_rows, info.rows) == ("updated", 50, 350)
    meta = vindex.read_meta(dataset)
    assert meta["generation"] == before["generation"] + 1 and len(meta["parts"]) == len(before["parts"]) + 2
    assert [s["rows"] for s in meta["delta"]] == [50] and meta["vectors_file"] == before["vectors_file"]  # main kept
    files = sorted(p.name for p in vindex.index_folder(dataset).iterdir())
    assert files == sorted([".lock", "meta.json", meta["vectors_file"], meta["paths_file"],
                            meta["delta"][0]["vectors_file"], meta["delta"][0]["paths_file"]])
    updated = vindex.VectorIndex.open(dataset)
    assert not updated.is_stale() and updated.search(more[10], k=1)[0][1] == "/corpus/img-000310.jpg"
    assert vindex.update(dataset).action == "unchanged"
    query = clustered(1, seed=9)[0]
    assert [p for _, p in updated.search(query, 15)] == [p for _, p in top_k(dataset, query, 15)]


def test_update_rebuilds_when_a_part_changed_or_the_threshold_is_crossed(small):
    dataset, _ = small
    vindex.build(dataset, exact_below=400)
    write_parts(dataset, clustered(150, seed=4), chunk=150, start=300)  # 450 rows: crosses 400
    info = vindex.update(dataset)
    assert (info.action, info.kind, info.rows) == ("built", "ivfpq", 450)
    first = min(dataset.glob("part-*.parquet"))
    first.unlink()  # a part the index holds is gone: rebuilt from what is there
    info = vindex.update(dataset)
    assert info.action == "built" and info.rows == 450 - 70


def test_a_failed_write_leaves_the_previous_index_whole(small, monkeypatch):
    dataset, _ = small
    vindex.build(dataset)
    write_parts(dataset, clustered(10, seed=5), chunk=10, start=300)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", crash)  # vectors written, paths fail, meta never replaced
    with pytest.raises(OSError):
        vindex.update(dataset)
    monkeypatch.undo()
    index = vindex.VectorIndex.open(dataset)
    assert index.rows == 300 and index.is_stale()
    assert not [p for p in vindex.index_folder(dataset).iterdir() if p.name.endswith(".tmp")]
    assert vindex.update(dataset).rows == 310


def test_another_models_index_and_a_corrupt_one_are_refused(small):
    dataset, _ = small
    vindex.build(dataset)
    with pytest.raises(IndexMismatch, match=r"model sha256:abababababab.*not of the model given \(sha256:000000000000"):
        vindex.VectorIndex.open(dataset, model_checksum="sha256:" + "0" * 64)
    with pytest.raises(IndexMismatch, match="sketch"):
        vindex.VectorIndex.open(dataset, sketch=True)
    meta_file = vindex.index_folder(dataset) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "vectors_file": "../../etc/passwd"}))
    with pytest.raises(IndexCorrupt, match="bad vectors_file"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text("{not json")
    with pytest.raises(IndexCorrupt, match="unreadable.*--rebuild"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text(json.dumps({**meta, "rows": 5}))
    with pytest.raises(IndexCorrupt, match="meta says 5"):
        vindex.VectorIndex.open(dataset)
    shutil.rmtree(vindex.index_folder(dataset))
    with pytest.raises(SearchIndexError, match="no index; build one"):
        vindex.VectorIndex.open(dataset)


def test_the_sketch_flag_is_a_json_bool_and_the_old_string_form_still_reads(small):
    dataset, _ = small
    vindex.build(dataset)
    meta_file = vindex.index_folder(dataset) / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["sketch"] is False
    meta_file.write_text(json.dumps({**meta, "sketch": "false"}))  # as indexes before this version stored it
    assert vindex.VectorIndex.open(dataset, sketch=False).rows == 300
    with pytest.raises(IndexMismatch, match="embedded with sketch=false, the query uses sketch=true"):
        vindex.VectorIndex.open(dataset, sketch=True)
    meta_file.write_text(json.dumps({**meta, "sketch": "true"}))
    assert vindex.VectorIndex.open(dataset, sketch=True).rows == 300


def test_query_checks(small):
    dataset, _ = small
    vindex.build(dataset)
    index = vindex.VectorIndex.open(dataset)
    with pytest.raises(ArrowVisionError, match="dim 32, the query has 33"):
        index.search(np.ones(33, np.float32))
    with pytest.raises(ArrowVisionError, match="NaN"):
        index.search(np.full(32, np.nan, np.float32))
    with pytest.raises(ArrowVisionError, match="k must be >= 1"):
        index.search(np.ones(32, np.float32), k=0)
    assert len(index.search(np.ones(32, np.float32), k=1000)) == 300  # k above the corpus: all of it


def test_duplicate_paths_are_answered_once_with_the_best_score(tmp_path):
    vectors = clustered(40, seed=2)
    write_parts(tmp_path / "ds", vectors, chunk=40)
    write_parts(tmp_path / "ds", vectors[:5] * 0.5 + vectors[5:10] * 0.5, chunk=5)  # img-000000..4 again, other vectors
    vindex.build(tmp_path / "ds")
    index = vindex.VectorIndex.open(tmp_path / "ds")
    assert index.meta["duplicate_rows"] == 5
    for query in vectors[:5]:
        hits = index.search(query, k=10)
        assert len({p for _, p in hits}) == 10
        assert [p for _, p in hits] == [p for _, p in top_k(tmp_path / "ds", query, 10)]


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("horse", "coffee", "chelsea", "rocket"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


def test_index_command_search_uses_it_and_embed_keeps_it_current(tmp_path, photo_set, capsys):
    out = tmp_path / "emb"
    base = ["--weights", str(DEMO), "--backend", "torch", "--no-progress"]
    assert main(["embed", str(photo_set), "-o", str(out), "--chunk-size", "2", *base]) == 0
    assert main(["index", str(out), "--no-progress"]) == 0
    assert "4 rows, exact (faiss IndexFlatIP): built" in capsys.readouterr().out
    assert main(["index", str(out), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "unchanged"
    query = str(photo_set / "coffee.jpg")
    assert main(["search", str(out), query, "-k", "4", "--json", *base]) == 0
    indexed = json.loads(capsys.readouterr().out)["results"]
    assert main(["search", str(out), query, "-k", "4", "--json", "--no-index", *base]) == 0
    scanned = json.loads(capsys.readouterr().out)["results"]
    assert [h["path"] for h in indexed] == [h["path"] for h in scanned] and indexed[0]["path"] == query
    np.testing.assert_allclose([h["score"] for h in indexed], [h["score"] for h in scanned], atol=1e-5)
    shutil.copy(SAMPLES / "camera.jpg", photo_set / "camera.jpg")  # embed adds a chunk: the index follows
    try:
        assert main(["embed", str(photo_set), "-o", str(out), *base]) == 0
        assert "index updated: 5 rows (exact)" in capsys.readouterr().err
        assert vindex.VectorIndex.open(out).rows == 5
        assert main(["search", str(out), str(photo_set / "camera.jpg"), "-k", "1", "--json", *base]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0]["path"] == str(photo_set / "camera.jpg")
    finally:
        (photo_set / "camera.jpg").unlink()
    assert main(["index", str(out), "--exact-below", "2", "--json", "--no-progress"]) == 0  # an option: a rebuild
    report = json.loads(capsys.readouterr().out)
    assert (report["action"], report["kind"], report["nlist"]) == ("built", "ivfpq", 1)
    assert main(["search", str(out), query, "-k", "4", "--json", *base]) == 0  # PQ candidates, exact scores
    hits = json.loads(capsys.readouterr().out)["results"]
    assert [h["path"] for h in hits] == [h["path"] for h in scanned]
    np.testing.assert_allclose([h["score"] for h in hits], [h["score"] for h in scanned], atol=2e-5)


def test_index_command_errors(tmp_path, capsys):
    assert main(["index", str(tmp_path / "nothing")]) == 1
    assert "no embeddings (part-*.parquet) found" in capsys.readouterr().err
    write_parts(tmp_path / "ds", clustered(10), chunk=10)
    (tmp_path / "ds" / vindex.INDEX_DIR).mkdir()
    (tmp_path / "ds" / vindex.INDEX_DIR / "meta.json").write_text("[]")
    assert main(["index", str(tmp_path / "ds")]) == 1
    assert "not an arrowvision index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "ds"), "--rebuild", "--no-progress"]) == 0
