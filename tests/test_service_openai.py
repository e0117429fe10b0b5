"""OpenAI-compatible /v1/embeddings against the live service with the `openai` client (texts,
image URLs, data URIs; with an API key), and OpenTelemetry spans of a request."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

import arrowvision
from arrowvision import VisionEncoder
from arrowvision.service import tracing
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig
from arrowvision.service.security import SecurityConfig

from .servers import PHOTOS, SAMPLES, LiveService, PhotoServer

DEMO = Path(__file__).resolve().parents[1] / "weights" / "siglip-demo-random.parquet"
KEY = "sk-test-0123456789"
CONFIG = ServiceConfig(allow_private_urls=True, max_wait_ms=2)


@pytest.fixture(scope="module")
def model(siglip_all_parquet):
    return arrowvision.ImageTextModel.from_parquet(siglip_all_parquet)


@pytest.fixture(scope="module")
def photos():
    with PhotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def live(model):
    app = create_app(model.vision, CONFIG, model, name="siglip-tiny", security=SecurityConfig(api_key=KEY))
    with LiveService(app) as base:
        yield base


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("encoding", [None, "float"], ids=["client-default-base64", "float"])
def test_openai_client_embeds_texts_urls_and_data_uris(live, model, photos, encoding):
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    photo = PHOTOS[SAMPLES[0].name]
    inputs = ["a photo of a cat", photos.photo(0), data_uri(PHOTOS[SAMPLES[1].name]), "two dogs on a beach"]
    extra = {"encoding_format": encoding} if encoding else {}
    response = client.embeddings.create(model="siglip-tiny", input=inputs, **extra)
    assert response.model == "siglip-tiny" and [d.index for d in response.data] == [0, 1, 2, 3]
    got = np.array([d.embedding for d in response.data], np.float32)
    np.testing.assert_allclose(got[[0, 3]], model.encode_texts([inputs[0], inputs[3]]), atol=1e-5)
    np.testing.assert_allclose(got[[1, 2]], model.encode_images([photo, PHOTOS[SAMPLES[1].name]]), atol=1e-5)
    single = client.embeddings.create(model="siglip-tiny", input="a photo of a cat", **extra)
    np.testing.assert_allclose(single.data[0].embedding, got[0], atol=1e-6)
    assert 0 < single.usage.prompt_tokens < response.usage.prompt_tokens == response.usage.total_tokens  # texts only


def test_openai_client_errors(live, photos):
    client = openai.OpenAI(base_url=f"{live}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["siglip-tiny"]  # GET /v1/models is OpenAI-shaped too
    with pytest.raises(openai.NotFoundError, match="unknown model 'text-embedding-3-small'"):
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live}/v1", api_key="wrong", max_retries=0).embeddings.create(model="siglip-tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="token arrays are not supported"):
        client.embeddings.create(model="siglip-tiny", input=[[1, 2, 3]])
    with pytest.raises(openai.UnprocessableEntityError, match="the server answered 404"):
        client.embeddings.create(model="siglip-tiny", input=[photos.url("/missing")])


def test_embeddings_error_shapes_and_vision_only_models(photos):
    encoder = VisionEncoder.from_parquet(DEMO, backend="torch")
    with TestClient(create_app(encoder, ServiceConfig())) as client:  # guard on, no text tower
        blocked = client.post("/v1/embeddings", json={"model": "siglip-demo-random", "input": [photos.photo(0)]})
        assert blocked.status_code == 403
        error = blocked.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "loopback" in error["message"]
        text = client.post("/v1/embeddings", json={"input": ["a cat"]})  # no model: the default one
        assert text.status_code == 400 and "no text tower" in text.json()["error"]["message"]
        image = client.post("/v1/embeddings", json={"input": data_uri(PHOTOS[SAMPLES[2].name]), "dimensions": 128})
        assert image.status_code == 200 and image.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
        np.testing.assert_allclose(image.json()["data"][0]["embedding"], encoder.encode([PHOTOS[SAMPLES[2].name]])[0], atol=1e-5)
        for payload, status, message in (
            ({"input": []}, 400, "non-empty list"),
            ({"input": "data:image/png;base64,%%%"}, 400, "not a valid data:image"),
            ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
            ({"input": data_uri(b"x"), "dimensions": 64}, 400, "128 dimensions"),
        ):
            response = client.post("/v1/embeddings", json=payload)
            assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_spans_for_fetch_decode_queue_and_model_call(model, photos):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        with TestClient(create_app(model.vision, CONFIG, model)) as client:
            response = client.post("/v1/embed", json={"image_url": photos.photo(0)},
                                   headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-ID": "req-42"})
            assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
            assert len(client.get("/health").headers["x-request-id"]) == 32  # a fresh id when none is sent
            assert client.post("/v1/embed/text", json={"texts": ["a cat", "a dog"]}).status_code == 200
    finally:
        tracing.use_provider(None)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    request = spans["POST /v1/embed"]
    assert format(request.context.trace_id, "032x") == trace_id  # continues the caller's trace
    assert format(request.parent.span_id, "016x") == parent_id
    assert request.attributes["http.response.status_code"] == 200 and request.attributes["arrowvision.request_id"] == "req-42"
    for name in ("fetch", "decode", "queue wait", "model call"):
        assert spans[name].parent.span_id == request.context.span_id, name
        assert spans[name].context.trace_id == request.context.trace_id
    assert spans["fetch"].attributes["url.full"] == photos.photo(0)
    assert spans["fetch"].end_time <= spans["decode"].start_time <= spans["queue wait"].end_time <= spans["model call"].end_time
    text = spans["POST /v1/embed/text"]
    for name in ("text queue wait", "text model call"):
        assert spans[name].parent.span_id == text.context.span_id, name
    assert spans["text model call"].attributes["arrowvision.texts"] == 2
    assert not tracing.enabled()


def test_tracing_is_off_unless_the_otel_variables_ask():
    assert not tracing.tracing_requested({})
    assert not tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
