"""The service against a hostile client on loopback (issue 23): hostile JSON on every POST route,
one bad item among concurrent valid ones (every batcher), JSON error bodies (crashes and
uvicorn's own 400s), a slow body, forwarded headers, secrets in log lines, /docs offline."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import arrowvision
from arrowvision.datasets.pipeline import embed_paths
from arrowvision.model.convert import convert
from arrowvision.search import index as vindex
from arrowvision.service.app import create_app
from arrowvision.service.batching import ItemFailed, MicroBatcher, run_isolating_failures
from arrowvision.service.config import ServiceConfig
from arrowvision.service.security import SecurityConfig
from arrowvision.service.server import JsonH11Protocol, server_config
from arrowvision.service.tracing import RedactingFormatter, logging_config

from .servers import PHOTOS, SAMPLES
from .textkit import save_full_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
KEY = "s3cret-key-for-tests"
IMAGE = base64.b64encode(PHOTOS[SAMPLES[0].name]).decode()
POST_ROUTES = ("/v1/embed", "/v1/embed/batch", "/v1/embed/text", "/v1/score", "/v1/embeddings", "/v1/search")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_full_checkpoint(tmp_path_factory.mktemp("siglip"), "siglip", seed=43)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return arrowvision.ImageTextModel.from_parquet(folder / "all.parquet")


@pytest.fixture(scope="module")
def client(model, tmp_path_factory):
    """Every POST route: images, texts, score, OpenAI embeddings and search over three photos."""
    root = tmp_path_factory.mktemp("corpus")
    for sample in SAMPLES[:3]:
        shutil.copy(sample, root / sample.name)
    embed_paths(model.vision, sorted(str(p) for p in root.glob("*.jpg")), root / "emb", progress=False)
    vindex.build(root / "emb")
    index = vindex.VectorIndex.open(root / "emb", model_checksum=model.vision.checksum)
    with TestClient(create_app(model.vision, ServiceConfig(max_wait_ms=20), model, index)) as test_client:
        yield test_client


def error_text(response: httpx.Response) -> str:
    """The message of our ``{"error": "..."}`` or of OpenAI's ``{"error": {"message": ...}}``."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested 100000 levels deep; at most 64 allowed"),
    (b'{"texts": [' * 50_000 + b"]}" * 50_000, "levels deep"),
    (b'{"k": ' + b"9" * 5000 + b"}", "5000 digits"),
    (b'{"k": 1e400, "text": "a cat"}', "non-finite number inf"),
    (b'{"texts": ["a", NaN]}', "non-finite number NaN"),
], ids=["deep-array", "deep-object", "5000-digit-int", "1e400", "NaN"])
def test_hostile_json_is_a_clear_4xx_on_every_post_route(client, body, message):
    for route in POST_ROUTES:
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (route, response.status_code, response.text[:200])
        assert response.headers["content-type"] == "application/json", route
        assert message in error_text(response), (route, error_text(response))
    assert client.get("/health").status_code == 200  # and the service is fine


def test_search_k_out_of_range_even_when_enormous(client):
    for k in ("1e400", "-1e400", "10" * 2000, "1e30"):
        response = client.post("/v1/search", content=f'{{"text": "a cat", "k": {k}}}'.encode(),
                               headers={"content-type": "application/json"})
        assert response.status_code == 422 and response.json()["error"], (k, response.text[:200])


