"""``arrowvision serve --engine ray``: the service's API on Ray Serve (real local cluster), the
same answers as the plain service for the whole request matrix (image and text endpoints: the
served weights hold both towers), 16 concurrent clients, /health and /metrics, a killed model
replica (503 at worst, then replaced), and the CLI."""

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

from arrowvision import ImageTextModel, VisionEncoder
from arrowvision.model.convert import convert
from arrowvision.service.app import create_app
from arrowvision.service.config import ServiceConfig

from .raykit import ray_cluster  # noqa: F401 (fixture)
from .textkit import save_full_checkpoint

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
SAMPLES = sorted((ROOT / "arrowvision" / "samples").glob("*.jpg"))
CONFIG = ServiceConfig(max_body_bytes=2_000_000, max_pixels=4_000_000, max_batch_items=8, max_batch=16, max_wait_ms=10,
                       max_texts=8, max_text_chars=200)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(base: str, deadline_s: float, running: int | None = None) -> dict:
    deadline = time.time() + deadline_s
    body: dict = {}
    while time.time() < deadline:
        try:
            response = httpx.get(f"{base}/health", timeout=5)
            body = response.json()
            if response.status_code == 200 and (running is None or body["replicas"]["running"] == running):
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"not healthy in {deadline_s} s: {body}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny SigLIP with both towers (image endpoints on the replicas, text ones in the ingress)."""
    folder = save_full_checkpoint(tmp_path_factory.mktemp("siglip_all"), "siglip", seed=11)
    convert(str(folder), folder / "all.parquet", tower="all", progress=False)
    return folder / "all.parquet"


@pytest.fixture(scope="module")
def reference(weights, module_cache) -> ImageTextModel:
    return ImageTextModel.from_parquet(weights, backend="openvino")


@pytest.fixture(scope="module")
def encoder(reference) -> VisionEncoder:
    return reference.vision


@pytest.fixture(scope="module")
def served(ray_cluster, weights, reference):
    """The app on Ray Serve with 2 model replicas (one per CPU of the test cluster)."""
    from ray import serve

    from arrowvision.distributed.serve import Replicas, build_app, start

    port = free_port()
    start(build_app(str(weights), config=CONFIG, replicas=Replicas(count=2)), port=port)
    base = f"http://127.0.0.1:{port}"
    wait_for_health(base, 180, running=2)
    yield base
    serve.shutdown()


