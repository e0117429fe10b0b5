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
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from arrowvision import VisionEncoder
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig

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
    from arrowvision.inputs.preprocess import normalize_sketch

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
    health = client.get("/health")
    assert health.status_code == 200
    health = health.json()
    assert health["model_loaded"] is True and health["backend"] == "torch" and health["status"] == "ok"
    client.post("/v1/embed", files={"file": ("a.jpg", SAMPLES[1].read_bytes(), "image/jpeg")})
    metrics = client.get("/metrics").text
    assert 'arrowvision_requests_total{endpoint="/v1/embed",model="siglip-demo-random",status="200"}' in metrics
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


def test_pixel_limit_applies_before_decoding(client):
    """A header declaring 9 Mpx (limit 4 Mpx) with the pixel data cut off: 413 from the header,
    not 422 from a failed decode."""
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG")
    response = client.post("/v1/embed", files={"file": ("cut.png", buffer.getvalue()[:200], "image/png")})
    assert response.status_code == 413 and "3000x3000" in response.json()["error"], response.text


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


def test_health_reflects_the_model_state(encoder):
    """model_loaded is false before start-up, after a failed warm-up and after shutdown."""
    app = create_app(encoder)

    async def health():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get("/health")

    before = asyncio.run(health())  # the lifespan has not run: nothing warmed up yet
    assert before.status_code == 503 and before.json()["model_loaded"] is False and before.json()["status"] == "starting"
    during = asyncio.run(_with_lifespan(app, health))
    assert during.status_code == 200 and during.json()["model_loaded"] is True
    after = asyncio.run(health())
    assert after.status_code == 503 and after.json()["model_loaded"] is False and after.json()["status"] == "shutting down"

    broken = VisionEncoder(encoder.weights, _BrokenBackend(), encoder.config)
    with TestClient(create_app(broken)) as test_client:
        response = test_client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["model_loaded"] is False and body["status"] == "unavailable" and "out of memory" in body["error"]


class _BrokenBackend:
    name = "broken"

    def __call__(self, pixels):
        raise RuntimeError("out of memory")


@pytest.mark.parametrize("max_batch,expected_sizes", [(8, [1, 7]), (3, [1, 3, 3, 1])])
def test_requests_queued_while_the_model_runs_form_the_next_batches(max_batch, expected_sizes):
    """Deterministic batching: the first request holds the model until 7 more have queued."""
    from arrowvision.service.batching import MicroBatcher

    holding, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def run(pixels: np.ndarray) -> np.ndarray:
        sizes.append(len(pixels))
        if len(sizes) == 1:
            holding.set()
            assert release.wait(60)
        return pixels * 2

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=0, max_queue=64)
        batcher.start()
        first = asyncio.create_task(batcher.submit(np.zeros(3, np.float32)))
        assert await loop.run_in_executor(None, holding.wait, 60)
        rest = [asyncio.create_task(batcher.submit(np.full(3, i, np.float32))) for i in range(1, 8)]
        while batcher.queue.qsize() < 7:
            await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.drain(10)
        return results

    results = asyncio.run(scenario())
    assert sizes == expected_sizes
    for i, (vector, _seconds) in enumerate(results):  # every caller got its own row back
        np.testing.assert_array_equal(vector, np.full(3, 2 * i, np.float32))


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
    count = float(re.search(r"^arrowvision_batch_size_count\{[^}]*\} (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^arrowvision_batch_size_sum\{[^}]*\} (\S+)", metrics, re.M).group(1))
    # every answered request went through exactly one model call (batching itself is checked
    # deterministically in test_requests_queued_while_the_model_runs_form_the_next_batches)
    assert total == statuses.count(200) and 1 <= count <= total, (total, count)
    print(f"\n320 requests, 32 clients: {320 / elapsed:.0f} req/s, mean batch {total / count:.1f}")


