"""What every route module of the service shares: the one table from our exception types to an
HTTP status and ``{"error": message}`` body (a slow body's 408 and a crash's 500 included),
request bodies read under the size limit, a deadline and the depth/size guard of ``safejson``,
and the decoders of image fields (base64 or data: URIs, http(s) URLs, multipart forms).

Bodies are read chunk by chunk so that a chunked upload with no Content-Length is refused as soon
as it passes the limit, not after it has filled memory. ``BodyDeadlineMiddleware`` bounds the
time a client may take to send its body (a slow-loris upload holds a connection and a worker).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImageError, ImageTooLarge
from ..errors import FormatError
from ..inputs.urlfetch import UrlBlocked, UrlError, UrlTooLarge
from ..util.safejson import MAX_JSON_DEPTH, load_json
from .batching import QueueFull
from .config import ServiceConfig
from .metrics import Metrics
from .profiles import ModelRegistry, ModelUnavailable, UnknownModel

T = TypeVar("T")


class Problem(Exception):
    """An answer for the client: ``status``, a message naming the problem, optional headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class MalformedRequest(Exception):
    """A request body that cannot be parsed (a broken multipart form)."""


class BodyTimeout(Exception):
    """The client did not finish sending its request body before the deadline (408)."""


# The one table: our exception types -> (HTTP status, extra headers). The first row that matches
# wins, so subclasses come before their bases. OpenAI-compatible routes reformat the same answer.
ERRORS: tuple[tuple[type[Exception], int, dict[str, str] | None], ...] = (
    (UnknownModel, 404, None),
    (ModelUnavailable, 503, {"Retry-After": "1"}),
    (QueueFull, 503, {"Retry-After": "1"}),
    (UrlBlocked, 403, None),  # the SSRF guard
    (UrlTooLarge, 413, None),
    (UrlError, 422, None),  # an image URL that cannot be fetched
    (ImageTooLarge, 413, None),
    (ImageError, 422, None),  # undecodable or empty image data
    (MalformedRequest, 422, None),
    (BodyTimeout, 408, {"Connection": "close"}),
)


def problem_for(exc: Exception) -> Problem | None:
    """The client's answer to ``exc`` (from the table), or None for an exception it does not list."""
    if isinstance(exc, Problem):
        return exc
    for kind, status, headers in ERRORS:
        if isinstance(exc, kind):
            return Problem(status, str(exc), headers)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Every error in one JSON shape: ``Problem``, the table's types, FastAPI's own 404/405/422,
    and any crash (500 naming only the exception type; Starlette logs the traceback)."""

    async def answer(request: Request, exc: Exception) -> JSONResponse:
        problem = problem_for(exc)
        assert problem is not None  # registered for the table's types only
        return JSONResponse({"error": problem.message}, status_code=problem.status, headers=problem.headers)

    for kind in (Problem, *(row[0] for row in ERRORS)):
        app.add_exception_handler(kind, answer)

    @app.exception_handler(StarletteHTTPException)
    async def http_handler(request: Request, exc: StarletteHTTPException):  # 404, 405... in our shape
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_handler(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def crash_handler(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)


class BodyDeadlineMiddleware:
    """Pure ASGI: the whole request body must arrive within ``timeout_s`` of the request's start,
    else ``BodyTimeout`` is raised where the app reads it and the client gets a 408. Once the body
    is complete, ``receive`` is passed through untouched (waiting for a disconnect is not bounded)."""

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


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result, or a 504 after ``timeout_s`` (the service's per-request timeout)."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise Problem(504, f"timed out after {timeout_s} s") from None


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


def content_type(request: Request) -> str:
    """The media type of the body, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json_object(request: Request, max_bytes: int, problem: ProblemFactory = Problem,
                           malformed_status: int = 422) -> dict[str, Any]:
    """A JSON-only endpoint's body: 415 unless application/json, 413 over the limit, then parsed."""
    kind = content_type(request)
    if kind != "application/json":
        raise problem(415, f"unsupported content type {kind or '(none)'}; use application/json")
    return parse_json_object(await read_body(request, max_bytes, problem), problem, malformed_status)


async def parse_multipart(request: Request, body: bytes):
    """Parse an already-read (size-checked) multipart body with Starlette's parser."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        return await MultiPartParser(Headers(scope=request.scope), stream(), max_part_size=len(body) + 1).parse()
    except MultiPartException as exc:
        raise MalformedRequest(f"malformed multipart body: {exc.message}") from None


def option(value: Any, default: bool) -> bool:
    """A boolean form, query or JSON field: true/false, 1/0, yes/no, on/off."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


DATA_URI = re.compile(r"^data:(?:image/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URI (what browsers' FileReader produces)."""
    return base64.b64decode(DATA_URI.sub("", text.strip(), count=1), validate=True)


class ImageUrl(str):
    """An image given by http(s) URL in a JSON body (fetched with the SSRF guard)."""


class BadInput(str):
    """An item of a batch request that is unusable as given (reported in its result)."""


@dataclass
class ServiceState:
    """What the routes share, kept on ``app.state.service`` (``create_app`` builds it)."""

    config: ServiceConfig
    models: ModelRegistry
    metrics: Metrics
    decode_pool: ThreadPoolExecutor  # image decoding off the event loop
    fetcher: Any = None  # AsyncUrlFetcher while the app runs
    accepting: bool = True  # False while shutting down: /v1/ answers 503
    started: bool = False
    text_model: Any = None  # the default model's ImageTextModel (search by text)
    text_batcher: Any = None  # ... and its text batcher, once started
    index: Any = None  # the IndexHolder of ``serve --index``


def service_state(request: Request) -> ServiceState:
    return request.app.state.service