@pytest.fixture(scope="module")
def plain(reference):
    """The plain service, same model and limits: the reference for every answer."""
    with TestClient(create_app(reference.vision, CONFIG, reference)) as client:
        yield client


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def request_matrix() -> list[tuple[str, str, dict]]:
    jpeg = SAMPLES[0].read_bytes()
    b64 = base64.b64encode(jpeg).decode()
    return [
        ("post", "/v1/embed", dict(files={"file": ("a.jpg", jpeg, "image/jpeg")})),
        ("post", "/v1/embed", dict(json={"image": b64, "normalize": False})),
        ("post", "/v1/embed", dict(json={"image": "data:image/jpeg;base64," + b64, "sketch": True})),
        ("post", "/v1/embed/batch", dict(json={"images": [b64, base64.b64encode(b"nope").decode(), "%%%"]})),
        ("post", "/v1/embed/batch", dict(json={"images": [b64] * 9})),  # over max_batch_items: 413
        ("post", "/v1/embed", dict(files={"file": ("g.jpg", os.urandom(300), "image/jpeg")})),
        ("post", "/v1/embed", dict(files={"file": ("t.jpg", jpeg[: len(jpeg) // 4], "image/jpeg")})),
        ("post", "/v1/embed", dict(files={"file": ("huge.png", png_bytes(np.zeros((2500, 2000), np.uint8)), "image/png")})),
        ("post", "/v1/embed", dict(content=b"hello", headers={"content-type": "text/plain"})),
        ("post", "/v1/embed", dict(content=b"", headers={"content-type": "application/json"})),
        ("post", "/v1/embed", dict(content=b"{not json", headers={"content-type": "application/json"})),
        ("post", "/v1/embed", dict(json={"image": "%%%"})),
        ("post", "/v1/embed", dict(content=b"x" * 2_100_000, headers={"content-type": "application/json"})),
        ("post", "/v1/embed", dict(files={"file": ("e.jpg", b"", "image/jpeg")})),
        ("get", "/v1/embed", {}),
        ("get", "/nowhere", {}),
        ("post", "/v1/embed/text", dict(json={"texts": ["a photo of a cat", "a dog"]})),
        ("post", "/v1/embed/text", dict(json={"texts": ["x"] * 9})),
        ("post", "/v1/embed/text", dict(json={"texts": []})),
        ("post", "/v1/score", dict(json={"image": b64, "texts": ["a cat", "a cup of coffee"]})),
        ("post", "/v1/score", dict(json={"image": base64.b64encode(b"nope").decode(), "texts": ["a cat"]})),
    ]


def same_answer(ours: httpx.Response, reference) -> None:
    assert ours.status_code == reference.status_code, (ours.status_code, ours.text[:300], reference.text[:300])
    body, expected = ours.json(), reference.json()
    if "embedding" in expected:
        assert set(body) == set(expected) and body["dim"] == expected["dim"]
        assert body["model_checksum"] == expected["model_checksum"]
        assert np.abs(np.asarray(body["embedding"]) - np.asarray(expected["embedding"])).max() < 1e-5
    elif "results" in expected:
        assert len(body["results"]) == len(expected["results"])
        for mine, theirs in zip(body["results"], expected["results"]):
            if "embedding" in theirs:
                assert np.abs(np.asarray(mine["embedding"]) - np.asarray(theirs["embedding"])).max() < 1e-5
            else:
                assert mine == theirs
    elif "embeddings" in expected or "logits" in expected:
        assert set(body) == set(expected)
        for key in ("embeddings", "logits", "probabilities", "clip_score"):
            if key in expected:
                assert np.abs(np.asarray(body[key]) - np.asarray(expected[key])).max() < 1e-4, key
    else:
        assert body == expected


def test_serve_answers_every_request_like_the_plain_service(served, plain):
    with httpx.Client(base_url=served, timeout=60) as http:
        for method, path, kwargs in request_matrix():
            same_answer(http.request(method.upper(), path, **kwargs), getattr(plain, method)(path, **kwargs))
        assert http.get("/v1/embed").headers["allow"] == "POST"
        assert set(http.get("/openapi.json").json()["paths"]) == set(plain.get("/openapi.json").json()["paths"])


def test_health_reflects_the_replicas_and_metrics_keep_our_names(served, encoder):
    health = httpx.get(f"{served}/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True and health["engine"] == "ray" and health["text"]
    assert health["replicas"] == {"running": 2, "target": 2}
    assert (health["backend"], health["precision"], health["dim"]) == ("openvino", "fp32", encoder.embedding_dim)
    metrics = httpx.get(f"{served}/metrics").text
    for name in ("arrowvision_requests_total", "arrowvision_request_latency_seconds", "arrowvision_batch_size",
                 "arrowvision_inference_seconds", "arrowvision_queue_depth", "arrowvision_images_total"):
        assert re.search(rf"^# TYPE {name} ", metrics, re.M), name


def metric(base: str, name: str) -> float:
    """The metric summed over its labels (the service labels them by model)."""
    text = httpx.get(f"{base}/metrics").text
    return sum(float(value) for value in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M))


def test_16_concurrent_clients(served, encoder):
    payloads = [p.read_bytes() for p in SAMPLES]
    expected = encoder.encode(payloads)
    before = metric(served, "arrowvision_batch_size_sum"), metric(served, "arrowvision_batch_size_count")

    async def client(http: httpx.AsyncClient, worker: int, results: list) -> None:
        for i in range(6):
            index = (worker + i) % len(payloads)
            response = await http.post("/v1/embed", files={"file": ("x.jpg", payloads[index], "image/jpeg")})
            results.append((index, response.status_code, response.json()))

    async def run() -> list:
        results: list = []
        async with httpx.AsyncClient(base_url=served, timeout=60, limits=httpx.Limits(max_connections=16)) as http:
            await asyncio.gather(*(client(http, w, results) for w in range(16)))
        return results

    results = asyncio.run(run())
    assert len(results) == 96 and all(status == 200 for _, status, _ in results), {s for _, s, _ in results}
    for index, _, body in results:
        assert np.abs(np.asarray(body["embedding"]) - expected[index]).max() < 1e-5
    images = metric(served, "arrowvision_batch_size_sum") - before[0]
    batches = metric(served, "arrowvision_batch_size_count") - before[1]
    assert images == 96 and 1 <= batches <= 96, (images, batches)  # each image in exactly one counted batch


def test_a_killed_replica_costs_a_503_at_worst_and_is_replaced(served):
    from ray import serve

    from arrowvision.distributed.serve import APP_NAME, MODEL_DEPLOYMENT

    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP_NAME)
    pids = set()
    for _ in range(40):
        info = handle.describe.remote().result(timeout_s=30)
        assert info["threads"] == 1  # OpenVINO's INFERENCE_NUM_THREADS = the 1 CPU of the replica
        pids.add(info["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, pids
    victim = min(pids)
    payload = SAMPLES[1].read_bytes()

    async def client(http: httpx.AsyncClient, statuses: list) -> None:
        for _ in range(8):
            response = await http.post("/v1/embed", files={"file": ("x.jpg", payload, "image/jpeg")})
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers.get("retry-after") == "1" and "error" in response.json()

    async def run() -> list:
        statuses: list = []
        async with httpx.AsyncClient(base_url=served, timeout=60) as http:  # a hang fails the test here
            clients = [asyncio.create_task(client(http, statuses)) for _ in range(8)]
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            await asyncio.gather(*clients)
        return statuses

    statuses = asyncio.run(run())
    assert len(statuses) == 64 and set(statuses) <= {200, 503} and statuses.count(200) >= 32, statuses
    health = wait_for_health(served, 180, running=2)  # Serve replaced the replica
    assert health["replicas"]["target"] == 2
    new = set()
    for _ in range(40):
        new.add(handle.describe.remote().result(timeout_s=30)["pid"])
    assert victim not in new
    assert httpx.post(f"{served}/v1/embed", files={"file": ("x.jpg", payload, "image/jpeg")}, timeout=60).status_code == 200


def test_autoscaling_options_become_serves_autoscaling_config():
    from arrowvision.distributed.serve import Replicas
    from arrowvision.errors import ArrowVisionError

    options = Replicas(count=2, minimum=1, maximum=4, cpus=2).options(max_batch=16, max_queue=64)
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 16}
    assert "num_replicas" not in options and options["ray_actor_options"] == {"num_cpus": 2}
    assert options["max_queued_requests"] == 64 and options["max_ongoing_requests"] == 32
    assert Replicas(count=3).options(8, 10)["num_replicas"] == 3
    with pytest.raises(ArrowVisionError, match="--min-replicas 3 / --max-replicas 2"):
        Replicas(minimum=3, maximum=2).options(8, 10)


def test_cli_serve_engine_ray_starts_a_cluster_and_stops_on_sigterm(tmp_path, module_cache):
    """Also serve's access policy on Ray Serve: the key (from the environment), the rate limit,
    X-Forwarded-For not believed from a loopback peer (Serve's proxy included), no key in the output."""
    port = free_port()
    key = "ray-k3y-for-tests"
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--engine", "ray", "--weights", str(DEMO),
                             "--port", str(port), "--min-replicas", "1", "--max-replicas", "2", "--no-progress",
                             "--rate-limit", "5/s"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", "ARROWVISION_API_KEY": key})
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_for_health(base, 240)
        assert health["replicas"]["target"] == "1..2" and health["replicas"]["running"] >= 1
        data = SAMPLES[0].read_bytes()
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{base}/v1/embed", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=60).status_code == 401
        assert httpx.post(f"{base}/v1/embed", files={"file": ("a.jpg", data, "image/jpeg")}, headers=auth,
                          timeout=60).status_code == 200
        time.sleep(1.5)  # the bucket refills
        statuses = [httpx.get(f"{base}/v1/models?api_key={key}", headers={**auth, "X-Forwarded-For": f"203.0.113.{i}"},
                              timeout=60).status_code for i in range(20)]
        assert statuses.count(429) >= 5, statuses  # one client whatever it claims (refills at 5/s)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    assert key not in output
    assert re.search(r"arrowvision serving \S+siglip-demo-random.parquet on Ray Serve \(1\.\.2 replicas \(autoscaling\), openvino\)",
                     output), output[-3000:]


def test_ray_options_are_refused_with_the_local_engine():
    run = subprocess.run([sys.executable, "-m", "arrowvision", "serve", "--max-replicas", "2"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "--max-replicas applies to --engine ray only" in run.stderr
