"""Decoding robustness and preprocessing parity with the HF image processors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from arrowvision import ImageError, ImageTooLarge
from arrowvision.inputs.preprocess import Preprocessor, load_image
from arrowvision.model.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [32, 224, 97])
def test_siglip_preprocessing_equals_hf(photos, size):
    import transformers as tf

    processor = tf.SiglipImageProcessorPil(size={"height": size, "width": size})
    ours = Preprocessor(size, SIGLIP_MEAN, SIGLIP_STD, center_crop=False)
    for name, photo in photos.items():
        theirs = processor(images=[photo], return_tensors="np")["pixel_values"][0]
        diff = np.abs(ours(photo) - theirs).max()
        assert diff == 0.0, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("size", [40, 224, 101])
def test_clip_preprocessing_equals_hf(photos, size):
    import transformers as tf

    processor = tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ours = Preprocessor(size, CLIP_MEAN, CLIP_STD, center_crop=True)
    tall = np.ascontiguousarray(photos["rocket"][:, :200])  # portrait aspect too
    for name, photo in {**photos, "tall": tall}.items():
        theirs = processor(images=[photo], return_tensors="np")["pixel_values"][0]
        diff = np.abs(ours(photo) - theirs).max()
        assert diff == 0.0, f"{name}: max abs diff {diff}"


def test_exif_orientation_is_applied(photos):
    photo = Image.fromarray(photos["chelsea"])  # 451 wide x 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(photo, "JPEG", exif=exif.tobytes())
    image = load_image(data)
    assert image.size == (300, 451)


def test_modes_become_rgb():
    gray = Image.fromarray(np.full((8, 9), 77, np.uint8), "L")
    assert np.asarray(load_image(encode(gray, "PNG")))[0, 0].tolist() == [77, 77, 77]

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel; the rest fully transparent
    rgb = np.asarray(load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert rgb[0, 0].tolist() == [200, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]

    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.asarray(load_image(encode(palette, "PNG")))[2, 2].tolist() == [10, 20, 30]

    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(load_image(encode(cmyk, "JPEG", quality=100)))[3, 3]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15

    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(load_image(encode(sixteen, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_arrays_as_input():
    assert load_image(np.zeros((5, 6), np.uint8)).size == (6, 5)
    assert load_image(np.zeros((5, 6, 4), np.uint8)).mode == "RGB"
    with pytest.raises(ImageError, match="dtype float64"):
        load_image(np.zeros((5, 6, 3)))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((5, 6, 7), np.uint8))


def test_bad_inputs_raise_image_error_naming_the_input(tmp_path, photos):
    jpeg = encode(Image.fromarray(photos["coffee"]), "JPEG")
    cases = {
        "empty.jpg": b"",
        "garbage.jpg": b"\x00\xffnot an image at all" * 10,
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "notes.png": b"just some text\n",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ImageError, match=name.replace(".", r"\.")):
            load_image(path)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)  # a few KB on disk, 400 Mpixels decoded
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLarge, match="bomb.png.*exceeds"):
        load_image(bomb)
    small_png = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageError, match="exceeds"):
        Preprocessor(8, SIGLIP_MEAN, SIGLIP_STD, False)(small_png, max_pixels=50)
    with pytest.raises(ImageError, match="exceeds"):
        load_image(np.zeros((100, 100), np.uint8), max_pixels=50)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    """A truncated file whose header declares too many pixels is refused as too large: the
    limit is applied before any decoding (a decode would fail as truncated instead)."""
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG")
    truncated = buffer.getvalue()[:200]  # header intact, pixel data cut
    with pytest.raises(ImageTooLarge, match="3000x3000 pixels exceeds the limit of 1,000,000"):
        load_image(truncated, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated"):
        load_image(truncated)  # within the default limit: it is decoded, and fails as truncated
