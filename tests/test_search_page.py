"""The search page in a real headless browser (Debian's /usr/bin/chromium driven by playwright;
playwright never downloads a browser here; .ci/run installs chromium on a fresh CI machine).

Draw strokes -> results appear; upload a photo -> its own thumbnail comes first; type text ->
the results change; keyboard only; a phone-sized viewport. A screenshot of each state is kept in
$ARROWVISION_TEST_ARTIFACTS (default: the test's tmp folder) and its path printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import arrowvision
from arrowvision.datasets.pipeline import embed_paths
from arrowvision.model.convert import convert
from arrowvision.search import index as vindex
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig

from .textkit import save_full_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "arrowvision" / "samples"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ARROWVISION_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "search-page"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service with the search page on a real port: a tiny SigLIP with a text tower, the
    sample photos embedded and indexed."""
    import uvicorn

    folder = save_full_checkpoint(tmp_path_factory.mktemp("siglip"), "siglip", seed=43)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    model = arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")
    images = tmp_path_factory.mktemp("images")
    for photo in SAMPLES.glob("*.jpg"):
        shutil.copy(photo, images / photo.name)
    embed_paths(model.vision, sorted(str(p) for p in images.iterdir()), images / "emb", progress=False)
    vindex.build(images / "emb")
    app = create_app(model.vision, ServiceConfig(), model, vindex.VectorIndex.open(images / "emb"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the service did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", images
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)"
        if os.environ.get("ARROWVISION_REQUIRE_BROWSER") == "1":  # set by .ci/run: CI always runs these tests
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def results(page) -> list[tuple[str, float]]:
    return page.eval_on_selector_all("#results li", "items => items.map(li => [li.dataset.path, Number(li.dataset.score)])")


def wait_for_query(page, label: str) -> None:
    page.wait_for_selector(f"#results[data-query='{label}'] li", timeout=30_000)


def thumbnails_loaded(page) -> bool:
    """The first three result thumbnails finished loading and decoded to real images."""
    deadline = time.monotonic() + 30
    while not page.eval_on_selector_all("#results img", "imgs => imgs.slice(0, 3).every(i => i.complete)"):
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.05)
    return page.eval_on_selector_all("#results img", "imgs => imgs.slice(0, 3).every(i => i.naturalWidth > 0)")


def shoot(page, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    assert path.stat().st_size > 1000


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
        page.mouse.up()


def test_draw_upload_and_type(server, browser, artifacts):
    url, images = server
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # under the page's own CSP
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")
    photos = len(list(SAMPLES.glob("*.jpg")))
    assert f"type a phrase to search {photos} indexed images" in page.inner_text("#about")
    shoot(page, artifacts, "0-ready")

    # draw two strokes (a house-like outline): results appear while/after drawing
    draw(page, [[(0.2, 0.8), (0.2, 0.4), (0.5, 0.15), (0.8, 0.4), (0.8, 0.8), (0.2, 0.8)], [(0.45, 0.8), (0.45, 0.6), (0.55, 0.6), (0.55, 0.8)]])
    wait_for_query(page, "sketch")
    sketch_hits = results(page)
    assert len(sketch_hits) == photos
    assert all(Path(p).parent == images.resolve() and -1 <= s <= 1 for p, s in sketch_hits)
    assert thumbnails_loaded(page)
    assert "results by sketch" in page.inner_text("#status")
    shoot(page, artifacts, "1-sketch")

    # clear, undo and the eraser act on the drawing
    pixels = "() => document.getElementById('canvas').toDataURL()"
    page.click("#clear")
    blank = page.evaluate(pixels)
    draw(page, [[(0.1, 0.1), (0.9, 0.9)]])
    inked = page.evaluate(pixels)
    assert inked != blank
    page.click("#undo")
    assert page.evaluate(pixels) == blank
    draw(page, [[(0.1, 0.1), (0.9, 0.9)]])
    assert page.evaluate(pixels) == inked
    page.click("#eraser")
    assert page.get_attribute("#eraser", "aria-pressed") == "true" and page.get_attribute("#pen", "aria-pressed") == "false"
    draw(page, [[(0.1, 0.1), (0.9, 0.9)]])  # erased along the same line
    assert page.evaluate(pixels) == blank
    page.keyboard.press("Control+z")  # undo the eraser stroke
    assert page.evaluate(pixels) == inked
    page.click("#pen")
    page.click("#clear")
    assert page.evaluate(pixels) == blank

    # upload a photo: its own thumbnail first, at cosine 1.0
    photo = images / "horse.jpg"
    page.set_input_files("#file", str(photo))
    wait_for_query(page, "photo")
    photo_hits = results(page)
    assert photo_hits[0][0] == str(photo.resolve()) and photo_hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert thumbnails_loaded(page)
    first = page.get_attribute("#results li:first-child img", "src")
    assert first == "/v1/thumbnail?path=" + page.evaluate("p => encodeURIComponent(p)", str(photo.resolve()))
    assert page.is_visible("#preview")
    shoot(page, artifacts, "2-photo")

    # type a phrase: the results change
    page.fill("#text", "a horse standing in a green field")
    wait_for_query(page, "text")
    text_hits = results(page)
    assert text_hits != photo_hits and len(text_hits) == len(photo_hits)
    assert thumbnails_loaded(page)
    shoot(page, artifacts, "3-text")
    page.fill("#text", "a cup of coffee on a wooden table")
    deadline = time.monotonic() + 30  # search as you type (debounced): the grid changes again
    while results(page) == text_hits:
        assert time.monotonic() < deadline, "typing another phrase did not change the results"
        time.sleep(0.05)
    assert not errors, errors
    page.close()


def test_keyboard_and_phone_viewport(server, browser, artifacts):
    url, _ = server
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, has_touch=True, is_mobile=True)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    assert page.locator("#canvas").bounding_box()["width"] <= 390
    for control in ("#pen", "#eraser", "#undo", "#clear", "#text"):  # every control is labelled
        name = page.evaluate("sel => { const e = document.querySelector(sel); return (e.labels && e.labels[0] && e.labels[0].textContent) || e.textContent; }", control)
        assert name.strip(), control
    focused = []
    for _ in range(12):  # Tab through the page: tools, file picker, text box
        page.keyboard.press("Tab")
        focused.append(page.evaluate("() => document.activeElement.id"))
        if focused[-1] == "text":
            break
    assert {"pen", "eraser", "undo", "clear", "file", "text"} <= set(focused), focused
    page.keyboard.type("a photo of a cat")
    page.keyboard.press("Enter")
    wait_for_query(page, "text")
    assert len(results(page)) > 0 and thumbnails_loaded(page)
    shoot(page, artifacts, "4-phone-keyboard")
    box = page.locator("#canvas").bounding_box()  # a finger on the canvas draws (a dot) and searches
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    wait_for_query(page, "sketch")
    page.close()