def test_bad_inputs_against_real_server_then_clean_shutdown(server):
    base, proc = server
    assert httpx.post(f"{base}/v1/embed", content=os.urandom(1000), headers={"content-type": "image/jpeg"}).status_code == 415
    assert httpx.post(f"{base}/v1/embed", files={"file": ("x.jpg", b"\xff\xd8\xff" + os.urandom(100))}).status_code == 422
    big = b"0" * (21 * 1024 * 1024)
    assert httpx.post(f"{base}/v1/embed", content=big, headers={"content-type": "application/json"}).status_code == 413
    health = httpx.get(f"{base}/health").json()
    assert health["backend"] == "openvino" and health["model_loaded"] is True
    proc.send_signal(signal.SIGTERM)
    # uvicorn finishes the shutdown, then re-raises SIGTERM so the exit status names the signal
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = proc.stdout.read()
    assert "Application shutdown complete" in log
    assert re.search(r"arrowvision serving \S+siglip-demo-random.parquet \(siglip, dim 128\) with openvino fp32 on CPU", log)
    assert '"POST /v1/embed HTTP/1.1" 200' in log  # access log


GATED_SERVER = """
import sys
from arrowvision import VisionEncoder
from arrowvision.service.app import serve
from arrowvision.service.config import ServiceConfig

weights, gate, port = sys.argv[1:4]


class Gated:
    # Holds the first request's model call (call 1 is the start-up warm-up) until the test
    # writes to the gate FIFO, so that the other requests are provably queued.
    name = "gated"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, pixels):
        self.calls += 1
        if self.calls == 2:
            with open(gate + ".held", "w") as held:  # how many requests this first batch holds
                held.write(str(len(pixels)))
            with open(gate, "rb") as fifo:
                fifo.read()
        return self.inner(pixels)


base = VisionEncoder.from_parquet(weights, backend="torch")
encoder = VisionEncoder(base.weights, Gated(base.backend), base.config)
serve(encoder, "127.0.0.1", int(port), ServiceConfig(max_batch=4, max_wait_ms=0, request_timeout_s=120))
"""


def test_sigterm_drains_every_queued_request(tmp_path):
    """N requests: the first batch holds the model, the rest are queued; SIGTERM arrives; all N
    are answered 200."""
    n = 10
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", GATED_SERVER, str(DEMO), str(gate), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    draining = threading.Event()

    def read_log() -> None:
        for line in proc.stdout:
            log.append(line)
            if "Waiting for connections to close" in line:  # uvicorn is shutting down, requests still open
                draining.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        wait_until_healthy(base, proc, log)
        payload = SAMPLES[0].read_bytes()
        expected = VisionEncoder.from_parquet(DEMO, backend="torch").encode([payload])[0]

        async def scenario():
            loop = asyncio.get_running_loop()
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as http, \
                    httpx.AsyncClient(timeout=30) as monitor:
                requests = [asyncio.create_task(http.post(f"{base}/v1/embed", files={"file": ("a.jpg", payload, "image/jpeg")}))
                            for _ in range(n)]
                held = Path(f"{gate}.held")
                deadline = loop.time() + 120
                while True:  # the first batch is held in the model and every other request is queued
                    queued = queue_depth(await monitor.get(f"{base}/metrics"))
                    if held.exists() and held.read_text() and int(held.read_text()) + queued == n:
                        break
                    assert loop.time() < deadline and proc.poll() is None, (queued, "".join(log))
                    await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGTERM)
                assert await loop.run_in_executor(None, draining.wait, 60), "".join(log)
                assert not any(task.done() for task in requests)  # nothing was answered before the signal
                with open(gate, "wb") as fifo:  # release the model
                    fifo.write(b"go")
                return await asyncio.gather(*requests, return_exceptions=True)

        results = asyncio.run(scenario())
        assert [getattr(r, "status_code", r) for r in results] == [200] * n, results
        for response in results:
            np.testing.assert_allclose(response.json()["embedding"], expected, atol=1e-5)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        reader.join(10)
        assert "Application shutdown complete" in "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until_healthy(base: str, proc: subprocess.Popen, log: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(log))
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become healthy:\n" + "".join(log))


def queue_depth(metrics: httpx.Response) -> float:
    return float(re.search(r"^arrowvision_queue_depth\{[^}]*\} (\S+)", metrics.text, re.M).group(1))
