"""``arrowvision embed TABLE --column C``: a Parquet table's image column into the resumable dataset."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowvision.cli import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from arrowvision.datasets.pipeline import read_embeddings

from .arrowkit import HF_IMAGE, assert_rows_match
from .arrowkit import expected, fresh_models, images, shard, weights  # noqa: F401 (fixtures)
from .raykit import ray_cluster  # noqa: F401 (fixture)


def embed(*args: str) -> int:
    return main(["embed", *map(str, args), "--backend", "torch", "--batch-size", "4", "--no-progress"])


def errors_of(folder) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((folder / "_errors").glob("*.parquet")))


def test_column_of_bytes_by_row_number_then_resume(weights, shard, expected, images, tmp_path, capsys):
    n = len(images)
    out = tmp_path / "out"
    assert embed(shard, "--column", "img", "-o", out, "--weights", weights, "--chunk-size", "4") == EXIT_PARTIAL
    table = read_embeddings(out)
    assert sorted(table.column("path").to_pylist()) == sorted(f"{shard}#{i}" for i in range(n))
    assert table.column("relpath").to_pylist()[0] == "shard.parquet#0"
    order = np.argsort([int(p.rsplit("#", 1)[1]) for p in table.column("path").to_pylist()])
    assert_rows_match(table.column("embedding").take(pa.array(order)), expected, list(range(n)))
    assert min(table.column("width").to_pylist()) > 0 and len(table.column("sha256")[0].as_py()) == 64
    failed = errors_of(out).to_pydict()
    assert sorted(failed["path"]) == [f"{shard}#{n}", f"{shard}#{n + 1}"]
    assert any("null" in e for e in failed["error"]) and any("corrupt" in e for e in failed["error"])
    assert f"{n + 2} inputs: {n} embedded, 0 already done, 2 failed" in capsys.readouterr().out
    assert embed(shard, "--column", "img", "-o", out, "--weights", weights) == EXIT_PARTIAL  # resume
    assert f"{n} already done, 2 failed" in capsys.readouterr().out
    assert read_embeddings(out).num_rows == n  # nothing written twice


def test_id_column_keep_columns_hf_struct_and_folder_input(weights, shard, expected, images, tmp_path, capsys):
    folder = tmp_path / "table"
    (folder / "nested").mkdir(parents=True)
    (folder / "_skipped").mkdir()
    shutil.copy(shard, folder / "nested" / "a.parquet")
    pq.write_table(pa.table({"x": [1]}), folder / "_skipped" / "not-a-shard.parquet")
    out = tmp_path / "out"
    code = embed(folder, "--column", "image", "--id-column", "id", "--keep-columns", "caption", "-o", out, "--weights", weights)
    assert code == EXIT_PARTIAL
    table = read_embeddings(out).sort_by("id")
    assert table.column("id").type == pa.int64() and table.column("id").to_pylist() == list(range(len(images)))
    assert table.column("path").to_pylist() == [str(i) for i in range(len(images))]
    assert table.column("caption").to_pylist()[1] == "photo 1"
    assert_rows_match(table.column("embedding").combine_chunks(), expected, list(range(len(images))))
    capsys.readouterr()
    glob = str(folder / "n*" / "*.parquet")
    assert embed(glob, "--column", "image", "--id-column", "id", "--keep-columns", "caption", "-o", out,
                 "--weights", weights, "--skip-failed") == EXIT_PARTIAL
    assert f"{len(images)} already done, 2 failed" in capsys.readouterr().out


def test_duplicate_and_null_ids_are_error_rows(weights, images, expected, tmp_path):
    table = pa.table({"key": pa.array(["a", "b", "a", None]), "img": pa.array(images[:4], pa.large_binary())})
    pq.write_table(table, tmp_path / "t.parquet")
    assert embed(tmp_path / "t.parquet", "--column", "img", "--id-column", "key", "-o", tmp_path / "out",
                 "--weights", weights) == EXIT_PARTIAL
    assert sorted(read_embeddings(tmp_path / "out").column("path").to_pylist()) == ["a", "b"]
    reasons = " ".join(errors_of(tmp_path / "out").column("error").to_pylist())
    assert "repeats" in reasons and "null 'key'" in reasons


def test_paths_column_and_clear_errors(weights, images, expected, tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(images[5])
    pq.write_table(pa.table({"file": [str(tmp_path / "x.jpg")], "path": ["p"]}), tmp_path / "p.parquet")
    assert embed(tmp_path / "p.parquet", "--column", "file", "-o", tmp_path / "out", "--weights", weights) == EXIT_OK
    assert_rows_match(read_embeddings(tmp_path / "out").column("embedding").combine_chunks(), expected, [5])
    assert embed(tmp_path / "p.parquet", "--column", "nope", "-o", tmp_path / "o2", "--weights", weights) == EXIT_ERROR
    assert "no column 'nope' (it has: file, path)" in capsys.readouterr().err
    assert embed(tmp_path / "p.parquet", "--column", "file", "--keep-columns", "path", "-o", tmp_path / "o3",
                 "--weights", weights) == EXIT_ERROR
    assert "its own 'path' column" in capsys.readouterr().err
    assert embed(tmp_path / "missing.parquet", "--column", "file", "-o", tmp_path / "o4", "--weights", weights) == EXIT_ERROR
    with pytest.raises(SystemExit) as usage:
        embed(tmp_path / "p.parquet", "--id-column", "path", "-o", tmp_path / "o5", "--weights", weights)
    assert usage.value.code == EXIT_USAGE
    with pytest.raises(SystemExit):
        embed(tmp_path / "p.parquet", "--column", "file", "--sketch", "-o", tmp_path / "o6", "--weights", weights)


@pytest.mark.ray
def test_ray_engine_same_dataset_and_resume_by_the_local_engine(ray_cluster, weights, shard, expected, images, tmp_path, capsys):
    n = len(images)
    out = tmp_path / "out"
    with pytest.raises(SystemExit):  # row numbers are not stable on Ray
        embed(shard, "--column", "img", "--engine", "ray", "-o", out, "--weights", weights)
    code = embed(shard, "--column", "img", "--id-column", "id", "--keep-columns", "caption", "--engine", "ray",
                 "--actors", "1", "-o", out, "--weights", weights)
    assert code == EXIT_PARTIAL
    table = read_embeddings(out).sort_by("id")
    assert table.column("id").to_pylist() == list(range(n)) and table.column("caption")[0].as_py() == "photo 0"
    assert_rows_match(table.column("embedding").combine_chunks(), expected, list(range(n)))
    failed = errors_of(out).to_pydict()
    assert sorted(failed["path"]) == [str(n), str(n + 1)] and "null" in " ".join(failed["error"])
    capsys.readouterr()
    assert embed(shard, "--column", "img", "--id-column", "id", "--keep-columns", "caption", "-o", out,
                 "--weights", weights) == EXIT_PARTIAL  # the local engine resumes it
    assert f"{n} already done, 2 failed" in capsys.readouterr().out
