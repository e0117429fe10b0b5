"""OpenAI-compatible ``POST /v1/embeddings``: existing OpenAI clients work unchanged.

Request: ``{"model": name, "input": str | [str, ...], "encoding_format": "float" | "base64"}``.
Each input is a text (needs a text tower), an http(s) image URL (fetched with the SSRF guard)
or a ``data:image/...;base64,`` URI; texts and images may be mixed. Answer (the OpenAI shape):
``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}],
"model": name, "usage": {"prompt_tokens": n, "total_tokens": n}}`` with L2-normalized embeddings
(``base64``: little-endian float32, what the ``openai`` client asks for by default).
``usage`` counts text tokens; images count none. Errors use OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` so that the clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import ImageError
from ..inputs.urlfetch import is_url
from .common import (ImageUrl, Problem, ServiceState, decode_base64, problem_for, read_json_object, service_state,
                     unicode_problem)
from .images import embed_image
from .profiles import ModelUnavailable, ServedModel, UnknownModel
from .text import embed_texts

DATA_IMAGE = "data:image/"

router = APIRouter()


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def reformat(cls, exc: Exception, param: str | None = None) -> OpenAIError:
        """The service's answer to ``exc`` (the common table; 500 for anything it does not list)."""
        if isinstance(exc, OpenAIError):
            return exc
        problem = problem_for(exc) or Problem(500, str(exc))
        code = "model_not_found" if problem.status == 404 and param == "model" else None
        return cls(problem.status, problem.message, param, code)

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


def install_openai_error_handler(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error_handler(request: Request, exc: OpenAIError):
        return exc.response()


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of one text without padding (SigLIP pads with its end token: that one counts once)."""
    row = [int(t) for t in tokenizer([text])[0]]
    pad = getattr(tokenizer, "pad_id", None)
    length = len(row)
    while length and row[length - 1] == pad:
        length -= 1
    if length < len(row) and pad is not None and pad == getattr(tokenizer, "eos_id", None):
        length += 1
    return length


def inputs_of(state: ServiceState, value: dict[str, Any]) -> list[str]:
    config = state.config
    limit = max(config.max_texts, config.max_batch_items)
    inputs = value.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise OpenAIError(400, "'input' must be a string or a non-empty list of strings", "input")
    if not all(isinstance(item, str) for item in inputs):
        raise OpenAIError(400, "'input' items must be strings (texts, image URLs or data:image/ URIs); "
                               "token arrays are not supported", "input")
    if len(inputs) > limit:
        raise OpenAIError(413, f"{len(inputs)} inputs in one request; the limit is {limit}", "input")
    for index, item in enumerate(inputs):
        if not item:
            raise OpenAIError(400, f"input[{index}] is empty", "input")
        if not is_url(item) and not item.startswith(DATA_IMAGE) and len(item) > config.max_text_chars:
            raise OpenAIError(400, f"input[{index}] has {len(item)} characters; the limit is {config.max_text_chars}",
                              "input")
        if reason := unicode_problem(item, f"input[{index}]"):
            raise OpenAIError(400, reason, "input")
    return inputs


async def embed_images(state: ServiceState, served: ServedModel, images: dict[int, str]) -> dict[int, np.ndarray]:
    async def one(index: int, item: str) -> np.ndarray:
        name = f"input[{index}]"
        if is_url(item):
            source: Any = ImageUrl(item.strip())
        else:
            try:
                source = decode_base64(item)
            except ValueError:
                raise OpenAIError(400, f"{name} is not a valid data:image/...;base64, URI", "input") from None
        try:
            result = await embed_image(state, served, name, source, True, False)
        except Exception as exc:  # noqa: BLE001 - the image's problem (bad image, queue full, timeout), reformatted
            raise OpenAIError.reformat(exc, "input" if isinstance(exc, ImageError) else None) from None
        return np.asarray(result["embedding"], np.float32)

    vectors = await asyncio.gather(*(one(i, item) for i, item in images.items()))
    return dict(zip(images, vectors))


async def embed_all(state: ServiceState, served: ServedModel, inputs: list[str],
                    dimensions: Any) -> tuple[dict[int, np.ndarray], int]:
    """Unit embeddings by input index, and the text tokens counted."""
    if dimensions is not None and dimensions != served.encoder.embedding_dim:
        raise OpenAIError(400, f"model {served.name} embeds in {served.encoder.embedding_dim} dimensions; "
                               f"'dimensions': {dimensions!r} is not available", "dimensions")
    images = {i: item for i, item in enumerate(inputs) if is_url(item) or item.startswith(DATA_IMAGE)}
    texts = {i: item for i, item in enumerate(inputs) if i not in images}
    if texts and served.text_model is None:
        raise OpenAIError(400, f"model {served.name} has no text tower: inputs must be image URLs or "
                               "data:image/ URIs", "input")
    tasks = [embed_images(state, served, images)]
    if texts:
        tasks.append(embed_texts(state, served, list(texts.values())))
    try:
        results = await asyncio.gather(*tasks)
    except Exception as exc:  # noqa: BLE001 - text problems (limits, queue full) keep their status
        raise OpenAIError.reformat(exc, "input") from None
    vectors = dict(results[0])
    if not texts:
        return vectors, 0
    unit = results[1] / np.maximum(np.linalg.norm(results[1], axis=1, keepdims=True), 1e-12)
    vectors.update(zip(texts, unit.astype(np.float32)))
    tokenizer = served.text_model.text.tokenizer
    return vectors, sum(count_tokens(tokenizer, text) for text in texts.values())


@router.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts, image URLs and data:image/ URIs")
async def embeddings(request: Request):
    start = time.perf_counter()
    state = service_state(request)
    value = await read_json_object(request, state.config.max_body_bytes, OpenAIError, malformed_status=400)
    inputs = inputs_of(state, value)
    encoding = value.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise OpenAIError(400, f"encoding_format {encoding!r}: use float or base64", "encoding_format")
    try:
        async with state.models.use(value.get("model"), request) as served:
            vectors, tokens = await embed_all(state, served, inputs, value.get("dimensions"))
    except (UnknownModel, ModelUnavailable) as exc:
        raise OpenAIError.reformat(exc, "model") from None

    def encoded(vector: np.ndarray) -> Any:
        if encoding == "base64":
            return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
        return vector.astype(np.float32).tolist()

    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encoded(vectors[i])} for i in range(len(inputs))],
            "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "processing_time_ms": 1000 * (time.perf_counter() - start)}
