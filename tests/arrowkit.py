"""Shared inputs for the Arrow tests: JPEG bytes of real photos, a corrupt image, a Parquet
shard of them, and the embeddings ``encode()`` gives for them (what every Arrow path must
reproduce). Test modules import the fixtures by name."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arrowvision import VisionEncoder
from arrowvision import engine_models as shared

CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


def jpeg_bytes(photos: dict[str, np.ndarray], count: int = 6) -> list[bytes]:
    from PIL import Image

    images = list(photos.values())
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        photo = images[i % len(images)]
        Image.fromarray(photo[: 200 + 37 * i, : 300 - 11 * i]).save(buffer, format="JPEG", quality=85 + i)
        out.append(buffer.getvalue())
    return out


def assert_rows_match(column: pa.Array, expected: np.ndarray, rows: list[int | None], min_cosine: float = 0.99999) -> None:
    """Row i of ``column`` equals ``expected[rows[i]]`` (cosine), or is null where rows[i] is None."""
    assert len(column) == len(rows)
    got = column.to_pylist()
    for value, row in zip(got, rows):
        if row is None:
            assert value is None
        else:
            vector = np.asarray(value, np.float32)
            cosine = float(vector @ expected[row] / (np.linalg.norm(vector) * np.linalg.norm(expected[row])))
            assert cosine >= min_cosine, (row, cosine)


# ----------------------------------------------------------------------------- fixtures (import them)

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def weights(siglip_all_parquet):
    return siglip_all_parquet  # both towers: embed_text too


@pytest.fixture(scope="module")
def images(photos):
    return jpeg_bytes(photos)


@pytest.fixture(scope="module")
def expected(weights, images):
    return VisionEncoder.from_parquet(weights, backend="torch").encode(images)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, images):
    """A Parquet shard: ids, a caption, image bytes (one null, one corrupt) and the HF struct."""
    column = images + [None, CORRUPT]
    table = pa.table({
        "id": pa.array(range(len(column)), pa.int64()),
        "caption": [f"photo {i}" for i in range(len(column))],
        "img": pa.array(column, pa.binary()),
        "image": pa.array([None if b is None else {"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(column)], HF_IMAGE),
    })
    path = tmp_path_factory.mktemp("shard") / "shard.parquet"
    pq.write_table(table, path, row_group_size=3)  # several row groups: the engines see several vectors
    return path


@pytest.fixture(autouse=True, scope="module")
def fresh_models():
    shared.clear()
    yield
    shared.clear()


