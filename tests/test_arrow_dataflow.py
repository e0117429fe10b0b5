"""The dataflow adapters inside their engines: Ray Data (``ColumnEmbedder``), Daft, LanceDB."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from arrowvision.errors import ArrowVisionError

from .arrowkit import CORRUPT, HF_IMAGE, assert_rows_match
from .arrowkit import expected, fresh_models, images, shard, weights  # noqa: F401 (fixtures)
from .raykit import ray_cluster  # noqa: F401 (fixture)


# ----------------------------------------------------------------------------- Ray Data


@pytest.mark.ray
def test_ray_map_batches_embeds_a_column_per_actor(ray_cluster, weights, shard, expected, images):
    from ray.data import ActorPoolStrategy

    from arrowvision.distributed.columns import ColumnEmbedder

    n = len(images)
    dataset = ray_cluster.data.read_parquet(str(shard)).map_batches(
        ColumnEmbedder, fn_constructor_kwargs=dict(weights=str(weights), column="img", error_column="why",
                                                   backend="torch", batch_size=4),
        batch_format="pyarrow", batch_size=3, compute=ActorPoolStrategy(size=1), num_cpus=1)
    table = dataset.to_arrow_refs()
    table = pa.concat_tables(ray_cluster.get(table)).sort_by("id")
    assert table.column("id").to_pylist() == list(range(n + 2))
    assert_rows_match(table.column("embedding").combine_chunks(), expected, list(range(n)) + [None, None])
    why = table.column("why").to_pylist()
    assert why[:n + 1] == [None] * (n + 1) and "corrupt" in why[n + 1]


def test_column_embedder_on_hf_struct_and_large_binary_without_ray(weights, images, expected):
    from arrowvision.distributed.columns import ColumnEmbedder

    embedder = ColumnEmbedder(str(weights), column="image", backend="torch", details=True)
    batch = pa.table({"image": pa.array([{"bytes": images[1], "path": None}, None], HF_IMAGE)})
    out = embedder(batch)
    assert_rows_match(out.column("embedding").combine_chunks(), expected, [1, None])
    assert out.column("_width").to_pylist()[0] > 0 and len(out.column("_sha256").to_pylist()[0]) == 64
    large = ColumnEmbedder(str(weights), column="b", backend="torch")(
        pa.table({"b": pa.chunked_array([pa.array(images[:2], pa.large_binary()), pa.array(images[2:3], pa.large_binary())])}))
    assert_rows_match(large.column("embedding").combine_chunks(), expected, [0, 1, 2])
    empty = embedder(batch.slice(0, 0))
    assert empty.num_rows == 0 and empty.column("embedding").type == pa.list_(pa.float32(), expected.shape[1])
    with pytest.raises(ArrowVisionError, match="no column 'missing'"):
        ColumnEmbedder(str(weights), column="missing", backend="torch")(batch)


# ----------------------------------------------------------------------------- Daft


def test_daft_bytes_struct_paths_nulls_and_order(weights, shard, expected, images, tmp_path):
    daft = pytest.importorskip("daft")
    import arrowvision.daft as avd

    n = len(images)
    frame = daft.read_parquet(str(shard)).sort("id")
    frame = frame.with_column("e", avd.embed_image(frame["img"], weights, backend="torch", batch_size=4))
    frame = frame.with_column("s", avd.embed_image(frame["image"], weights, backend="torch"))
    out = frame.select("id", "e", "s").to_pydict()
    assert out["id"] == list(range(n + 2))
    for name in ("e", "s"):
        column = pa.array([None if v is None else list(v) for v in out[name]], pa.list_(pa.float32(), expected.shape[1]))
        assert_rows_match(column, expected, list(range(n)) + [None, None])
    limited = daft.read_parquet(str(shard)).where(daft.col("id") >= 4).sort("id").limit(1)
    one = limited.select(avd.embed_image(daft.col("img"), weights, backend="torch").alias("e")).to_pydict()["e"]
    assert_rows_match(pa.array([list(one[0])], pa.list_(pa.float32(), expected.shape[1])), expected, [4])
    (tmp_path / "x.jpg").write_bytes(images[3])
    paths = daft.from_pydict({"p": [str(tmp_path / "x.jpg"), None, str(tmp_path / "nope.jpg")]})
    got = paths.select(avd.embed_image("p", weights, backend="torch").alias("e")).to_pydict()["e"]
    assert got[1] is None and got[2] is None
    assert float(np.dot(np.asarray(got[0]), expected[3])) > 0.99999


def test_daft_empty_and_text(weights, siglip_all_parquet):
    daft = pytest.importorskip("daft")
    import arrowvision.daft as avd
    from arrowvision import TextEncoder

    empty = daft.from_pydict({"b": pa.array([], pa.binary())})
    assert empty.select(avd.embed_image("b", weights, backend="torch")).to_pydict() == {"b": []}
    texts = daft.from_pydict({"t": ["a red car", None]}).select(avd.embed_text("t", weights, backend="torch")).to_pydict()["t"]
    reference = TextEncoder.from_parquet(siglip_all_parquet).encode(["a red car"])[0]
    assert texts[1] is None and float(np.dot(np.asarray(texts[0]), reference)) > 0.99999


# ----------------------------------------------------------------------------- LanceDB


def test_lancedb_embedding_function_fills_vectors_and_answers_text_queries(weights, images, expected, tmp_path):
    lancedb = pytest.importorskip("lancedb")
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    import arrowvision.lancedb  # noqa: F401 - registers "arrowvision"

    function = get_registry().get("arrowvision").create(weights=str(weights), backend="torch", batch_size=4)
    dim = expected.shape[1]
    assert function.ndims() == dim

    class Photo(LanceModel):
        name: str
        image: bytes = function.SourceField()
        vector: Vector(dim) = function.VectorField(default=None)  # type: ignore[valid-type]

    table = lancedb.connect(tmp_path / "db").create_table("photos", schema=Photo)
    table.add([{"name": f"p{i}", "image": data} for i, data in enumerate(images)])
    rows = table.to_arrow().sort_by("name")
    assert rows.num_rows == len(images)
    assert_rows_match(rows.column("vector").combine_chunks(), expected, list(range(len(images))))
    hits = table.search(images[2]).limit(1).to_list()  # an image query: bytes
    assert hits[0]["name"] == "p2"
    text_hits = table.search("a photo of a cat").limit(3).to_list()  # text tower
    assert len(text_hits) == 3
    vectors = function.compute_source_embeddings(pa.array([images[0], None, CORRUPT], pa.large_binary()))
    assert vectors[1] is None and vectors[2] is None
    assert float(np.dot(vectors[0], expected[0])) > 0.99999
    assert function.compute_source_embeddings(pa.array([], pa.binary())) == []
    struct = pa.chunked_array([pa.array([{"bytes": images[4], "path": None}], HF_IMAGE), pa.array([None], HF_IMAGE)])
    from_struct = function.compute_source_embeddings(struct)
    assert from_struct[1] is None and float(np.dot(from_struct[0], expected[4])) > 0.99999
