"""Calibration and held-out validation images for lossy exports, and the accuracy check.

Lossy precisions (fp16, bf16, int8-weights, int8) are *calibrated* on the bundled sample photos
plus grayscale and sketch renderings of them, and *validated* on a different, bundled held-out set
(``arrowvision/heldout/<kind>/``, made by ``tools/make_heldout_set.py``) that covers what users
embed: color photos, grayscale photos, sketches (through ``normalize_sketch``, as ``--sketch``
runs them), graphics and small or odd-sized images. An export is refused when its minimum cosine
against the fp32 torch reference falls below ``min_cosine`` on *any* kind, so a precision that
holds on photos but not on sketches never ships.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..model.config import VisionConfig
from ..util.similarity import row_cosines

PACKAGE = Path(__file__).resolve().parents[1]
SAMPLES_DIR = PACKAGE / "samples"
HELDOUT_DIR = PACKAGE / "heldout"
log = logging.getLogger("arrowvision")
KINDS = ("photos", "grayscale", "sketches", "graphics", "small")
DEFAULT_MIN_COSINE = 0.99


def sample_photos() -> list[Path]:
    photos = sorted(SAMPLES_DIR.glob("*.jpg"))
    if not photos:
        raise BackendError(f"no bundled sample photos in {SAMPLES_DIR}: reinstall arrowvision")
    return photos


def heldout_files() -> dict[str, list[Path]]:
    sets = {kind: sorted(p for p in (HELDOUT_DIR / kind).glob("*") if p.suffix in (".jpg", ".png")) for kind in KINDS}
    missing = [kind for kind, files in sets.items() if not files]
    if missing:
        raise BackendError(f"bundled held-out images missing for {', '.join(missing)} in {HELDOUT_DIR}: reinstall arrowvision")
    return sets


def _sketch_from_photo(path: Path) -> np.ndarray:
    """A pen drawing of a photo (its edges), the kind of input ``--sketch`` embeds."""
    import cv2

    from ..inputs.preprocess import load_image

    gray = cv2.cvtColor(np.asarray(load_image(path)), cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(gray, (5, 5), 1.5)
    median = float(np.median(blurred))
    edges = cv2.dilate(cv2.Canny(blurred, 0.5 * median, 1.2 * median), np.ones((2, 2), np.uint8))
    return 255 - edges


def calibration_images(user_images: Sequence[Any] | None = None) -> list[Any]:
    """The user's images if given, else the bundled photos plus grayscale and sketch renderings."""
    if user_images:
        return list(user_images)
    from ..inputs.preprocess import load_image, normalize_sketch

    photos = sample_photos()
    grays = [np.asarray(load_image(p).convert("L").convert("RGB")) for p in photos]
    sketches = [normalize_sketch(_sketch_from_photo(p)) for p in photos]
    return [*photos, *grays, *sketches]


def calibration_fingerprint(images: Sequence[Any] | None) -> str:
    if not images:
        return "bundled-samples-v2"
    digest = hashlib.sha256()
    for image in images:
        digest.update(Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else np.asarray(image).tobytes())
    return digest.hexdigest()[:16]


def calibration_pixels(config: VisionConfig, user_images: Sequence[Any] | None = None) -> np.ndarray:
    from ..inputs.preprocess import Preprocessor

    return Preprocessor.from_config(config).batch(calibration_images(user_images))


def heldout_pixels(config: VisionConfig) -> dict[str, np.ndarray]:
    """Preprocessed held-out images per kind; sketches go through ``normalize_sketch`` first."""
    from ..inputs.preprocess import Preprocessor, normalize_sketch

    preprocessor = Preprocessor.from_config(config)
    pixels = {}
    for kind, files in heldout_files().items():
        images = [normalize_sketch(f) for f in files] if kind == "sketches" else files
        pixels[kind] = preprocessor.batch(images)
    return pixels


def reference_embeddings(model: Any, pixels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fp32 torch reference (our ``VisionTransformer``) on each kind's pixels."""
    import torch

    with torch.inference_mode():
        return {kind: model(torch.from_numpy(batch)).pooled.float().numpy() for kind, batch in pixels.items()}


def accuracy_by_kind(reference: dict[str, np.ndarray], run: Callable[[np.ndarray], np.ndarray],
                     pixels: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Min / mean cosine of ``run`` against the reference, per kind, one image per call (batch 1
    is what latency users run; it also keeps dynamic-quantization scales per image)."""
    report = {}
    for kind, batch in pixels.items():
        candidate = np.concatenate([run(batch[i : i + 1]) for i in range(len(batch))])
        cosines = row_cosines(reference[kind], candidate)
        report[kind] = {"images": len(batch), "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}
    return report


def check_accuracy(precision: str, report: dict[str, dict[str, float]], min_cosine: float) -> None:
    """Refuse an export whose worst kind falls below ``min_cosine``, naming that kind."""
    kind, worst = min(report.items(), key=lambda item: item[1]["min_cosine"])
    if worst["min_cosine"] < min_cosine:
        summary = ", ".join(f"{k} {v['min_cosine']:.4f}" for k, v in report.items())
        raise BackendError(
            f"{precision} export is too inaccurate: min cosine {worst['min_cosine']:.4f} < threshold {min_cosine} "
            f"on held-out {kind} vs the fp32 reference (per kind: {summary}); lower min_cosine to accept it, "
            "or use fp32/fp16"
        )


def validate_lossy(label: str, precision: str, run: Callable[[np.ndarray], np.ndarray], pixels: dict[str, np.ndarray],
                   reference: dict[str, np.ndarray], min_cosine: float) -> dict[str, Any]:
    """Measure an export per held-out kind, log it, refuse it below ``min_cosine``; return the
    figures for its meta.json."""
    report = accuracy_by_kind(reference, run, pixels)
    summary = summarize(report)
    passed = summary["min_cosine"] >= min_cosine  # a refusal is raised below; only then does the user need to look
    log.log(logging.INFO if passed else logging.WARNING, "%s %s export: cosine vs fp32 torch reference min %.5f (%s)",
            label, precision, summary["min_cosine"],
            ", ".join(f"{k} {v['min_cosine']:.4f}" for k, v in report.items()))
    check_accuracy(precision, report, min_cosine)
    return summary


def recheck(meta: dict[str, Any], min_cosine: float) -> None:
    """A cached export was validated at the threshold of whoever made it: hold it to this caller's."""
    if meta.get("by_kind"):
        check_accuracy(meta["precision"], meta["by_kind"], min_cosine)


def summarize(report: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Top-level figures for meta.json / CLI output: overall min and mean, and images counted."""
    return {
        "validation_images": sum(v["images"] for v in report.values()),
        "min_cosine": min(v["min_cosine"] for v in report.values()),
        "mean_cosine": float(np.mean([v["mean_cosine"] for v in report.values()])),
        "by_kind": report,
    }
