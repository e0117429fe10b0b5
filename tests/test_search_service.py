"""`serve --index`: POST /v1/search (image, sketch, text), GET /v1/thumbnail (indexed images only,
hostile paths refused), the page at /, and refusing another model's index."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import arrowvision
from arrowvision.cli import main
from arrowvision.datasets.pipeline import embed_paths
from arrowvision.errors import IndexMismatch
from arrowvision.inputs.preprocess import normalize_sketch
from arrowvision.model.convert import convert
from arrowvision.search import index as vindex
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig
from arrowvision.service.search import read_thumbnail_source

from .textkit import save_full_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "arrowvision" / "samples"
DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
NAMES = ("horse", "coffee", "chelsea", "rocket", "astronaut", "camera")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_full_checkpoint(tmp_path_factory.mktemp("siglip"), "siglip", seed=41)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, model) -> Path:
    """Sample photos embedded with the tiny image+text model, indexed; the folder of images is
    inside ``root`` beside a secret file that is not indexed."""
    root = tmp_path_factory.mktemp("served")
    images = root / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(SAMPLES / f"{name}.jpg", images / f"{name}.jpg")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "secret.png")  # an image, never indexed
    embed_paths(model.vision, sorted(str(p) for p in images.iterdir()), root / "emb", progress=False, chunk_size=4)
    vindex.build(root / "emb")
    return root


@pytest.fixture(scope="module")
def client(model, corpus):
    index = vindex.VectorIndex.open(corpus / "emb", model_checksum=model.vision.checksum)
    with TestClient(create_app(model.vision, ServiceConfig(max_text_chars=100), model, index)) as test_client:
        yield test_client


def image_path(corpus: Path, name: str) -> str:
    return str((corpus / "images" / f"{name}.jpg").resolve())


def test_an_indexed_photo_finds_itself_first_at_one(client, corpus):
    for name in ("horse", "chelsea"):
        data = (corpus / "images" / f"{name}.jpg").read_bytes()
        by_form = client.post("/v1/search", files={"file": (f"{name}.jpg", data)}, data={"k": "3"})
        by_json = client.post("/v1/search", json={"image": base64.b64encode(data).decode(), "k": 3})
        for response in (by_form, by_json):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["query"] == "image" and len(body["results"]) == 3
            assert body["results"][0] == {"path": image_path(corpus, name), "score": pytest.approx(1.0, abs=1e-5)}
            assert body["results"][1]["score"] < 1.0
        assert by_form.json()["results"] == by_json.json()["results"]


def test_sketch_and_text_queries_match_the_model_and_index(client, corpus, model):
    index = vindex.VectorIndex.open(corpus / "emb")
    drawing = np.full((64, 64, 3), 255, np.uint8)
    drawing[20:44, 30:34] = 0  # a dark bar on white
    png = io.BytesIO()
    Image.fromarray(drawing).save(png, format="PNG")
    response = client.post("/v1/search", files={"file": ("sketch.png", png.getvalue())}, data={"sketch": "true", "k": "4"})
    assert response.status_code == 200, response.text
    expected = index.search(model.encode_images([normalize_sketch(drawing)])[0], 4)
    got = response.json()
    assert got["query"] == "sketch"
    assert [r["path"] for r in got["results"]] == [p for _, p in expected]
    np.testing.assert_allclose([r["score"] for r in got["results"]], [s for s, _ in expected], atol=1e-4)
    for text in ("a photo of a cat", "a horse standing in a green field"):
        response = client.post("/v1/search", json={"text": text, "k": 5})
        assert response.status_code == 200, response.text
        expected = index.search(model.encode_texts([text])[0], 5)
        assert [r["path"] for r in response.json()["results"]] == [p for _, p in expected]
        np.testing.assert_allclose([r["score"] for r in response.json()["results"]], [s for s, _ in expected], atol=1e-4)
    form_text = client.post("/v1/search", files={"text": (None, "a photo of a cat")})
    assert form_text.status_code == 200 and form_text.json()["query"] == "text"


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"json": {}}, 422, "give exactly one query"),
    ({"json": {"text": "a cat", "image": "aGVsbG8="}}, 422, "give exactly one query"),
    ({"json": {"text": "   "}}, 422, "non-empty string"),
    ({"json": {"text": "x" * 101}}, 422, "the limit is 100"),
    ({"json": {"text": "a cat", "sketch": True}}, 422, "sketch=true applies to image queries"),
    ({"json": {"text": "a cat", "k": 0}}, 422, "between 1 and 100"),
    ({"json": {"text": "a cat", "k": "many"}}, 422, "must be an integer"),
    ({"json": {"image": "%%%"}}, 422, "not valid base64"),
    ({"json": {"image": base64.b64encode(b"not an image").decode()}}, 422, "image"),
    ({"json": ["text"]}, 422, "must be an object"),
    ({"content": b"{", "headers": {"content-type": "application/json"}}, 422, "malformed JSON"),
    ({"content": b"text=cat", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
])
def test_bad_search_requests_are_clear_errors(client, kwargs, status, message):
    response = client.post("/v1/search", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_thumbnail_serves_indexed_images_only(client, corpus):
    path = image_path(corpus, "horse")
    response = client.get("/v1/thumbnail", params={"path": path})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    original = Image.open(path)
    assert thumb.format == "JPEG" and max(thumb.size) == 256 and abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.02
    images = corpus / "images"
    hostile = [
        "", "/etc/passwd", "../../../../etc/passwd", str(corpus / "secret.png"),
        str(images / ".." / "secret.png"), str(images / ".." / "images" / "horse.jpg"),  # an indexed file, spelled otherwise
        str(images) + "//horse.jpg", str(images / "horse.jpg") + "/", str(images / "horse.jpg") + "\0.png",
        "images/horse.jpg", "horse.jpg", str(corpus / "emb" / "part-00000.parquet"), "%2e%2e/%2e%2e/etc/passwd",
        str(images).upper() + "/HORSE.JPG",
    ]
    for bad in hostile:
        response = client.get("/v1/thumbnail", params={"path": bad})
        assert response.status_code == 404, bad
        assert response.json() == {"error": "no such indexed image"}
    raw = client.get("/v1/thumbnail?path=" + str(images) + "/%2e%2e/secret.png")  # encoded by hand
    assert raw.status_code == 404
    assert client.get("/v1/thumbnail").status_code == 404


FLIPPER = """
import os, sys, time
images, real, outside, stop = sys.argv[1:]
flips = 0
while not os.path.exists(stop):
    os.replace(images, real)
    os.symlink(outside, images)
    time.sleep(0.0002)
    os.unlink(images)
    os.replace(real, images)
    flips += 1
    time.sleep(0.0002)
