"""HTTP service: functional tests (TestClient), a real uvicorn process on loopback, a bounded
load test with 32 concurrent clients, and bad inputs."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from arrowvision import VisionEncoder
from arrowvision.service import ServiceConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO, backend="torch")


@pytest.fixture(scope="module")
def client(encoder):
    config = ServiceConfig(max_body_bytes=2_000_000, max_pixels=4_000_000, max_batch_items=8)
    with TestClient(create_app(encoder, config)) as test_client:
        yield test_client


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_embed_multipart_and_json_match_direct_encode(client, encoder):
    data = SAMPLES[0].read_bytes()
    expected = encoder.encode([data])[0]
    multipart = client.post("/v1/embed", files={"file": ("a.jpg", data, "image/jpeg")})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert body["dim"] == encoder.embedding_dim and body["model_checksum"] == encoder.checksum
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    np.testing.assert_allclose(body["embedding"], expected, atol=1e-5)
    as_json = client.post("/v1/embed", json={"image": base64.b64encode(data).decode(), "normalize": False})
    raw = np.asarray(as_json.json()["embedding"])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3  # not normalized on request
    np.testing.assert_allclose(raw / np.linalg.norm(raw), expected, atol=1e-5)


def test_sketch_option(client, encoder):
    from arrowvision.preprocess import normalize_sketch

    canvas = np.full((64, 64, 3), 0, np.uint8)
    canvas[20:40, 30:34] = 255  # a light stroke on dark
    response = client.post("/v1/embed?sketch=true", files={"file": ("s.png", png_bytes(canvas), "image/png")})
    np.testing.assert_allclose(response.json()["embedding"], encoder.encode([normalize_sketch(canvas)])[0], atol=1e-5)


def test_batch_endpoint_reports_per_item_errors(client, encoder):
    good = [base64.b64encode(p.read_bytes()).decode() for p in SAMPLES[:3]]
    payload = {"images": [good[0], base64.b64encode(b"garbage").decode(), good[1], "%%not-base64%%", good[2]]}
    response = client.post("/v1/embed/batch", json=payload)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [("embedding" in r) for r in results] == [True, False, True, False, True]
    assert results[1]["status"] == 422 and "not an image" in results[1]["error"]
    expected = encoder.encode([p.read_bytes() for p in SAMPLES[:3]])
    np.testing.assert_allclose([results[i]["embedding"] for i in (0, 2, 4)], expected, atol=1e-5)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in SAMPLES[:2]]
    assert len(client.post("/v1/embed/batch", files=files).json()["results"]) == 2


def test_health_metrics_and_openapi(client):
    health = client.get("/health").json()
    assert health["model_loaded"] and health["backend"] == "torch" and health["status"] == "ok"
    client.post("/v1/embed", files={"file": ("a.jpg", SAMPLES[1].read_bytes(), "image/jpeg")})
    metrics = client.get("/metrics").text
    assert 'arrowvision_requests_total{endpoint="/v1/embed",status="200"}' in metrics
    for name in ("arrowvision_request_latency_seconds_bucket", "arrowvision_batch_size_bucket", "arrowvision_queue_depth"):
        assert name in metrics
    paths = client.get("/openapi.json").json()["paths"]
    for path, field in (("/v1/embed", "image"), ("/v1/embed/batch", "images")):
        content = paths[path]["post"]["requestBody"]["content"]  # request bodies documented
        assert set(content) == {"multipart/form-data", "application/json"}
        assert field in content["application/json"]["schema"]["properties"]


def test_data_uris_are_accepted(client, encoder):
    data = SAMPLES[0].read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    response = client.post("/v1/embed", json={"image": uri})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embedding"], encoder.encode([data])[0], atol=1e-5)
    batch = client.post("/v1/embed/batch", json={"images": [uri, "data:image/png;base64,%%%"]}).json()["results"]
    assert "embedding" in batch[0] and batch[1]["status"] == 422


def test_every_error_has_one_body_shape(client):
    for response in (client.get("/v1/embed"), client.get("/nowhere"), client.post("/health"),
                     client.post("/v1/embed", content=b"x", headers={"content-type": "text/plain"})):
        assert response.status_code in (404, 405, 415), response.status_code
        assert set(response.json()) == {"error"} and response.json()["error"], response.text
    assert client.get("/v1/embed").headers["allow"] == "POST"


def test_bad_inputs_get_clear_status_and_service_keeps_serving(client):
    jpeg = SAMPLES[2].read_bytes()
    cases = [
        (dict(files={"file": ("g.jpg", os.urandom(300), "image/jpeg")}), 422),
        (dict(files={"file": ("t.jpg", jpeg[: len(jpeg) // 4], "image/jpeg")}), 422),
        (dict(files={"file": ("huge.png", png_bytes(np.zeros((2500, 2000), np.uint8)), "image/png")}), 413),  # 5 Mpx > 4 Mpx
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415),
        (dict(content=b"", headers={"content-type": "application/json"}), 422),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422),
        (dict(json={"image": "%%%"}), 422),
        (dict(content=b"x" * 2_100_000, headers={"content-type": "application/json"}), 413),
        (dict(files={"file": ("e.jpg", b"", "image/jpeg")}), 422),
    ]
    for kwargs, status in cases:
        response = client.post("/v1/embed", **kwargs)
        assert response.status_code == status, (kwargs.get("headers"), response.status_code, response.text)
        assert "error" in response.json()
    too_many = {"images": [base64.b64encode(jpeg).decode()] * 9}
    assert client.post("/v1/embed/batch", json=too_many).status_code == 413
    assert client.post("/v1/embed", files={"file": ("ok.jpg", jpeg, "image/jpeg")}).status_code == 200


def test_full_queue_answers_503_with_retry_after(encoder):
    slow = VisionEncoder(encoder.weights, _SlowBackend(encoder.backend), encoder.config)
    config = ServiceConfig(max_queue=2, max_batch=1, max_wait_ms=0)
    payload = {"image": base64.b64encode(SAMPLES[0].read_bytes()).decode()}

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/v1/embed", json=payload) for _ in range(12)))

    app = create_app(slow, config)
    responses = asyncio.run(_with_lifespan(app, burst))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and 503 in statuses and set(statuses) <= {200, 503}
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)


def test_request_timeout_is_504_and_service_recovers(encoder):
    slow = VisionEncoder(encoder.weights, _SlowBackend(encoder.backend), encoder.config)
    with TestClient(create_app(slow, ServiceConfig(request_timeout_s=0.05))) as test_client:
        data = SAMPLES[0].read_bytes()
        response = test_client.post("/v1/embed", files={"file": ("a.jpg", data, "image/jpeg")})
        assert response.status_code == 504 and "timed out" in response.json()["error"]
        time.sleep(0.3)  # the abandoned batch finishes; nothing is left waiting
        assert test_client.get("/health").json()["status"] == "ok"


class _SlowBackend:
    name = "slow"

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, pixels):
        time.sleep(0.2)
        return self.inner(pixels)


async def _with_lifespan(app, body):
    async with app.router.lifespan_context(app):
        return await body()


# ------------------------------------------------------------------------- real uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "ARROWVISION_CACHE": str(tmp_path_factory.mktemp("cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--weights", str(DEMO), "--backend", "openvino",
                             "--port", str(port), "--max-batch", "16", "--max-wait-ms", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_load_32_concurrent_clients(server):
    base, _ = server
    reference = VisionEncoder.from_parquet(DEMO, backend="torch")
    payloads = [p.read_bytes() for p in SAMPLES]
    expected = reference.encode(payloads)

    async def client_loop(http: httpx.AsyncClient, worker: int, results: list):
        for i in range(10):  # 32 clients x 10 requests: bounded
            index = (worker + i) % len(payloads)
            response = await http.post(f"{base}/v1/embed", files={"file": ("x.jpg", payloads[index], "image/jpeg")})
            results.append((index, response.status_code, response.json()))

    async def run():
        results: list = []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.gather(*(client_loop(http, w, results) for w in range(32)))
        return results

    started = time.perf_counter()
    results = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert len(results) == 320
    statuses = [status for _, status, _ in results]
    assert all(status in (200, 503) for status in statuses), set(statuses)
    assert statuses.count(200) >= 300
    for index, status, body in results:
        if status == 200:
            assert np.abs(np.asarray(body["embedding"]) - expected[index]).max() < 1e-4
    metrics = httpx.get(f"{base}/metrics").text
    count = float(re.search(r"^arrowvision_batch_size_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^arrowvision_batch_size_sum (\S+)", metrics, re.M).group(1))
    assert total >= statuses.count(200) and total / count > 1.5, (total, count)  # requests were batched
    print(f"\n320 requests, 32 clients: {320 / elapsed:.0f} req/s, mean batch {total / count:.1f}")


def test_bad_inputs_against_real_server_then_graceful_shutdown(server):
    base, proc = server
    assert httpx.post(f"{base}/v1/embed", content=os.urandom(1000), headers={"content-type": "image/jpeg"}).status_code == 415
    assert httpx.post(f"{base}/v1/embed", files={"file": ("x.jpg", b"\xff\xd8\xff" + os.urandom(100))}).status_code == 422
    big = b"0" * (21 * 1024 * 1024)
    assert httpx.post(f"{base}/v1/embed", content=big, headers={"content-type": "application/json"}).status_code == 413
    assert httpx.get(f"{base}/health").json()["backend"] == "openvino"

    async def in_flight_then_stop():
        async with httpx.AsyncClient(timeout=60) as http:
            requests = [asyncio.create_task(http.post(f"{base}/v1/embed", files={"file": ("a.jpg", SAMPLES[0].read_bytes())}))
                        for _ in range(8)]
            await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*requests, return_exceptions=True)

    results = asyncio.run(in_flight_then_stop())
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert answered and all(r.status_code in (200, 503) for r in answered)
    assert any(r.status_code == 200 for r in answered)  # in-flight requests were drained, not dropped
    # uvicorn finishes the shutdown, then re-raises SIGTERM so the exit status names the signal
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "Application shutdown complete" in log
    assert re.search(r"arrowvision serving \S+siglip-demo-random.parquet \(siglip, dim 128\) with openvino fp32 on CPU", log)
    assert '"POST /v1/embed HTTP/1.1" 200' in log  # access log
