"""Sketch normalization: polarity, contrast and noise invariance, on sketches drawn with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from arrowvision import VisionEncoder
from arrowvision.inputs.preprocess import normalize_sketch

DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"


def draw(kind: str, ink: int = 0, paper: int = 255, size: int = 256, thickness: int = 3) -> np.ndarray:
    canvas = np.full((size, size), paper, np.uint8)
    if kind == "house":
        cv2.rectangle(canvas, (60, 120), (196, 220), ink, thickness)
        cv2.line(canvas, (60, 120), (128, 50), ink, thickness)
        cv2.line(canvas, (128, 50), (196, 120), ink, thickness)
        cv2.rectangle(canvas, (110, 170), (146, 220), ink, thickness)
    elif kind == "face":
        cv2.circle(canvas, (128, 128), 90, ink, thickness)
        cv2.circle(canvas, (95, 105), 12, ink, thickness)
        cv2.circle(canvas, (161, 105), 12, ink, thickness)
        cv2.ellipse(canvas, (128, 160), (40, 20), 0, 0, 180, ink, thickness)
    elif kind == "zigzag":
        points = np.array([[20 + 36 * i, 60 if i % 2 else 200] for i in range(7)], np.int32)
        cv2.polylines(canvas, [points], False, ink, thickness)
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB)


def salt_and_pepper(image: np.ndarray, amount: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = image.copy()
    mask = rng.random(image.shape[:2])
    noisy[mask < amount / 2] = 0
    noisy[mask > 1 - amount / 2] = 255
    return noisy


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO)


def test_output_is_dark_on_white_rgb():
    out = normalize_sketch(draw("house", ink=255, paper=0))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert np.median(out) == 255 and out.min() == 0


@pytest.mark.parametrize("kind", ["house", "face", "zigzag"])
def test_polarities_and_contrasts_normalize_alike(kind):
    reference = normalize_sketch(draw(kind))
    variants = {
        "light on dark": draw(kind, ink=255, paper=0),
        "faint pencil": draw(kind, ink=150, paper=230),
        "chalk on slate": draw(kind, ink=200, paper=40),
        "speckled": salt_and_pepper(draw(kind), 0.02),
    }
    for name, variant in variants.items():
        differing = np.mean(np.abs(normalize_sketch(variant).astype(int) - reference.astype(int)) > 40)
        assert differing < 0.01, f"{kind} / {name}: {differing:.3%} of pixels differ"


def test_polarity_invariant_embeddings_and_distinct_sketches(encoder):
    kinds = ["house", "face", "zigzag"]
    normal = encoder.encode([normalize_sketch(draw(k)) for k in kinds])
    inverted = encoder.encode([normalize_sketch(draw(k, ink=255, paper=0)) for k in kinds])
    same = (normal * inverted).sum(axis=1)
    assert same.min() >= 0.999, same
    # The bundled model is random-init: all embeddings of near-white images are close in
    # absolute terms, so "apart" is relative: cosine distances between different sketches are
    # at least 50x the distance between the two polarities of one sketch.
    same_distance = float((1 - same).max())
    cross = normal @ normal.T
    different_distance = float((1 - cross[~np.eye(len(kinds), dtype=bool)]).min())
    assert different_distance > 50 * max(same_distance, 1e-6), (different_distance, same_distance)
    # without normalization the two polarities are far apart: the normalization does the work
    raw = encoder.encode([draw("house"), draw("house", ink=255, paper=0)])
    assert 1 - float(raw[0] @ raw[1]) > 50 * max(same_distance, 1e-6)


def test_blank_canvas_stays_blank():
    assert (normalize_sketch(np.full((64, 64, 3), 17, np.uint8)) == 255).all()
