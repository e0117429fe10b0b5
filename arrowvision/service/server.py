"""How the service runs under uvicorn: one ``uvicorn.Config`` for every command that listens.

- Forwarded headers (``X-Forwarded-For``/``-Proto``) are trusted only from the proxies the user
  names (``--forwarded-allow-ips``; none by default). uvicorn's own default trusts them from
  127.0.0.1, so any local client could pick its own address and so its own rate-limit bucket.
- uvicorn's own answers to requests the app never sees (an unparsable request: 400; an app that
  crashed before answering: 500) are ``{"error": ...}`` JSON like every other error.
- Log lines go through ``tracing.logging_config``: request ids, and secrets redacted.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import tracing
from .security import SecurityConfig

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional for uvicorn
    HttpToolsProtocol = None


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON bodies for its own 400 and 500 answers."""

    def send_400_response(self, msg: str) -> None:
        body = _error_body(msg)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    async def send_500_response(self) -> None:
        await _send_json_500(self.send)


async def _send_json_500(send: Any) -> None:
    body = _error_body("internal error; the server log has the details")
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


if HttpToolsProtocol is not None:
    class JsonHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with JSON bodies for its own 400 and 500 answers."""

        def send_400_response(self, msg: str) -> None:
            body = _error_body(msg)
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: " + str(len(body)).encode() + b"\r\n",
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

        async def send_500_response(self) -> None:
            await _send_json_500(self.send)

    JSON_HTTP_PROTOCOL: type = JsonHttpToolsProtocol  # what uvicorn's "auto" picks when httptools is there
else:
    JSON_HTTP_PROTOCOL = JsonH11Protocol


def server_config(app: Any, *, security: SecurityConfig | None = None, access_log: bool = True,
                  log_format: str = "text", graceful_shutdown_s: int = 30, http: type | None = None) -> Any:
    """The ``uvicorn.Config`` of ``app``: forwarded headers trusted only from
    ``security.forwarded_allow_ips``, JSON error bodies, logs with request ids and the API key
    (and ``?api_key=``-style query values) redacted."""
    import uvicorn

    trusted = list(security.forwarded_allow_ips) if security else []
    secrets = [security.api_key] if security and security.api_key else []
    return uvicorn.Config(app, access_log=access_log, log_config=tracing.logging_config(log_format, secrets=secrets),
                          timeout_graceful_shutdown=graceful_shutdown_s, proxy_headers=bool(trusted),
                          forwarded_allow_ips=trusted, http=http or JSON_HTTP_PROTOCOL)
