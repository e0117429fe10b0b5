"""Real servers for the tests: an HTTP server of the bundled photos (with redirects, an oversized
body, a trickling response, an HTML page, a 404), and the arrowvision app under uvicorn in a thread."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "arrowvision" / "samples").glob("*.jpg"))
PHOTOS = {p.name: p.read_bytes() for p in SAMPLES}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.hits.append(url.path)
        if url.path.startswith("/photos/") and url.path[8:] in PHOTOS:
            self._send(200, PHOTOS[url.path[8:]])
        elif url.path == "/redirect":  # /redirect?to=URL
            self._send(302, b"", "text/plain", {"Location": query["to"]})
        elif url.path.startswith("/hops/"):  # /hops/N: N redirects, then a photo
            hops = int(url.path[6:])
            target = f"/hops/{hops - 1}" if hops > 1 else f"/photos/{SAMPLES[0].name}"
            self._send(302, b"", "text/plain", {"Location": target})
        elif url.path == "/declared-big":  # a Content-Length over any limit, refused before reading
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)
        elif url.path == "/streamed-big":  # no Content-Length: the cap is found while streaming
            self.protocol_version = "HTTP/1.0"
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            size = int(query.get("bytes", 3_000_000))
            try:
                self.wfile.write(b"\xff\xd8\xff")
                for _ in range(size // 65536 + 1):
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif url.path == "/trickle":  # one byte per second, forever (until the client gives up)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(120):
                    if self.server.stopping.wait(1.0):
                        break
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True
        elif url.path == "/page.html":
            self._send(200, b"<html><body>not a photo</body></html>", "text/html")
        else:
            self._send(404, b"not found", "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address):
        super().__init__(address, _Handler)
        self.hits: list[str] = []
        self.stopping = threading.Event()


class PhotoServer:
    """``with PhotoServer() as photos: photos.url("/photos/chelsea.jpg")``."""

    def __init__(self, host: str = "127.0.0.1"):
        self.server = _Server((host, 0))
        self.host = host
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def photo(self, index: int = 0) -> str:
        return self.url(f"/photos/{SAMPLES[index].name}")

    def __enter__(self) -> PhotoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class LiveService:
    """The app under a real uvicorn on a free loopback port, in a thread: ``with LiveService(app) as base``."""

    def __init__(self, app, **config):
        import uvicorn

        from arrowvision.service.app import listen

        self.sock = listen("127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.02)
        return self.base

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
