"""What every route module of the service shares: one problem type (a client-facing error,
answered as ``{"error": message}`` with its status), the handlers that give every other error
(404/405, validation, a slow body, a crash) that same JSON shape, and request bodies read under
the size limit, a deadline and the depth/size guard of ``safejson``.

Bodies are read chunk by chunk so that a chunked upload with no Content-Length is refused as soon
as it passes the limit, not after it has filled memory. ``BodyDeadlineMiddleware`` bounds the
time a client may take to send its body (a slow-loris upload holds a connection and a worker).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import FormatError
from .safejson import MAX_JSON_DEPTH, load_json


class Problem(Exception):
    """An answer for the client: ``status``, a message naming the problem, optional headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class BodyTimeout(Exception):
    """The client did not finish sending its request body before the deadline (408)."""


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers is ``{"error": message}`` JSON: our problems, Starlette's
    404/405, validation errors, a body past its deadline (408) and any crash (500, logged)."""
    @app.exception_handler(Problem)
    async def problem_handler(request: Request, exc: Problem):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_handler(request: Request, exc: StarletteHTTPException):  # 404, 405... in our shape
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_handler(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"},
                            status_code=422)

    @app.exception_handler(BodyTimeout)
    async def body_timeout_handler(request: Request, exc: BodyTimeout):
        return JSONResponse({"error": str(exc)}, status_code=408, headers={"Connection": "close"})

    @app.exception_handler(Exception)
    async def crash_handler(request: Request, exc: Exception):  # Starlette logs the traceback itself
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)


class BodyDeadlineMiddleware:
    """Pure ASGI: the whole request body must arrive within ``timeout_s`` of the request's start,
    else ``BodyTimeout`` is raised where the app reads it (answered 408). Once the body is complete,
    ``receive`` is passed through untouched (waiting for a disconnect is not bounded)."""

    def __init__(self, app: Any, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout_s
        complete = timed_out = started = False

        async def receive_in_time() -> dict:
            nonlocal complete, timed_out
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                timed_out = True
                raise BodyTimeout(f"request body not received within {self.timeout_s:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_tracked)
        except Exception:  # BodyTimeout as is, or wrapped by a middleware's task group on the way out
            if not timed_out or started:
                raise
            body = json.dumps({"error": f"request body not received within {self.timeout_s:g} s"}).encode()
            await send({"type": "http.response.start", "status": 408,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


ProblemFactory = Callable[[int, str], Exception]


def unicode_problem(text: str, name: str) -> str | None:
    """Why ``text`` cannot be encoded (JSON allows a lone surrogate such as ``"\\ud800"``; UTF-8
    does not), naming it as ``name``; None when it is fine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{name} is not valid Unicode ({exc.reason} at character {exc.start})"
    return None


async def read_body(request: Request, max_bytes: int, problem: ProblemFactory = Problem) -> bytes:
    """The whole body, refused with ``problem(413, ...)`` once it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise problem(413, f"request body over {max_bytes} bytes")
    return bytes(body)


def parse_json_object(body: bytes, problem: ProblemFactory = Problem, malformed_status: int = 422) -> dict[str, Any]:
    """``body`` as a JSON object, or ``problem(malformed_status, ...)`` saying what is wrong with it:
    parsed with ``safejson`` (nesting depth bounded before parsing, huge integer literals and
    non-finite numbers such as ``1e400`` refused), never a RecursionError or OverflowError."""
    try:
        value = load_json(body or b"null", "request body", max_bytes=max(len(body), 1), max_depth=MAX_JSON_DEPTH)
    except FormatError as exc:
        raise problem(malformed_status, f"malformed JSON {exc}") from None  # "...request body: JSON nested 100000 levels deep"
    if not isinstance(value, dict):
        raise problem(malformed_status, "the JSON body must be an object")
    return value


async def read_json_object(request: Request, max_bytes: int, problem: ProblemFactory = Problem,
                           malformed_status: int = 422) -> dict[str, Any]:
    """A JSON-only endpoint's body: 415 unless application/json, 413 over the limit, then parsed."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise problem(415, f"unsupported content type {content_type or '(none)'}; use application/json")
    return parse_json_object(await read_body(request, max_bytes, problem), problem, malformed_status)
