"""The engine adapters, each inside its real engine: DuckDB, polars, pyarrow compute.

Every adapter must give, row for row, what ``encode()`` gives (cosine >= 0.99999), null for nulls
and undecodable rows, over binary, large_binary, sliced, chunked and Hugging Face struct columns."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from arrowvision.errors import ArrowVisionError, ImageError

from .arrowkit import CORRUPT, HF_IMAGE, assert_rows_match
from .arrowkit import expected, fresh_models, images, shard, weights  # noqa: F401 (fixtures)

# ----------------------------------------------------------------------------- DuckDB


@pytest.fixture(scope="module")
def con(weights):
    duckdb = pytest.importorskip("duckdb")
    import arrowvision.duckdb

    connection = duckdb.connect()
    names = arrowvision.duckdb.register(connection, weights, backend="torch", batch_size=4)
    assert names == ["embed_image", "embed_image_path", "embed_text"]
    return connection


def duck_table(con, sql: str) -> pa.Table:
    relation = con.sql(sql)
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.fetch_arrow_table()


def duck_column(con, sql: str) -> pa.Array:
    return duck_table(con, sql).column(0).combine_chunks()


def test_duckdb_query_with_where_and_limit_over_parquet(con, shard, expected, images):
    rows = duck_table(con, f"SELECT id, embed_image(img) AS e FROM '{shard}' WHERE id % 2 = 1 ORDER BY id LIMIT 2")
    assert rows.column("id").to_pylist() == [1, 3]
    assert str(con.sql(f"SELECT embed_image(img) FROM '{shard}' LIMIT 1").types[0]) == f"FLOAT[{expected.shape[1]}]"
    assert_rows_match(rows.column("e").combine_chunks(), expected, [1, 3])


def test_duckdb_nulls_corrupt_order_and_hf_struct(con, shard, expected, images, caplog):
    n = len(images)
    with caplog.at_level(logging.WARNING, logger="arrowvision"):
        by_bytes = duck_column(con, f"SELECT embed_image(img) FROM '{shard}' ORDER BY id")
    assert_rows_match(by_bytes, expected, list(range(n)) + [None, None])
    assert "corrupt" in caplog.text
    by_struct = duck_column(con, f"SELECT embed_image(image.bytes) FROM '{shard}' ORDER BY id DESC")
    assert_rows_match(by_struct, expected, [None, None] + list(range(n))[::-1])


def test_duckdb_zero_shot_sql_and_empty_input(con, shard, expected):
    scores = con.sql(f"SELECT id, array_cosine_similarity(embed_image(img), embed_text('a photo of a cat')) AS s "
                     f"FROM '{shard}' WHERE img IS NOT NULL ORDER BY s DESC").fetchall()
    assert len(scores) == len(expected) + 1 and scores[-1][1] is None  # the corrupt row has no score
    assert all(-1.0 <= s <= 1.0 for _, s in scores[:-1])
    empty = duck_table(con, f"SELECT embed_image(img) FROM '{shard}' WHERE id < 0")
    assert empty.num_rows == 0


def test_duckdb_paths_and_large_binary(con, tmp_path, images, expected):
    (tmp_path / "a.jpg").write_bytes(images[2])
    paths = pa.table({"p": [str(tmp_path / "a.jpg"), None], "b": pa.array([images[4], images[0]], pa.large_binary())})
    con.register("paths_and_bytes", paths)
    out = duck_table(con, "SELECT embed_image_path(p) AS byp, embed_image(b) AS byb FROM paths_and_bytes")
    assert_rows_match(out.column("byp").combine_chunks(), expected, [2, None])
    assert_rows_match(out.column("byb").combine_chunks(), expected, [4, 0])


def test_duckdb_on_error_raise_names_the_row(weights, shard):
    duckdb = pytest.importorskip("duckdb")
    import arrowvision.duckdb

    strict = duckdb.connect()
    arrowvision.duckdb.register(strict, weights, text_name=None, on_error="raise", backend="torch", batch_size=4)
    with pytest.raises(duckdb.Error, match="could not be embedded"):
        strict.sql(f"SELECT embed_image(img) FROM '{shard}'").fetchall()
    with pytest.raises(ArrowVisionError, match="on_error"):
        arrowvision.duckdb.register(strict, weights, on_error="skip")


# ----------------------------------------------------------------------------- polars


def test_polars_lazy_and_streaming(weights, shard, expected, images):
    pl = pytest.importorskip("polars")
    import arrowvision.polars as avp

    n = len(images)
    query = (pl.scan_parquet(shard)
             .with_columns(e=avp.embed_image(pl.col("img"), weights, backend="torch", batch_size=4),
                           s=avp.embed_image("image", weights, backend="torch", batch_size=4))
             .sort("id"))
    for frame in (query.collect(), query.collect(engine="streaming")):
        assert frame.schema["e"] == pl.Array(pl.Float32, expected.shape[1])
        assert_rows_match(frame["e"].to_arrow(), expected, list(range(n)) + [None, None])
        assert_rows_match(frame["s"].to_arrow(), expected, list(range(n)) + [None, None])
    limited = query.filter(pl.col("id") >= 2).head(2).collect(engine="streaming")
    assert_rows_match(limited["e"].to_arrow(), expected, [2, 3])


def test_polars_large_binary_slices_empty_and_text(weights, images, expected, siglip_all_parquet):
    pl = pytest.importorskip("polars")
    import arrowvision.polars as avp
    from arrowvision import TextEncoder

    frame = pl.from_arrow(pa.table({"b": pa.array(images, pa.large_binary())})).slice(1, 3)
    out = frame.select(avp.embed_image("b", weights, backend="torch", batch_size=4))
    assert_rows_match(out["b"].to_arrow(), expected, [1, 2, 3])
    empty = frame.head(0).select(avp.embed_image("b", weights, backend="torch", batch_size=4))
    assert empty.height == 0
    texts = pl.DataFrame({"t": ["a red car", None]}).select(avp.embed_text("t", weights, backend="torch"))
    reference = TextEncoder.from_parquet(siglip_all_parquet).encode(["a red car"])
    assert_rows_match(texts["t"].to_arrow(), reference, [0, None])


# ----------------------------------------------------------------------------- pyarrow compute


def test_compute_binary_chunked_sliced_nulls(weights, images, expected):
    import arrowvision.compute

    assert arrowvision.compute.register(weights, name="av_embed_image", backend="torch", batch_size=4) == "av_embed_image"
    column = pa.chunked_array([pa.array(images[:2] + [None]), pa.array([CORRUPT] + images[2:])])
    out = pc.call_function("av_embed_image", [column])
    rows = [0, 1, None, None] + list(range(2, len(images)))
    assert_rows_match(pa.concat_arrays(out.chunks), expected, rows)
    sliced = pa.array(images).slice(3, 2)
    assert_rows_match(pc.call_function("av_embed_image", [sliced]), expected, [3, 4])
    assert len(pc.call_function("av_embed_image", [pa.array([], pa.binary())])) == 0


def test_compute_large_binary_struct_and_reregistration(weights, images, expected):
    import arrowvision.compute

    arrowvision.compute.register(weights, name="av_embed_large", input_type=pa.large_binary(), backend="torch")
    assert_rows_match(pc.call_function("av_embed_large", [pa.array(images[:2], pa.large_binary())]), expected, [0, 1])
    arrowvision.compute.register(weights, name="av_embed_hf", input_type=HF_IMAGE, backend="torch")
    struct = pa.array([{"bytes": images[5], "path": None}, None], HF_IMAGE)
    assert_rows_match(pc.call_function("av_embed_hf", [struct]), expected, [5, None])
    arrowvision.compute.register(weights, name="av_embed_large", input_type=pa.large_binary(), backend="torch",
                                 on_error="raise")  # same signature: re-pointed
    with pytest.raises(ImageError, match="row 0"):
        pc.call_function("av_embed_large", [pa.array([CORRUPT], pa.large_binary())])
    with pytest.raises(ArrowVisionError, match="re-register"):
        arrowvision.compute.register(weights, name="av_embed_large", backend="torch")
    with pytest.raises(ArrowVisionError, match="not ours"):
        arrowvision.compute.register(weights, name="sum", backend="torch")


def test_docs_zero_shot_example_runs(weights, tmp_path, monkeypatch, module_cache, capsys):
    """docs/ARROW.md's end-to-end DuckDB block, as written (default backend), on a two-tower model."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ARROW.md").read_text()
    section = text.split("## Zero-shot search over a Parquet shard with DuckDB", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WEIGHTS", str(weights))
    exec(compile(block, "docs/ARROW.md", "exec"), {})
    ranked = eval(capsys.readouterr().out.strip())
    assert len(ranked) == 3 and all(name != "camera" for name, _ in ranked)
    assert ranked[0][1] >= ranked[1][1] >= ranked[2][1]
