"""Load test of `arrowvision serve` with Locust: single images, batches, scores, image URLs.

Headless, 16 users for 60 s, against a service started with URL access to this machine:

    ARROWVISION_API_KEY=secret arrowvision serve --weights W.parquet --allow-private-urls &
    ARROWVISION_API_KEY=secret locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 60s \\
        --host http://127.0.0.1:8000 --csv /tmp/av-load --exit-code-on-error 1

Environment: ``ARROWVISION_API_KEY`` (sent as ``Authorization: Bearer``), ``ARROWVISION_MODEL``
(the profile to ask for; default: the service's default), ``ARROWVISION_IMAGE_BASE`` (base URL
of a server holding the bundled photo names, e.g. ``http://images.internal/samples``; default: a
server started inside the Locust process on 127.0.0.1, which is why the service needs
``--allow-private-urls`` then). The score task runs when the model has a text tower (``--tower
all`` weights) and is skipped otherwise. A response without an embedding counts as a failure.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import random
import threading
from pathlib import Path

from locust import HttpUser, between, events, task

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "arrowvision" / "samples").glob("*.jpg"))
PHOTOS = [(p.name, p.read_bytes()) for p in SAMPLES]
ENCODED = [base64.b64encode(data).decode() for _, data in PHOTOS]
TEXTS = ["a photo of a cat", "an astronaut", "a cup of coffee", "a rocket on the launch pad", "a horse in a field"]
IMAGE_BASE = os.environ.get("ARROWVISION_IMAGE_BASE", "").rstrip("/")


@events.init.add_listener
def start_image_server(environment, **kwargs) -> None:
    """Serve the bundled photos for the URL tasks unless ARROWVISION_IMAGE_BASE names a server."""
    global IMAGE_BASE
    if IMAGE_BASE:
        return
    handler = functools.partial(_QuietHandler, directory=str(SAMPLES[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    IMAGE_BASE = f"http://127.0.0.1:{server.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ServiceUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        key = os.environ.get("ARROWVISION_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.model = os.environ.get("ARROWVISION_MODEL")
        listing = self.client.get("/v1/models", name="/v1/models").json()
        wanted = self.model or listing["default"]
        self.has_text = any(row["id"] == wanted and "text" in row.get("towers", []) for row in listing["data"])

    def _json(self, extra: dict) -> dict:
        return {**extra, "model": self.model} if self.model else extra

    def _expect(self, response, key: str) -> None:
        if response.status_code != 200:
            response.failure(f"{response.status_code}: {response.text[:200]}")
        elif key not in response.json():
            response.failure(f"no {key!r} in the answer")

    @task(4)
    def single_upload(self) -> None:
        name, data = random.choice(PHOTOS)
        params = {"model": self.model} if self.model else None
        with self.client.post("/v1/embed", files={"file": (name, data, "image/jpeg")}, params=params,
                              name="single (multipart)", catch_response=True) as response:
            self._expect(response, "embedding")

    @task(2)
    def batch_base64(self) -> None:
        with self.client.post("/v1/embed/batch", json=self._json({"images": random.sample(ENCODED, 4)}),
                              name="batch of 4 (base64)", catch_response=True) as response:
            self._expect(response, "results")
            if response.status_code == 200 and any("embedding" not in r for r in response.json().get("results", [])):
                response.failure("an item of the batch failed")

    @task(3)
    def single_url(self) -> None:
        name, _ = random.choice(PHOTOS)
        with self.client.post("/v1/embed", json=self._json({"image_url": f"{IMAGE_BASE}/{name}"}),
                              name="single (image_url)", catch_response=True) as response:
            self._expect(response, "embedding")

    @task(2)
    def score(self) -> None:
        if not self.has_text:
            return
        name, _ = random.choice(PHOTOS)
        payload = {"image_input": f"{IMAGE_BASE}/{name}", "text_prompt": random.choice(TEXTS)}
        with self.client.post("/v1/score", json=self._json(payload), name="score (image_url + text)",
                              catch_response=True) as response:
            self._expect(response, "clip_score")
