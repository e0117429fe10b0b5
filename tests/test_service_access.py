"""Access control (API key, CORS, rate limit), and `arrowvision serve` with profiles, a key and
JSON logs as a real process."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from arrowvision import VisionEncoder
from arrowvision.cli import main
from arrowvision.service.app import create_app
from arrowvision.service.security import RateLimitMiddleware, SecurityConfig, is_loopback_host, parse_rate

from .servers import PHOTOS, SAMPLES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "siglip-demo-random.parquet"
KEY = "k3y-for-tests-only"
IMAGE = {"image": base64.b64encode(PHOTOS[SAMPLES[0].name]).decode()}


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.from_parquet(DEMO, backend="torch")


def test_api_key_is_required_everywhere_but_health(encoder):
    security = SecurityConfig(api_key=KEY)
    with TestClient(create_app(encoder, security=security)) as client:
        assert client.get("/health").status_code == 200
        for method, path, kwargs in (("post", "/v1/embed", {"json": IMAGE}), ("get", "/v1/models", {}),
                                     ("post", "/v1/embeddings", {"json": {"input": "x"}}), ("get", "/metrics", {}),
                                     ("get", "/openapi.json", {}), ("get", "/docs", {})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
                response = getattr(client, method)(path, headers=headers, **kwargs)
                assert response.status_code == 401, (path, headers, response.status_code)
                assert KEY not in response.text and "unauthorized" in response.json()["error"]
            challenge = response.headers["www-authenticate"]
            assert challenge == "Bearer" if path.startswith("/v1/") else challenge.startswith("Basic")  # browsers prompt
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/embed", json=IMAGE, headers=bearer).status_code == 200
        assert client.get("/v1/models", headers=bearer).status_code == 200
        basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()}
        assert client.get("/metrics", headers=basic).status_code == 200  # a browser after its login prompt
        assert client.post("/v1/embed", json=IMAGE, headers=basic).status_code == 200


def test_cors_is_off_unless_origins_are_named(encoder):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(encoder)) as client:
        response = client.options("/v1/embed", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.post("/v1/embed", json=IMAGE, headers={"Origin": "https://app.example"}).headers
    security = SecurityConfig(api_key=KEY, cors_origins=["https://app.example"])
    with TestClient(create_app(encoder, security=security)) as client:
        response = client.options("/v1/embed", headers=preflight)  # preflights carry no key
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        other = client.options("/v1/embed", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        denied = client.post("/v1/embed", json=IMAGE, headers={"Origin": "https://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example"
        ok = client.post("/v1/embed", json=IMAGE, headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"


def test_rate_limit_answers_429_with_retry_after(encoder):
    with TestClient(create_app(encoder, security=SecurityConfig(rate_limit=2.0))) as client:
        statuses = [client.get("/v1/models") for _ in range(4)]  # cheap requests: no refill between them
        assert [r.status_code for r in statuses[:2]] == [200, 200]  # a burst of N=2
        limited = [r for r in statuses if r.status_code == 429]
        assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert "rate limit of 2 requests/s" in limited[0].json()["error"]
        assert all(client.get("/health").status_code == 200 for _ in range(5))  # probes are not limited


def test_token_bucket_refills_per_client():
    now = [0.0]
    bucket = RateLimitMiddleware(None, rate=2.0, clock=lambda: now[0])
    assert [bucket.take("a"), bucket.take("a")] == [0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)  # empty: a token every 0.5 s
    assert bucket.take("b") == 0.0  # clients are separate
    now[0] = 0.5
    assert bucket.take("a") == 0.0
    now[0] = 100.0
    assert [bucket.take("a"), bucket.take("a"), bucket.take("a") > 0] == [0.0, 0.0, True]  # capacity stays N
    assert parse_rate("20/s") == 20 and parse_rate("120/min") == 2 and parse_rate("5") == 5
    with pytest.raises(Exception, match="expected N/s"):
        parse_rate("fast")


def test_non_loopback_without_a_key_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.delenv("ARROWVISION_API_KEY", raising=False)
    assert is_loopback_host("127.0.0.1") and is_loopback_host("localhost") and not is_loopback_host("0.0.0.0")
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--weights", "/nonexistent.parquet"]) == 1
    error = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in error and "--allow-unauthenticated" in error
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--model", f"a={DEMO}", "--weights", str(DEMO)])
    assert usage.value.code == 2 and "either --weights or --model" in capsys.readouterr().err
    assert main(["serve", "--model", "a=/nonexistent.parquet", "--port", "0"]) == 1
    assert "--model a=/nonexistent.parquet: no such weights file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["serve", "--rate-limit", "lots", "--port", "0"])
    assert usage.value.code == 2 and "expected N/s" in capsys.readouterr().err
    # one policy for every command that listens: Ray Serve and demo --serve refuse the same way, before any work
    for command in (["serve", "--engine", "ray"], ["demo", "--serve"]):
        assert main([*command, "--host", "0.0.0.0", "--port", "0"]) == 1, command
        assert "refusing to listen on 0.0.0.0 without an API key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["demo", "--serve", "--forwarded-allow-ips", "proxy.example", "--port", "0"])
    assert usage.value.code == 2 and "expected IP addresses or networks" in capsys.readouterr().err


def test_serve_profiles_with_key_and_json_logs_as_a_process(tmp_path):
    """`serve --model fast=... --model same=... --api-key (env) --log-format json`: /v1/models,
    the key, request ids in JSON log lines, the key never in the log, spans on the console."""
    from arrowvision.service.app import listen

    probe = listen("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    env = {**os.environ, "ARROWVISION_API_KEY": KEY, "ARROWVISION_CACHE": str(tmp_path / "cache"),
           "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "arrowvision-test"}
    proc = subprocess.Popen([sys.executable, "-m", "arrowvision", "serve", "--model", f"fast={DEMO}", "--model",
                             f"again={DEMO}", "--default", "again", "--max-loaded-models", "1", "--backend", "torch",
                             "--port", str(port), "--log-format", "json", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models?api_key={KEY}").status_code == 401  # refused, and not logged verbatim
        assert httpx.get(f"{base}/v1/models?api_key={KEY}", headers=auth).status_code == 200
        listing = httpx.get(f"{base}/v1/models", headers=auth).json()
        assert listing["default"] == "again" and [m["id"] for m in listing["data"]] == ["fast", "again"]
        response = httpx.post(f"{base}/v1/embed", json={**IMAGE, "model": "fast"}, headers={**auth, "X-Request-ID": "trace-me-7"})
        assert response.status_code == 200 and response.json()["model"] == "fast"
        assert response.headers["x-request-id"] == "trace-me-7"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every stderr line is JSON
    assert records and all({"time", "level", "logger", "request_id", "message"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "uvicorn.access" and "/v1/embed" in r["message"]]
    assert access and access[0]["request_id"] == "trace-me-7"
    assert any("model fast loaded" in r["message"] and r["request_id"] == "trace-me-7" for r in records)
    assert any("model again unloaded" in r["message"] for r in records)  # --max-loaded-models 1
    assert any(r["message"].startswith("arrowvision serving models fast, again (default)") for r in records)
    assert KEY not in err and KEY not in out
    assert sum("/v1/models?api_key=REDACTED" in r["message"] for r in records if r["logger"] == "uvicorn.access") == 2
    assert '"name": "model call"' in out and "arrowvision-test" in out  # OTEL_TRACES_EXPORTER=console


def test_demo_serve_takes_the_key_like_serve(monkeypatch, capsys):
    """`demo --serve` builds its access policy with serve's code: --api-key or the variable, the
    rate limit, the trusted proxies, all handed to the server it starts."""
    from arrowvision.cli import index as index_cli

    given = {}
    monkeypatch.setattr(index_cli, "serve_demo", lambda *args, security=None: given.update(security=security))
    monkeypatch.setenv("ARROWVISION_API_KEY", KEY)
    assert main(["demo", "--serve", "--host", "0.0.0.0", "--port", "0", "--rate-limit", "3/s",
                 "--forwarded-allow-ips", "10.0.0.0/8"]) == 0
    security = given["security"]
    assert security.api_key == KEY and security.rate_limit == 3 and security.forwarded_allow_ips == ["10.0.0.0/8"]
    monkeypatch.delenv("ARROWVISION_API_KEY")
    assert main(["demo", "--serve", "--api-key", "other", "--port", "0"]) == 0 and given["security"].api_key == "other"
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:  # not silently ignored without --serve
        main(["demo", "--forwarded-allow-ips", "10.0.0.1"])
    assert usage.value.code == 2 and "--forwarded-allow-ips applies with --serve" in capsys.readouterr().err