print(flips)
"""


def test_thumbnail_cannot_leave_the_index_while_a_folder_flips_to_a_symlink(client, corpus, tmp_path):
    """Another process flips the indexed folder between the real folder and a symlink to a
    look-alike folder outside the index (same names, other pictures) during 200 requests: every
    thumbnail served is the indexed picture's, none is from outside (404 while the link is there)."""
    import subprocess
    import sys

    images = corpus / "images"
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in NAMES:
        Image.new("RGB", (64, 48), (0, 255, 0)).save(outside / f"{name}.jpg")  # green: never indexed
    path = image_path(corpus, "coffee")
    real = client.get("/v1/thumbnail", params={"path": path})
    assert real.status_code == 200
    stop = tmp_path / "stop"
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(images), str(corpus / "images-real"), str(outside),
                                str(stop)], stdout=subprocess.PIPE, text=True)
    statuses, original, read = [], Path(path).read_bytes(), {"ok": 0, "refused": 0}
    try:
        for _ in range(200):
            response = client.get("/v1/thumbnail", params={"path": path})
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.content == real.content, "a thumbnail from outside the index was served"
            else:
                assert response.status_code == 404 and response.json() == {"error": "no such indexed image"}
        for _ in range(3000):  # the source reads alone, many more of them: the window between check and open
            try:
                assert read_thumbnail_source(path)[0] == original, "bytes from outside the index were read"
                read["ok"] += 1
            except OSError:
                read["refused"] += 1
    finally:
        stop.touch()
        flips = int(flipper.communicate(timeout=30)[0] or 0)
    assert images.is_dir() and not images.is_symlink()
    assert flips > 10 and statuses.count(200) > 0 and read["ok"] > 0 and read["refused"] > 0, (flips, statuses, read)


def test_thumbnail_refuses_a_symlink_or_fifo_planted_in_place_of_an_indexed_image(client, corpus):
    images = corpus / "images"
    target = images / "camera.jpg"
    assert client.get("/v1/thumbnail", params={"path": str(target)}).status_code == 200
    moved = corpus / "camera-real.jpg"
    os.replace(target, moved)
    try:
        os.symlink(corpus / "secret.png", target)  # the indexed path now points outside the images
        assert client.get("/v1/thumbnail", params={"path": str(target)}).status_code == 404
        target.unlink()
        os.mkfifo(target)  # would block a naive open()
        assert client.get("/v1/thumbnail", params={"path": str(target)}).status_code == 404
        target.unlink()
        target.write_bytes(b"not an image any more")
        assert client.get("/v1/thumbnail", params={"path": str(target)}).status_code == 404
    finally:
        target.unlink(missing_ok=True)
        os.replace(moved, target)
    # a folder on the way replaced by a symlink to a look-alike folder elsewhere
    elsewhere = corpus / "elsewhere"
    shutil.copytree(images, elsewhere)
    os.replace(images, corpus / "images-real")
    try:
        os.symlink(elsewhere, images)
        assert client.get("/v1/thumbnail", params={"path": image_path(corpus, "horse")}).status_code == 404
    finally:
        images.unlink()
        os.replace(corpus / "images-real", images)
        shutil.rmtree(elsewhere)
    assert client.get("/v1/thumbnail", params={"path": image_path(corpus, "horse")}).status_code == 200


