"""The public VisionEncoder API: every accepted input form gives the same embeddings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arrowvision import ArrowVisionError, ImageError, VisionEncoder

DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO)


def test_input_forms_agree(encoder, photos, tmp_path):
    arrays = [photos["astronaut"], photos["coffee"]]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    reference = encoder.encode(arrays)
    assert reference.shape == (2, encoder.embedding_dim) and reference.dtype == np.float32
    pngs = [p.read_bytes() for p in paths]
    forms = {
        "paths": paths,
        "str paths": [str(p) for p in paths],
        "bytes": pngs,
        "PIL": [Image.open(io.BytesIO(b)) for b in pngs],
        "generator": (a for a in arrays),
        "preprocessed numpy": encoder.preprocess(arrays),
        "preprocessed torch": torch.from_numpy(encoder.preprocess(arrays)),
    }
    for name, images in forms.items():
        np.testing.assert_allclose(encoder.encode(images), reference, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(encoder.encode(arrays[0]), reference[:1], atol=1e-5)  # a single HWC array
    np.testing.assert_allclose(encoder.encode(Image.fromarray(arrays[1])), reference[1:], atol=1e-5)


def test_batch_size_does_not_change_results(encoder, photos):
    images = list(photos.values())
    np.testing.assert_allclose(encoder.encode(images, batch_size=1), encoder.encode(images, batch_size=3), atol=1e-5)


def test_normalize_flag_and_empty_input(encoder, photos):
    raw = encoder.encode([photos["rocket"]], normalize=False)
    assert abs(float(np.linalg.norm(raw)) - 1) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), encoder.encode([photos["rocket"]]), atol=1e-6)
    assert encoder.encode([]).shape == (0, encoder.embedding_dim)


def test_bad_arguments(encoder):
    with pytest.raises(ArrowVisionError, match="batch_size"):
        encoder.encode([np.zeros((8, 8, 3), np.uint8)], batch_size=0)
    with pytest.raises(ImageError, match="not an image"):
        encoder.encode([b"definitely not an image"])
    with pytest.raises(ArrowVisionError, match="unknown backend"):
        VisionEncoder.from_parquet(DEMO, backend="tensorrt")
    with pytest.raises(ArrowVisionError, match="not available on the torch backend"):
        VisionEncoder.from_parquet(DEMO, backend="torch", precision="int8")
