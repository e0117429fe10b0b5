"""What every route module of the service shares: the one table from our exception types to an
HTTP status and ``{"error": message}`` body, request bodies read under the size limit, and the
decoders of image fields (base64 or data: URIs, http(s) URLs, multipart forms).

Bodies are read chunk by chunk so that a chunked upload with no Content-Length is refused as soon
as it passes the limit, not after it has filled memory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ImageError, ImageTooLarge
from ..inputs.urlfetch import UrlBlocked, UrlError, UrlTooLarge
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
    """Every error in one JSON shape: ``Problem``, the table's types, and FastAPI's own 404/405/422."""

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


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``awaitable``'s result, or a 504 after ``timeout_s`` (the service's per-request timeout)."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise Problem(504, f"timed out after {timeout_s} s") from None


ProblemFactory = Callable[[int, str], Exception]


async def read_body(request: Request, max_bytes: int, problem: ProblemFactory = Problem) -> bytes:
    """The whole body, refused with ``problem(413, ...)`` once it passes ``max_bytes``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise problem(413, f"request body over {max_bytes} bytes")
    return bytes(body)


def parse_json_object(body: bytes, problem: ProblemFactory = Problem, malformed_status: int = 422) -> dict[str, Any]:
    """``body`` as a JSON object, or ``problem(malformed_status, ...)`` saying what is wrong with it."""
    try:
        value = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise problem(malformed_status, f"malformed JSON: {exc}") from None
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
