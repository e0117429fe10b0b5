"""Service: image URLs in every endpoint (against a real photo server), and model profiles
(several models side by side, lazily loaded, LRU-bounded, each with its own batcher)."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import arrowvision
from arrowvision import VisionEncoder
from arrowvision.inputs import urlfetch
from arrowvision.model.convert import convert
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig
from arrowvision.service.profiles import ModelRegistry, ModelSpec, describe_weights

from .servers import PHOTOS, SAMPLES, LiveService, PhotoServer
from .textkit import save_full_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
OPEN = ServiceConfig(allow_private_urls=True, max_body_bytes=2_000_000, url_timeout_s=3, max_wait_ms=2)


@pytest.fixture(scope="module")
def photos():
    with PhotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def demo() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO, backend="torch")


@pytest.fixture(scope="module")
def clip_all(tmp_path_factory) -> Path:
    """A CLIP checkpoint with both towers (its own family, dimension and text tower)."""
    folder = save_full_checkpoint(tmp_path_factory.mktemp("clip"), "clip", seed=11)
    convert(str(folder), folder / "clip-all.parquet", tower="all", progress=False)
    return folder / "clip-all.parquet"


@pytest.fixture(scope="module")
def clip_model(clip_all):
    return arrowvision.ImageTextModel.from_parquet(clip_all)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- image URLs


def test_image_url_matches_base64_in_embed_and_batch(demo, photos):
    with TestClient(create_app(demo, OPEN)) as client:
        data = PHOTOS[SAMPLES[1].name]
        by_url = client.post("/v1/embed", json={"image_url": photos.photo(1)})
        assert by_url.status_code == 200, by_url.text
        body = by_url.json()
        np.testing.assert_allclose(body["embedding"], demo.encode([data])[0], atol=1e-5)
        assert body["model"] == "siglip-demo-random" and body["processing_time_ms"] > 0 and "fetch" in body["timing_ms"]
        assert client.post("/v1/embed", json={"image": photos.photo(1)}).json()["embedding"] == body["embedding"]  # URL in 'image'

        batch = client.post("/v1/embed/batch", json={
            "images": [b64(PHOTOS[SAMPLES[0].name])],
            "image_urls": [photos.photo(2), photos.url("/missing"), photos.url("/streamed-big?bytes=3000000"),
                           "file:///etc/passwd", photos.url("/page.html")]}).json()
        results = batch["results"]
        assert [r.get("status", 200) for r in results] == [200, 200, 422, 413, 422, 422]
        np.testing.assert_allclose([results[0]["embedding"], results[1]["embedding"]],
                                   demo.encode([PHOTOS[SAMPLES[0].name], PHOTOS[SAMPLES[2].name]]), atol=1e-5)
        assert "404" in results[2]["error"] and "not an http(s) URL" in results[4]["error"]
        assert "not an image" in results[5]["error"] and "text/html" in results[5]["error"]

        for payload, status, message in (
            ({"image_url": photos.url("/declared-big")}, 413, "larger than the 2000000 bytes"),
            ({"image_url": "not a url"}, 422, "must be an http(s) URL"),
            ({"image_url": photos.url("/missing")}, 422, "the server answered 404"),
            ({"image": "x", "image_url": photos.photo(0)}, 422, "exactly one"),
        ):
            response = client.post("/v1/embed", json=payload)
            assert response.status_code == status and message in response.json()["error"], response.text
        metrics = client.get("/metrics").text
        assert re.search(r'arrowvision_url_fetches_total\{outcome="ok"\} [1-9]', metrics)
        assert re.search(r'arrowvision_url_fetches_total\{outcome="UrlTooLarge"\} [1-9]', metrics)
        assert 'arrowvision_requests_total{endpoint="/v1/embed",model="siglip-demo-random",status="413"}' in metrics


def test_guard_is_on_by_default_in_the_service(demo, photos, monkeypatch):
    real = urlfetch.refused_reason
    monkeypatch.setattr(urlfetch, "refused_reason", lambda address: None if address == "127.0.0.2" else real(address))
    with TestClient(create_app(demo, ServiceConfig())) as client, PhotoServer("127.0.0.2") as public:
        for url, reason in ((photos.photo(0), "127.0.0.1 is a loopback address"),
                            ("http://169.254.169.254/latest/meta-data/", "link-local"),
                            (public.url(f"/redirect?to={photos.photo(0)}"), "127.0.0.1 is a loopback address")):
            response = client.post("/v1/embed", json={"image_url": url})
            assert response.status_code == 403 and reason in response.json()["error"], response.text
        assert client.post("/v1/embed", json={"image_url": public.photo(0)}).status_code == 200  # a 'public' host works


def test_score_with_image_url_and_the_evaluation_api_shape(clip_model, photos):
    data = PHOTOS["chelsea.jpg"] if "chelsea.jpg" in PHOTOS else PHOTOS[SAMPLES[0].name]
    name = "chelsea.jpg" if "chelsea.jpg" in PHOTOS else SAMPLES[0].name
    with TestClient(create_app(clip_model.vision, OPEN, clip_model, name="fast")) as client:
        texts = ["a photo of a cat", "a dog"]
        by_url = client.post("/v1/score", json={"image_url": photos.url(f"/photos/{name}"), "texts": texts}).json()
        np.testing.assert_allclose(by_url["logits"], clip_model.logits([data], texts)[0], atol=1e-4)
        reference = client.post("/v1/score", json={"image_input": photos.url(f"/photos/{name}"), "text_prompt": texts[0],
                                                   "model_config_name": "fast"})
        assert reference.status_code == 200, reference.text
        body = reference.json()
        assert body["model_used"] == "fast" and body["model"] == "fast" and body["processing_time_ms"] > 0
        assert isinstance(body["clip_score"], float)
        assert body["clip_score"] == pytest.approx(float(clip_model.clip_score([data], texts[:1])[0]), abs=1e-3)
        as_base64 = client.post("/v1/score", json={"image_input": b64(data), "text_prompt": texts[0]}).json()
        assert as_base64["clip_score"] == pytest.approx(body["clip_score"], abs=1e-4)
        blocked = client.post("/v1/score", json={"image_url": photos.url("/missing"), "texts": texts})
        assert blocked.status_code == 422 and "404" in blocked.json()["error"]
        unknown = client.post("/v1/score", json={"image_input": b64(data), "text_prompt": "x", "model_config_name": "slow"})
        assert unknown.status_code == 404 and "unknown model 'slow'" in unknown.json()["error"]


def test_a_trickling_url_times_out_alone_on_the_live_service(demo, photos):
    """1 byte/s: that request gets its timeout (a 4xx naming it); requests sent meanwhile are answered
    while it is still pending."""
    from dataclasses import replace

    app = create_app(demo, replace(OPEN, url_timeout_s=8))
    order: list[str] = []

    async def scenario(base: str):
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async def call(label: str, payload: dict):
                response = await http.post("/v1/embed", json=payload)
                order.append(label)
                return response

            await call("warm-up", {"image": b64(PHOTOS[SAMPLES[0].name])})
            slow = asyncio.create_task(call("trickle", {"image_url": photos.url("/trickle")}))
            await asyncio.sleep(0.2)
            others = [call(f"photo{i}", {"image_url": photos.photo(i % len(SAMPLES))}) for i in range(6)]
            others.append(call("base64", {"image": b64(PHOTOS[SAMPLES[0].name])}))
            answered = await asyncio.gather(*others)
            assert not slow.done()  # the others did not wait for the trickle
            return await slow, answered

    with LiveService(app) as base:
        slow, others = asyncio.run(scenario(base))
    assert slow.status_code == 422 and "timed out" in slow.json()["error"], slow.text
    assert all(r.status_code == 200 for r in others)
    assert order[-1] == "trickle"


# ----------------------------------------------------------------------------- profiles


def two_models(demo, clip_all, max_loaded=None, loads=None) -> ModelRegistry:
    def load_clip():
        if loads is not None:
            loads.append("accurate")
        model = arrowvision.ImageTextModel.from_parquet(clip_all)
        return model.vision, model

    def load_demo():
        if loads is not None:
            loads.append("fast")
        return demo, None

    return ModelRegistry([ModelSpec("fast", load_demo, str(DEMO), "torch", describe_weights(str(DEMO))),
                          ModelSpec("accurate", load_clip, str(clip_all), "torch", describe_weights(str(clip_all)))],
                         default="fast", max_loaded=max_loaded)


def test_two_models_side_by_side_answer_as_each_alone(demo, clip_all, clip_model):
    data = [PHOTOS[p.name] for p in SAMPLES[:3]]
    alone = {}
    for name, app in (("fast", create_app(demo, OPEN, name="fast")),
                      ("accurate", create_app(clip_model.vision, OPEN, clip_model, name="accurate"))):
        with TestClient(app) as client:
            alone[name] = [client.post("/v1/embed", json={"image": b64(d)}).json()["embedding"] for d in data]
            if name == "accurate":
                alone["text"] = client.post("/v1/embed/text", json={"texts": ["a cat", "a dog"]}).json()["embeddings"]

    app = create_app(two_models(demo, clip_all), OPEN)

    async def together():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            calls = [http.post("/v1/embed", json={"image": b64(d), "model": name}) for name in ("fast", "accurate") for d in data]
            calls.append(http.post("/v1/embed", json={"image": b64(data[0])}))  # the default model
            calls.append(http.post("/v1/embed/text", json={"texts": ["a cat", "a dog"], "model": "accurate"}))
            responses = await asyncio.gather(*calls)
            listing = (await http.get("/v1/models")).json()
            metrics = (await http.get("/metrics")).text
            unknown = await http.post("/v1/embed", json={"image": b64(data[0]), "model": "nope"})
            no_text = await http.post("/v1/embed/text", json={"texts": ["a"], "model": "fast"})
        return responses, listing, metrics, unknown, no_text

    responses, listing, metrics, unknown, no_text = asyncio.run(together())
    bodies = [r.json() for r in responses]
    assert [b["model"] for b in bodies] == ["fast"] * 3 + ["accurate"] * 3 + ["fast", "accurate"]
    np.testing.assert_allclose([b["embedding"] for b in bodies[:3]], alone["fast"], atol=1e-6)
    np.testing.assert_allclose([b["embedding"] for b in bodies[3:6]], alone["accurate"], atol=1e-6)
    np.testing.assert_allclose(bodies[6]["embedding"], alone["fast"][0], atol=1e-6)
    np.testing.assert_allclose(bodies[7]["embeddings"], alone["text"], atol=1e-6)
    assert bodies[0]["dim"] == 128 and bodies[3]["dim"] == clip_model.vision.embedding_dim != 128

    rows = {row["id"]: row for row in listing["data"]}
    assert listing["default"] == "fast" and set(rows) == {"fast", "accurate"}
    assert rows["fast"]["family"] == "siglip" and rows["fast"]["towers"] == ["vision"] and rows["fast"]["dim"] == 128
    assert rows["accurate"]["family"] == "clip" and rows["accurate"]["towers"] == ["vision", "text"]
    assert rows["accurate"]["backend"] == "torch" and rows["accurate"]["loaded"] is True
    for model in ("fast", "accurate"):  # every model its own batcher and metrics
        assert re.search(rf'arrowvision_batch_size_count\{{model="{model}"\}} [1-9]', metrics), model
        assert f'arrowvision_requests_total{{endpoint="/v1/embed",model="{model}",status="200"}}' in metrics
    assert unknown.status_code == 404 and "serves fast, accurate" in unknown.json()["error"]
    assert no_text.status_code == 422 and "no text tower" in no_text.json()["error"]


def test_models_load_lazily_into_a_bounded_lru(demo, clip_all):
    loads: list[str] = []
    app = create_app(two_models(demo, clip_all, max_loaded=1, loads=loads), OPEN)
    payload = {"image": b64(PHOTOS[SAMPLES[0].name])}
    with TestClient(app) as client:
        assert loads == ["fast"]  # the default model loads at start, the other on first use
        listing = {row["id"]: row["loaded"] for row in client.get("/v1/models").json()["data"]}
        assert listing == {"fast": True, "accurate": False}
        first = client.post("/v1/embed", json={**payload, "model": "accurate"}).json()["embedding"]
        assert loads == ["fast", "accurate"]
        listing = {row["id"]: row["loaded"] for row in client.get("/v1/models").json()["data"]}
        assert listing == {"fast": False, "accurate": True}  # at most one loaded: fast was retired
        assert client.post("/v1/embed", json=payload).status_code == 200  # fast again: loaded again
        again = client.post("/v1/embed", json={**payload, "model": "accurate"}).json()["embedding"]
        assert loads == ["fast", "accurate", "fast", "accurate"]
        np.testing.assert_allclose(again, first, atol=1e-6)
        health = client.get("/health").json()
        assert health["models"] == {"fast": False, "accurate": True} and health["model"] == "fast"


def test_a_model_that_fails_to_load_is_a_503_and_the_others_keep_serving(demo):
    def broken():
        raise MemoryError("no room for this one")

    registry = ModelRegistry([ModelSpec("fast", lambda: (demo, None), str(DEMO), "torch", describe_weights(str(DEMO))),
                              ModelSpec("huge", broken, "huge.parquet", "torch", {"family": "siglip"})])
    with TestClient(create_app(registry, OPEN)) as client:
        response = client.post("/v1/embed", json={"image": b64(PHOTOS[SAMPLES[0].name]), "model": "huge"})
        assert response.status_code == 503 and "huge failed to load: no room" in response.json()["error"]
        assert response.headers["retry-after"]
        assert client.post("/v1/embed", json={"image": b64(PHOTOS[SAMPLES[0].name])}).status_code == 200
        rows = {row["id"]: row for row in client.get("/v1/models").json()["data"]}
        assert "MemoryError" in rows["huge"]["error"] and client.get("/health").status_code == 200
