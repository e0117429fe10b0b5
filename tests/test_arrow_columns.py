"""``encode_arrow``: every Arrow layout of an image (or text) column embeds as ``encode()`` does."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from arrowvision import TextEncoder, VisionEncoder
from arrowvision.arrow import columns
from arrowvision.engine_models import clear, shared_model
from arrowvision.errors import ArrowVisionError, ColumnTypeError

from .arrowkit import CORRUPT, assert_rows_match, jpeg_bytes


@pytest.fixture(scope="module")
def encoder(tiny_siglip_parquet):
    return VisionEncoder.from_parquet(tiny_siglip_parquet, backend="torch")


@pytest.fixture(scope="module")
def images(photos):
    return jpeg_bytes(photos)


@pytest.fixture(scope="module")
def expected(encoder, images):
    return encoder.encode(images)


def test_binary_column_equals_encode_in_order(encoder, images, expected):
    out = encoder.encode_arrow(pa.array(images, pa.binary()), batch_size=4)
    assert out.type == pa.list_(pa.float32(), encoder.embedding_dim)
    assert_rows_match(out, expected, list(range(len(images))))


@pytest.mark.parametrize("kind", [pa.large_binary(), pa.binary_view()])
def test_large_binary_and_binary_view(encoder, images, expected, kind):
    assert_rows_match(encoder.encode_arrow(pa.array(images, kind)), expected, list(range(len(images))))


def test_nulls_and_a_corrupt_image_are_null_rows_with_reasons(encoder, images, expected):
    column = pa.array([images[0], None, CORRUPT, images[1], b""], pa.binary())
    errors: dict[int, str] = {}
    out = encoder.encode_arrow(column, errors=errors)
    assert_rows_match(out, expected, [0, None, None, 1, None])
    assert out.null_count == 3
    assert sorted(errors) == [2, 4]  # a null input is null, not an error
    assert "row 2" in errors[2] and "corrupt" in errors[2]
    assert "row 4" in errors[4] and "empty" in errors[4]


def test_sliced_and_chunked_arrays_keep_their_rows(encoder, images, expected):
    whole = pa.array(images, pa.large_binary())
    sliced = whole.slice(2, 3)
    assert_rows_match(encoder.encode_arrow(sliced), expected, [2, 3, 4])
    chunked = pa.chunked_array([whole.slice(4), pa.array([None], pa.large_binary()), whole.slice(1, 2)])
    assert_rows_match(encoder.encode_arrow(chunked, batch_size=2), expected, [4, 5, None, 1, 2])


def test_hugging_face_struct_prefers_bytes_then_reads_the_path(encoder, images, expected, tmp_path):
    path = tmp_path / "third.jpg"
    path.write_bytes(images[3])
    struct = pa.array([{"bytes": images[0], "path": "ignored.jpg"}, {"bytes": None, "path": str(path)}, None,
                       {"bytes": None, "path": str(tmp_path / "missing.jpg")}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    errors: dict[int, str] = {}
    out = encoder.encode_arrow(struct.slice(0), errors=errors)
    assert_rows_match(out, expected, [0, 3, None, None])
    assert list(errors) == [3] and "missing.jpg" in errors[3]
    assert_rows_match(encoder.encode_arrow(struct.slice(1, 2)), expected, [3, None])


def test_path_strings_and_dictionary_columns(encoder, images, expected, tmp_path):
    paths = []
    for i, data in enumerate(images[:3]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        (tmp_path / f"{i}.jpg").write_bytes(data)
    for column in (pa.array(paths), pa.array(paths, pa.large_string()), pa.array(paths, pa.string_view()),
                   pa.array(paths + paths[:1]).dictionary_encode()):
        assert_rows_match(encoder.encode_arrow(column), expected, [0, 1, 2, 0][: len(column)])


def test_empty_and_all_null_columns(encoder):
    for column in (pa.array([], pa.binary()), pa.chunked_array([], pa.binary()), pa.array([None, None], pa.binary()),
                   pa.nulls(2)):
        out = encoder.encode_arrow(column)
        assert len(out) == len(column) and out.null_count == len(column)
        assert out.type == pa.list_(pa.float32(), encoder.embedding_dim)


def test_output_wraps_the_model_buffer(encoder, images):
    result = columns.embed_image_column(encoder, pa.array(images[:2]))
    out = result.to_arrow()
    assert out.values.buffers()[1].address == result.vectors.ctypes.data  # no copy into Arrow


def test_fast_decode_matches_encode_fast(encoder, images):
    reference = encoder.encode(images, decode="fast")
    assert_rows_match(encoder.encode_arrow(pa.array(images), decode="fast"), reference, list(range(len(images))))


def test_wrong_types_are_named(encoder):
    with pytest.raises(ColumnTypeError, match="int64"):
        encoder.encode_arrow(pa.array([1, 2]))
    with pytest.raises(ColumnTypeError, match="'bytes' and/or 'path'"):
        encoder.encode_arrow(pa.array([{"x": 1}]))
    with pytest.raises(ColumnTypeError, match="list"):
        encoder.encode_arrow([b"abc"])
    with pytest.raises(ArrowVisionError, match="decode"):
        encoder.encode_arrow(pa.array([b"x"]), decode="gpu")


def test_text_column_equals_encode(siglip_all_parquet):
    text = TextEncoder.from_parquet(siglip_all_parquet)
    column = pa.chunked_array([pa.array(["a red car", None], pa.large_string()), pa.array(["a cat"], pa.large_string())])
    out = text.encode_arrow(column)
    assert_rows_match(out, text.encode(["a red car", "a cat"]), [0, None, 1])
    with pytest.raises(ColumnTypeError, match="string"):
        text.encode_arrow(pa.array([b"bytes"]))


def test_shared_model_loads_once_across_threads(tiny_siglip_parquet, images, expected):
    clear()
    found = []
    threads = [threading.Thread(target=lambda: found.append(shared_model(tiny_siglip_parquet, backend="torch", batch_size=3)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(model) for model in found}) == 1
    assert shared_model(tiny_siglip_parquet, backend="torch", batch_size=4) is not found[0]  # other options
    outputs = []
    workers = [threading.Thread(target=lambda: outputs.append(found[0].embed_arrow(pa.array(images)))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for out in outputs:
        assert_rows_match(out, expected, list(range(len(images))))
    clear()


def test_import_stays_light():
    """``import arrowvision`` (and the column core) pulls no engine, torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, arrowvision, arrowvision.arrow; "
            "print(sorted(m for m in ('duckdb', 'polars', 'daft', 'lancedb', 'ray', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
