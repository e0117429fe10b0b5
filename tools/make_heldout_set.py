"""Build the bundled held-out validation set: arrowvision/heldout/<kind>/*.

Lossy exports (int8, fp16, ...) are calibrated on the bundled sample photos and validated on
these images, which differ from the calibration set and cover the kinds users embed: color photos,
grayscale photos, sketches (both polarities), graphics and small or odd-sized images. Sources
are scikit-image's bundled data (public domain / CC0, see skimage.data) and drawings generated
here. Run once after changing it; the output is committed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import skimage.data as data
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "arrowvision" / "heldout"
MAX_SIDE = 320


def fit(image: np.ndarray) -> Image.Image:
    pil = Image.fromarray(image)
    if max(pil.size) > MAX_SIDE:
        pil.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return pil


def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
    return image


def sketch_of(photo: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Dark strokes on white: Canny edges of a photo, thickened like a pen line."""
    gray = photo if photo.ndim == 2 else cv2.cvtColor(photo[..., :3], cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(gray, None, fx=MAX_SIDE / max(gray.shape), fy=MAX_SIDE / max(gray.shape), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(gray, (5, 5), 1.5)
    median = float(np.median(blurred))  # thresholds around the median: every photo gets lines
    edges = cv2.Canny(blurred, 0.5 * median * scale, 1.2 * median * scale)
    edges = cv2.dilate(edges, np.ones((2, 2), np.uint8))
    return 255 - edges


def drawing(kind: str) -> np.ndarray:
    canvas = Image.new("L", (256, 256), 255)
    pen = ImageDraw.Draw(canvas)
    if kind == "house":
        pen.rectangle((60, 110, 196, 220), outline=0, width=4)
        pen.line((50, 115, 128, 40, 206, 115), fill=0, width=4)
        pen.rectangle((110, 160, 146, 220), outline=0, width=3)
    else:  # a face
        pen.ellipse((40, 40, 216, 216), outline=0, width=4)
        pen.ellipse((90, 100, 110, 120), fill=0)
        pen.ellipse((146, 100, 166, 120), fill=0)
        pen.arc((90, 120, 166, 180), 20, 160, fill=0, width=4)
    return np.asarray(canvas)


def chart() -> np.ndarray:
    canvas = Image.new("RGB", (300, 200), "white")
    pen = ImageDraw.Draw(canvas)
    for i, (height, color) in enumerate(zip((120, 60, 160, 90), ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"))):
        pen.rectangle((30 + 60 * i, 180 - height, 70 + 60 * i, 180), fill=color)
    pen.line((20, 180, 290, 180), fill="black", width=2)
    pen.text((30, 10), "quarterly results", fill="black")
    return np.asarray(canvas)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    motorcycle = data.stereo_motorcycle()[0]
    sets: dict[str, dict[str, tuple[np.ndarray, str]]] = {
        "photos": {
            "motorcycle": (motorcycle, "jpg"),
            "hubble": (data.hubble_deep_field(), "jpg"),
            "retina": (data.retina(), "jpg"),
            "motorcycle_right": (data.stereo_motorcycle()[1][::-1, ::-1].copy(), "jpg"),
        },
        "grayscale": {name: (getattr(data, name)(), "jpg") for name in ("coins", "clock", "brick", "moon", "cell", "gravel")},
        "sketches": {
            **{f"{name}_ink": (sketch_of(source, scale), "png") for name, source, scale in
               (("motorcycle", motorcycle, 1.0), ("coins", data.coins(), 1.0), ("clock", data.clock(), 0.1), ("retina", data.retina(), 1.0))},
            **{f"{name}_chalk": (255 - sketch_of(source), "png") for name, source in
               (("motorcycle", motorcycle), ("coins", data.coins()))},
            "house_drawing": (drawing("house"), "png"),
            "face_drawing_chalk": (255 - drawing("face"), "png"),
        },
        "graphics": {
            "logo": (data.logo(), "png"),
            "colorwheel": (data.colorwheel(), "png"),
            "checkerboard": (data.checkerboard(), "png"),
            "page": (data.page(), "png"),
            "text": (data.text(), "png"),
            "phantom": (to_uint8(data.shepp_logan_phantom()), "png"),
            "blobs": (to_uint8(data.binary_blobs(256, rng=0)), "png"),
            "chart": (chart(), "png"),
        },
        "small": {
            "face_25px": (to_uint8(data.lfw_subset()[0]), "png"),
            "microaneurysms_102px": (data.microaneurysms(), "png"),
            "strip_600x40": (np.ascontiguousarray(motorcycle[200:240, :600]), "jpg"),
            "crop_31x17": (np.ascontiguousarray(data.hubble_deep_field()[400:417, 500:531]), "png"),
        },
    }
    for kind, images in sets.items():
        folder = OUT / kind
        folder.mkdir(parents=True)
        for name, (image, ext) in images.items():
            pil = fit(to_uint8(image)) if kind != "small" else Image.fromarray(to_uint8(image))
            if ext == "jpg":
                pil.convert("RGB" if pil.mode != "L" else "L").save(folder / f"{name}.jpg", quality=90)
            else:
                pil.save(folder / f"{name}.png", optimize=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in OUT.rglob('*') if p.is_file())} images, {total / 1024:.0f} KiB -> {OUT}")


if __name__ == "__main__":
    main()
