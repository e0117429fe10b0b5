"""Shared inputs for the Arrow tests: JPEG bytes of real photos, a corrupt image, and the
embeddings ``encode()`` gives for them (what every Arrow path must reproduce)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

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
