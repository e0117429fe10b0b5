"""Incremental updates of the vector index: delta segments beside an untouched main index, folding
them in (past the threshold or on `index --merge`), crash safety, corrupt segments refused, a
format-1 index still served, and a reopen that keeps the main index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from arrowvision.cli import main
from arrowvision.errors import IndexCorrupt
from arrowvision.search import index as vindex
from arrowvision.search import store
from .test_index import clustered, write_parts

ROWS, DIM = 3000, 32


@pytest.fixture
def ivfpq(tmp_path) -> tuple[Path, np.ndarray]:
    vectors = clustered(ROWS, dim=DIM, clusters=30)
    write_parts(tmp_path / "ds", vectors, chunk=1000)
    assert vindex.build(tmp_path / "ds", exact_below=1000).kind == "ivfpq"
    return tmp_path / "ds", vectors


def file_ids(dataset: Path, meta: dict) -> dict[str, tuple[int, int]]:
    folder = vindex.index_folder(dataset)
    return {name: (os.stat(folder / name).st_ino, os.stat(folder / name).st_mtime_ns)
            for name in (meta["vectors_file"], meta["paths_file"], meta["refine_file"])}


def finds_itself(index: vindex.VectorIndex, vector: np.ndarray, row: int, atol: float) -> bool:
    score, path = index.search(vector, k=1)[0]
    return path == f"/corpus/img-{row:06d}.jpg" and abs(score - 1.0) <= atol


def test_a_delta_update_leaves_the_main_index_alone_and_finds_the_new_rows(ivfpq):
    dataset, vectors = ivfpq
    before = vindex.read_meta(dataset)
    main_files = file_ids(dataset, before)
    more = clustered(300, dim=DIM, clusters=30, seed=5)
    write_parts(dataset, more[:200], chunk=100, start=ROWS)  # two `embed` runs: two segments
    first = vindex.update(dataset)
    write_parts(dataset, more[200:], chunk=100, start=ROWS + 200)
    second = vindex.update(dataset)
    assert (first.action, first.added_rows, second.action, second.rows) == ("updated", 200, "updated", ROWS + 300)
    meta = vindex.read_meta(dataset)
    assert [s["rows"] for s in meta["delta"]] == [200, 100] and meta["rows"] == ROWS
    assert file_ids(dataset, meta) == main_files  # the main generation was neither rewritten nor replaced
    for mmap in (True, False):
        index = vindex.VectorIndex.open(dataset, mmap=mmap)
        assert index.rows == ROWS + 300 and not index.is_stale()
        assert finds_itself(index, more[250], ROWS + 250, atol=1e-5)  # delta rows: float32, exact
        assert finds_itself(index, vectors[17], 17, atol=2e-5)  # main rows: re-ranked from float16
        hits = index.search(more[251], k=20)  # its neighbours: main rows and delta rows, ranked together
        rows = [int(p[-10:-4]) for _, p in hits]
        exact = np.concatenate([vectors, more]) @ more[251]
        np.testing.assert_allclose([s for s, _ in hits], exact[rows], atol=1e-4)  # float16 rows at 32 dims
        assert len(set(rows) & set(np.argsort(-exact)[:20].tolist())) >= 18
        assert min(rows) < ROWS <= max(rows)


def test_the_delta_is_folded_in_past_the_threshold_and_on_merge(ivfpq, capsys):
    dataset, vectors = ivfpq
    more = clustered(250, dim=DIM, clusters=30, seed=6)
    write_parts(dataset, more[:100], chunk=100, start=ROWS)
    assert vindex.update(dataset, delta_max_rows=150).action == "updated"
    old = vindex.read_meta(dataset)
    write_parts(dataset, more[100:], chunk=150, start=ROWS + 100)
    info = vindex.update(dataset, delta_max_rows=150)  # 100 + 150 > 150: everything into a new main generation
    assert (info.action, info.rows, info.details["delta_rows"]) == ("merged", ROWS + 250, 0)
    meta = vindex.read_meta(dataset)
    assert meta["delta"] == [] and meta["rows"] == ROWS + 250 and meta["generation"] == old["generation"] + 1
    files = {p.name for p in vindex.index_folder(dataset).iterdir()}
    assert files == {".lock", "meta.json", meta["vectors_file"], meta["paths_file"], meta["refine_file"]}
    index = vindex.VectorIndex.open(dataset)
    assert index.main_rows == ROWS + 250 and index.meta["nlist"] == old["nlist"]  # the trained lists kept
    for row, vector in ((5, vectors[5]), (ROWS + 40, more[40]), (ROWS + 240, more[240])):
        assert finds_itself(index, vector, row, atol=2e-5)
    write_parts(dataset, clustered(30, dim=DIM, seed=7), chunk=30, start=ROWS + 250)
    assert main(["index", str(dataset), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "updated"
    assert main(["index", str(dataset), "--merge", "--no-progress"]) == 0
    assert f"{ROWS + 280} rows, IVF-PQ" in capsys.readouterr().out
    assert vindex.read_meta(dataset)["delta"] == [] and vindex.VectorIndex.open(dataset).main_rows == ROWS + 280
    assert vindex.update(dataset, merge=True).action == "unchanged"  # nothing to fold


def test_a_crash_while_adding_or_folding_leaves_the_previous_index(ivfpq, monkeypatch):
    dataset, _ = ivfpq
    write_parts(dataset, clustered(50, dim=DIM, seed=8), chunk=50, start=ROWS)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_paths", crash)  # the segment's vectors written, its paths not, meta untouched
    with pytest.raises(OSError):
        vindex.update(dataset)
    monkeypatch.undo()
    index = vindex.VectorIndex.open(dataset)
    assert index.rows == ROWS and index.is_stale()
    assert vindex.update(dataset).action == "updated"
    folder = vindex.index_folder(dataset)
    meta = vindex.read_meta(dataset)
    assert {p.name for p in folder.iterdir()} == {".lock", "meta.json"} | store.referenced_files(meta)  # no orphan
    write_parts(dataset, clustered(50, dim=DIM, seed=9), chunk=50, start=ROWS + 50)
    monkeypatch.setattr(faiss, "write_index", crash)  # the fold's refine matrix written, the FAISS index not
    with pytest.raises(OSError):
        vindex.update(dataset, merge=True)
    monkeypatch.undo()
    assert vindex.read_meta(dataset) == meta and vindex.VectorIndex.open(dataset).rows == ROWS + 50
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert vindex.update(dataset, merge=True).rows == ROWS + 100
    assert {p.name for p in folder.iterdir()} == {".lock", "meta.json"} | store.referenced_files(vindex.read_meta(dataset))


def test_corrupt_or_foreign_delta_segments_are_refused(ivfpq):
    dataset, _ = ivfpq
    write_parts(dataset, clustered(20, dim=DIM, seed=10), chunk=20, start=ROWS)
    vindex.update(dataset)
    meta_file = vindex.index_folder(dataset) / "meta.json"
    meta = json.loads(meta_file.read_text())
    segment = meta["delta"][0]
    meta_file.write_text(json.dumps({**meta, "delta": [{**segment, "paths_file": "../../etc/passwd"}]}))
    with pytest.raises(IndexCorrupt, match="bad paths_file"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text(json.dumps({**meta, "delta": [{**segment, "rows": 21}]}))
    with pytest.raises(IndexCorrupt, match=r"delta segment .* meta says 21 x 32.*--rebuild"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text(json.dumps({**meta, "delta": "nonsense"}))
    with pytest.raises(IndexCorrupt, match="bad delta"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text(json.dumps(meta))
    (vindex.index_folder(dataset) / segment["vectors_file"]).write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(IndexCorrupt, match="cannot read the delta segment"):
        vindex.VectorIndex.open(dataset)
    (vindex.index_folder(dataset) / meta["refine_file"]).unlink()
    with pytest.raises(IndexCorrupt, match="cannot read the index"):
        vindex.VectorIndex.open(dataset)
    meta_file.write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(IndexCorrupt, match="index format 3, this version reads 1, 2; rebuild"):
        vindex.VectorIndex.open(dataset)
    assert vindex.build(dataset).rows == ROWS + 20  # --rebuild: whole again


def test_merging_into_a_damaged_main_index_is_refused(ivfpq):
    dataset, _ = ivfpq
    write_parts(dataset, clustered(20, dim=DIM, seed=13), chunk=20, start=ROWS)
    vindex.update(dataset)
    meta = vindex.read_meta(dataset)
    (vindex.index_folder(dataset) / meta["vectors_file"]).write_bytes(b"IwPf truncated")
    with pytest.raises(IndexCorrupt, match="cannot read the main index to merge into.*--rebuild"):
        vindex.update(dataset, merge=True)
    assert vindex.read_meta(dataset) == meta
    assert vindex.update(dataset).action == "unchanged" and vindex.build(dataset).rows == ROWS + 20


def write_format_1_index(dataset: Path, vectors: np.ndarray, paths: list[str]) -> None:
    """An index as versions before delta segments wrote it: a float16 IVF, no refine file, format 1."""
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, 20, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    folder = vindex.index_folder(dataset)
    folder.mkdir()
    faiss.write_index(index, str(folder / "vectors-000000.faiss"))
    store.write_paths(folder / "paths-000000.parquet", paths)
    parts = [vindex.part_record(p) for p in sorted(dataset.glob("part-*.parquet"))]
    (folder / "meta.json").write_text(json.dumps({
        "format_version": 1, "library": "faiss", "kind": "ivf", "rows": len(paths), "duplicate_rows": 0, "dim": DIM,
        "model_checksum": "sha256:" + "ab" * 32, "family": "siglip", "sketch": False, "parts": parts, "generation": 0,
        "nlist": 20, "nprobe": 20, "trained_rows": len(paths), "vectors": "float16", "exact_below": 1000,
        "nprobe_given": None, "vectors_file": "vectors-000000.faiss", "paths_file": "paths-000000.parquet"}))


def test_a_format_1_index_still_opens_takes_a_delta_and_merges(tmp_path):
    dataset = tmp_path / "ds"
    vectors = clustered(1500, dim=DIM, clusters=20)
    paths = write_parts(dataset, vectors, chunk=500)
    write_format_1_index(dataset, vectors, paths)
    for mmap in (True, False):
        index = vindex.VectorIndex.open(dataset, mmap=mmap)
        assert index.kind == "ivf" and finds_itself(index, vectors[3], 3, atol=1e-5)
    more = clustered(40, dim=DIM, seed=11)
    write_parts(dataset, more, chunk=40, start=1500)
    assert vindex.update(dataset).action == "updated"
    meta = vindex.read_meta(dataset)
    assert (meta["format_version"], meta["kind"], meta["vectors_file"]) == (2, "ivf", "vectors-000000.faiss")
    assert finds_itself(vindex.VectorIndex.open(dataset), more[7], 1507, atol=1e-5)
    assert vindex.update(dataset, merge=True).action == "merged"
    index = vindex.VectorIndex.open(dataset)
    assert (index.kind, index.main_rows) == ("ivf", 1540) and finds_itself(index, more[7], 1507, atol=1e-3)


def test_a_reopen_after_a_delta_update_keeps_the_main_index_in_memory(ivfpq):
    dataset, _ = ivfpq
    served = vindex.VectorIndex.open(dataset, mmap=False)
    more = clustered(10, dim=DIM, seed=12)
    write_parts(dataset, more, chunk=10, start=ROWS)
    vindex.update(dataset)
    reopened = vindex.VectorIndex.open(dataset, mmap=False, reuse=served)
    assert reopened.index is served.index and reopened.refine is served.refine and reopened.rows == ROWS + 10
    assert finds_itself(reopened, more[4], ROWS + 4, atol=1e-5)
    vindex.update(dataset, merge=True)
    merged = vindex.VectorIndex.open(dataset, mmap=False, reuse=reopened)
    assert merged.index is not served.index and merged.main_rows == ROWS + 10 and merged.delta.ntotal == 0