def test_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for part in ('<canvas id="canvas"', 'id="pen"', 'id="eraser"', 'id="undo"', 'id="clear"', 'type="file"',
                 'type="search"', 'id="results"', '<label', 'name="viewport"'):
        assert part in page, part
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing from a CDN
    assert "default-src 'self'" in response.headers["content-security-policy"]
    info = client.get("/v1/search/info").json()
    assert info["rows"] == len(NAMES) and info["kind"] == "exact" and info["text"] is True


def test_the_service_follows_index_updates_without_a_restart(client, corpus, model):
    extra = corpus / "images" / "immunohistochemistry.jpg"
    shutil.copy(SAMPLES / "immunohistochemistry.jpg", extra)
    try:
        embed_paths(model.vision, [str(extra)], corpus / "emb", progress=False)
        vindex.update(corpus / "emb")
        assert client.get("/v1/search/info").json()["rows"] == len(NAMES) + 1
        found = client.post("/v1/search", files={"file": ("q.jpg", extra.read_bytes())}, data={"k": "1"}).json()
        assert found["results"] == [{"path": str(extra.resolve()), "score": pytest.approx(1.0, abs=1e-5)}]
        assert client.get("/v1/thumbnail", params={"path": str(extra.resolve())}).status_code == 200
    finally:
        extra.unlink()


def test_text_search_needs_a_text_tower(corpus, tmp_path):
    encoder = arrowvision.VisionEncoder.from_parquet(DEMO)
    embed_paths(encoder, [str(SAMPLES / "horse.jpg"), str(SAMPLES / "coffee.jpg")], tmp_path / "emb", progress=False)
    vindex.build(tmp_path / "emb")
    with TestClient(create_app(encoder, None, None, vindex.VectorIndex.open(tmp_path / "emb"))) as client:
        response = client.post("/v1/search", json={"text": "a horse"})
        assert response.status_code == 422 and "no text tower" in response.json()["error"]
        assert client.get("/v1/search/info").json()["text"] is False
        assert client.post("/v1/search", files={"file": ("h.jpg", (SAMPLES / "horse.jpg").read_bytes())}).status_code == 200


def test_another_models_index_is_refused_at_start(model, corpus, capsys):
    demo = arrowvision.VisionEncoder.from_parquet(DEMO)
    index = vindex.VectorIndex.open(corpus / "emb")
    with pytest.raises(IndexMismatch, match="indexed embeddings come from model"):
        create_app(demo, None, None, index)
    code = main(["serve", "--weights", str(DEMO), "--backend", "torch", "--index", str(corpus / "emb"), "--port", "0"])
    assert code == 1
    error = capsys.readouterr().err
    assert "was embedded with model" in error and "serve the weights that embedded it" in error and "Traceback" not in error


def test_demo_serve_prints_the_url_and_serves_the_page(tmp_path):
    import re
    import signal
    import subprocess
    import sys

    import httpx

    env = {**os.environ, "ARROWVISION_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "arrowvision", "demo", "--serve", "--backend", "torch", "--port", "0",
                                "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in process.stdout:  # the demo table first, then the URL
            if match := re.match(r"search page: (http://127\.0\.0\.1:\d+/)", line):
                url = match.group(1)
                break
        assert url, process.stderr.read()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo service did not become healthy"
            time.sleep(0.1)
        assert "<canvas" in httpx.get(url).text
        info = httpx.get(url + "v1/search/info").json()
        assert info["rows"] == len(list(SAMPLES.glob("*.jpg"))) and info["text"] is False  # the demo model is vision-only
        horse = SAMPLES / "horse.jpg"
        found = httpx.post(url + "v1/search", files={"file": ("horse.jpg", horse.read_bytes())}, data={"k": "2"}, timeout=30).json()
        assert found["results"][0] == {"path": str(horse.resolve()), "score": pytest.approx(1.0, abs=1e-5)}
        assert httpx.get(url + "v1/thumbnail", params={"path": str(horse.resolve())}).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn drains, then re-raises SIGTERM
