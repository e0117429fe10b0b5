"""Service text endpoints: /v1/embed/text and /v1/score, limits, micro-batching, metrics, OpenAPI."""

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
from arrowvision.model.convert import convert
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig

from .textkit import AWKWARD, SENTENCES, save_full_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "arrowvision" / "samples"
CONFIG = ServiceConfig(max_texts=8, max_text_chars=200, max_wait_ms=20)


@pytest.fixture(scope="module", params=["siglip", "clip"])
def model(request, tmp_path_factory):
    folder = save_full_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=31)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model.vision, CONFIG, model)) as test_client:
        yield test_client


def test_embed_text_matches_direct_encode(client, model):
    texts = SENTENCES[:3] + AWKWARD[:4]
    response = client.post("/v1/embed/text", json={"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == model.text.embedding_dim and body["model_checksum"] == model.checksum
    np.testing.assert_allclose(body["embeddings"], model.encode_texts(texts), atol=1e-5)
    raw = client.post("/v1/embed/text", json={"texts": texts[:1], "normalize": False}).json()["embeddings"]
    np.testing.assert_allclose(raw, model.text.encode(texts[:1], normalize=False), atol=1e-5)


def test_score_matches_the_model(client, model):
    data = (SAMPLES / "chelsea.jpg").read_bytes()
    texts = ["a photo of a cat", "a dog", "a cup of coffee"]
    response = client.post("/v1/score", json={"image": base64.b64encode(data).decode(), "texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    np.testing.assert_allclose(body["logits"], model.logits([data], texts)[0], atol=1e-4)
    np.testing.assert_allclose(body["probabilities"], model.probabilities([data], texts)[0], atol=1e-5)
    np.testing.assert_allclose(body["clip_score"], model.clip_score([data] * 3, texts), atol=1e-3)


@pytest.mark.parametrize(("payload", "status", "message"), [
    ({"texts": ["x"] * 9}, 413, "the limit is 8"),
    ({"texts": ["x" * 201]}, 422, "the limit is 200"),
    ({"texts": []}, 422, "non-empty list"),
    ({"texts": ["ok", 3]}, 422, "non-empty list"),
    ({"text": "a cat"}, 422, "'texts'"),
])
def test_text_limits_and_bad_requests(client, payload, status, message):
    response = client.post("/v1/embed/text", json=payload)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_score_bad_image_and_content_type(client):
    bad = client.post("/v1/score", json={"image": base64.b64encode(b"not an image").decode(), "texts": ["a"]})
    assert bad.status_code == 422 and "error" in bad.json()
    assert client.post("/v1/score", json={"image": "%%%", "texts": ["a"]}).status_code == 422
    assert client.post("/v1/embed/text", content=b"texts", headers={"content-type": "text/plain"}).status_code == 415


def test_concurrent_text_requests_share_model_calls(model):
    """Texts of concurrent requests are grouped: fewer model calls than texts, same answers."""
    app = create_app(model.vision, ServiceConfig(max_wait_ms=50, max_batch=32), model)
    texts = SENTENCES + AWKWARD[:6]
    expected = model.encode_texts(texts)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            responses = await asyncio.gather(*(http.post("/v1/embed/text", json={"texts": [t]}) for t in texts))
            metrics = (await http.get("/metrics")).text
        return responses, metrics

    responses, metrics = asyncio.run(run())
    got = np.array([r.json()["embeddings"][0] for r in responses])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    calls = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("arrowvision_text_batch_size_count{")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("arrowvision_texts_total{")))
    assert total == len(texts) and calls < len(texts)


def test_text_endpoints_in_metrics_openapi_and_health(client):
    client.post("/v1/embed/text", json={"texts": ["a"]})
    metrics = client.get("/metrics").text
    assert re.search(r'arrowvision_requests_total\{endpoint="/v1/embed/text",model="[^"]+",status="200"\}', metrics)
    assert "arrowvision_texts_total" in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/embed/text" in paths and "/v1/score" in paths
    assert client.get("/health").json()["text"] is True
