"""What every route module of the service shares: one problem type (a client-facing error,
answered as ``{"error": message}`` with its status) and request bodies read under the size limit.

Bodies are read chunk by chunk so that a chunked upload with no Content-Length is refused as soon
as it passes the limit, not after it has filled memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class Problem(Exception):
    """An answer for the client: ``status``, a message naming the problem, optional headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def install_problem_handler(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem_handler(request: Request, exc: Problem):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


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


async def read_json_object(request: Request, max_bytes: int, problem: ProblemFactory = Problem,
                           malformed_status: int = 422) -> dict[str, Any]:
    """A JSON-only endpoint's body: 415 unless application/json, 413 over the limit, then parsed."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise problem(415, f"unsupported content type {content_type or '(none)'}; use application/json")
    return parse_json_object(await read_body(request, max_bytes, problem), problem, malformed_status)