def test_a_lone_surrogate_among_20_concurrent_clients_fails_only_itself(client):
    """JSON allows "\\ud800", UTF-8 does not: that text is a 422 naming it, and the 100 valid
    requests sent meanwhile by 20 clients all succeed (before: 97 of 100 failed)."""
    hostile = b'{"texts": ["a photo of a cat", "\\ud800 broken"]}'
    outcomes: list[int] = []
    refused: list[httpx.Response] = []

    def valid_client(index: int) -> None:
        for round_ in range(5):
            outcomes.append(client.post("/v1/embed/text", json={"texts": [f"client {index} text {round_}"]}).status_code)

    def hostile_client() -> None:
        for _ in range(10):
            refused.append(client.post("/v1/embed/text", content=hostile, headers={"content-type": "application/json"}))

    threads = [threading.Thread(target=valid_client, args=(i,)) for i in range(20)] + [threading.Thread(target=hostile_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes.count(200) == 100, outcomes
    assert all(r.status_code == 422 and "texts[1] is not valid Unicode" in r.json()["error"] for r in refused)
    for route, body in (("/v1/search", b'{"text": "\\udfff"}'), ("/v1/embeddings", b'{"input": ["ok", "\\ud800"]}')):
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code in (400, 422) and "not valid Unicode" in error_text(response), route


def test_the_micro_batcher_fails_only_the_bad_item_whatever_the_exception():
    """A batch holding a poison item (the model raises TypeError for the whole batch) is
    bisected: the poison request gets the error, its 20 batch-mates their embeddings."""
    sizes: list[int] = []

    def run(rows: np.ndarray) -> np.ndarray:
        sizes.append(len(rows))
        if (rows < 0).any():
            raise TypeError("cannot embed a negative row")
        return rows * 2

    async def scenario():
        batcher = MicroBatcher(run, max_batch=32, max_wait_ms=50, max_queue=64)
        batcher.start()
        rows = [np.full(3, i, np.float32) for i in range(20)]
        rows.insert(7, np.full(3, -1, np.float32))
        results = await asyncio.gather(*(batcher.submit(r) for r in rows), return_exceptions=True)
        await batcher.drain(10)
        return rows, results

    rows, results = asyncio.run(scenario())
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [7] and isinstance(results[7], TypeError)
    for row, result in zip(rows, results):
        if not isinstance(result, BaseException):
            np.testing.assert_allclose(result[0], row * 2)
    assert max(sizes) > 1  # they really were batched together


def test_bisecting_costs_a_few_calls_per_bad_item():
    calls: list[int] = []

    def run(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        if (rows == 13).any():
            raise ValueError("bad")
        return rows[:, :1]

    outputs = run_isolating_failures(run, [np.full(2, i) for i in range(32)])
    assert [i for i, o in enumerate(outputs) if isinstance(o, Exception)] == [13]
    assert len(calls) <= 1 + 2 * 5  # the batch, then two halves per level down to the bad one
    short = run_isolating_failures(lambda rows: rows[:1], [np.zeros(2), np.ones(2)])  # too few outputs: each alone
    assert [o.tolist() for o in short] == [[0.0, 0.0], [1.0, 1.0]]


def test_a_ray_serve_replica_failure_of_one_item_is_that_requests_only():
    """The Ray Serve ``ImageModel`` raises an item's ``ItemFailed`` for that request, and
    answers its batch-mates (the replica bisects with the same runner)."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from arrowvision.distributed.serve import Replicas, ReplicaBackend, ServeModel

    class Method:
        def __init__(self, answer):
            self.answer = answer

        def remote(self, pixels):
            async def result():
                return self.answer(pixels)
            return result()

    class Handle:
        embed = Method(lambda p: ItemFailed("TypeError: bad pixels") if p.sum() < 0 else (p * 2, 0.01, "r/1", 2))

    batches: list[int] = []
    model = ServeModel(Handle(), lambda size, seconds: batches.append(size), ReplicaBackend("torch", None, "cpu"),
                       Replicas(), ServiceConfig())

    async def scenario():
        return await asyncio.gather(model.submit(np.ones(3)), model.submit(-np.ones(3)), return_exceptions=True)

    good, bad = asyncio.run(scenario())
    np.testing.assert_allclose(good[0], 2 * np.ones(3))
    assert isinstance(bad, ItemFailed) and "bad pixels" in str(bad) and batches == [2] and model.in_flight == 0


class CrashingModel:
    """An ``ImageModel`` whose model call crashes (not one of our errors)."""

    async def start(self) -> None:
        pass

    async def submit(self, pixels):
        raise RuntimeError("something deep inside broke")

    def queue_depth(self) -> int:
        return 0

    def health(self) -> dict:
        return {}

    async def drain(self, timeout: float) -> None:
        pass


def test_a_crash_is_a_json_500_and_fails_only_its_item_in_a_batch():
    encoder = arrowvision.VisionEncoder.from_parquet(DEMO, backend="torch")
    app = create_app(encoder, model=lambda on_batch: CrashingModel())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/embed", json={"image": IMAGE})
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        assert response.json() == {"error": "internal error (RuntimeError); the server log has the details"}
        batch = client.post("/v1/embed/batch", json={"images": [IMAGE, "not base64!"]})
        assert batch.status_code == 200
        assert [r["status"] for r in batch.json()["results"]] == [500, 422]
        assert client.get("/nowhere").json() == {"error": "Not Found"}


@pytest.fixture(scope="module")
def encoder():
    return arrowvision.VisionEncoder.from_parquet(DEMO, backend="torch")


class Live:
    """``create_app`` under the very ``server_config`` that ``serve`` uses, on a loopback port."""

    def __init__(self, app, **options):
        import uvicorn

        from arrowvision.service.app import listen

        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        config = server_config(app, access_log=False, **options)
        config.log_config = None  # keep pytest's logging as it is
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()

    def raw(self, data: bytes, pause_after: float = 0.0) -> bytes:
        """Send ``data`` (then wait ``pause_after`` without sending more); the whole answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
            conn.sendall(data)
            time.sleep(pause_after)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
            return b"".join(chunks)


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(length) and len(body) >= int(length.group(1))


@pytest.mark.parametrize("protocol", ["default", "h11"])
def test_uvicorns_own_400_is_json(encoder, protocol):
    options = {"http": JsonH11Protocol} if protocol == "h11" else {}
    with Live(create_app(encoder), **options) as live:
        answer = live.raw(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
        assert b'"error"' in body and body.startswith(b"{")


def test_a_slow_body_is_a_408_json_after_the_deadline(encoder):
    with Live(create_app(encoder, ServiceConfig(body_timeout_s=1.0))) as live:
        start = time.monotonic()
        answer = live.raw(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"image\": \"", pause_after=0.1)
        waited = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(body) == {"error": "request body not received within 1 s"}
        assert 0.9 < waited < 20
        assert httpx.get(f"{live.base}/health").status_code == 200


def test_x_forwarded_for_is_trusted_only_from_named_proxies(encoder):
    """--rate-limit 5/s from loopback with a new X-Forwarded-For on every request: still one
    client (5 x 200, then 429); only with 127.0.0.1 named as a proxy is each address its own."""
    def statuses(security: SecurityConfig) -> list[int]:
        with Live(create_app(encoder, security=security), security=security) as live, httpx.Client() as http:
            return [http.get(f"{live.base}/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                    for i in range(20)]

    default = statuses(SecurityConfig(rate_limit=5.0))
    assert default[:5] == [200] * 5 and default.count(429) >= 5, default  # refills at 5/s: never 20 x 200
    trusted = statuses(SecurityConfig(rate_limit=5.0, forwarded_allow_ips=["127.0.0.1"]))
    assert trusted == [200] * 20


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_log_line_carries_the_key(log_format):
    """The access line of a refused ``?api_key=K`` request, and any other line naming the key
    (a message, a traceback), are written with it redacted."""
    config = logging_config(log_format, secrets=[KEY])

    def formatter(name: str) -> RedactingFormatter:
        spec = dict(config["formatters"][name])
        return spec.pop("()")(**spec)

    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5555", "GET", f"/v1/models?model=a&api_key={KEY}&token=t0k3n", "1.1", 401),
                               None)
    access.request_id = "rid-1"
    line = formatter("access").format(access)
    assert KEY not in line and "t0k3n" not in line and "api_key=REDACTED&token=REDACTED" in line and "rid-1" in line
    try:
        raise ValueError(f"fetching http://user:pa55@host/x.jpg?key={KEY} failed")
    except ValueError:
        import sys

        error = logging.LogRecord("arrowvision.service", logging.ERROR, __file__, 1, "key was %s", (KEY,), sys.exc_info())
    error.request_id = "-"
    line = formatter("default").format(error)
    assert KEY not in line and "pa55" not in line and "key was REDACTED" in line and "ValueError" in line


def test_docs_work_offline(encoder):
    """/docs is Swagger UI served by the app itself: no URL outside the app, every asset there."""
    with TestClient(create_app(encoder)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        assert not re.findall(r"(?i)(?:https?:)?//[a-z0-9.-]+", page.text), "an external URL in /docs"
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert len(assets) == 3 and all(a.startswith("/docs/assets/") for a in assets)
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 100, asset
        assert client.get("/docs/assets/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert client.get("/redoc").status_code == 404  # ReDoc only comes from a CDN: not offered
        assert client.get("/openapi.json").json()["info"]["title"] == "arrowvision"
