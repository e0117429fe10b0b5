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
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .errors import ImageError
from .service_models import ModelUnavailable, UnknownModel
from .service_http import read_json_object, unicode_problem
from .urlfetch import is_url

DATA_IMAGE = "data:image/"


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


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


def add_openai_routes(app: FastAPI, models: Any, config: Any, *, embed_image: Callable[..., Awaitable[dict[str, Any]]],
                      embed_texts: Callable[..., Awaitable[np.ndarray]] | None) -> None:
    """Register ``POST /v1/embeddings`` on ``app``."""
    from .service import ImageUrl, decode_base64

    limit = max(config.max_texts, config.max_batch_items)

    @app.exception_handler(OpenAIError)
    async def openai_error_handler(request: Request, exc: OpenAIError):
        return exc.response()

    async def read_json(request: Request) -> dict[str, Any]:
        return await read_json_object(request, config.max_body_bytes, OpenAIError, malformed_status=400)

    def inputs_of(value: dict[str, Any]) -> list[str]:
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

    async def embed_images(served: Any, images: dict[int, str]) -> dict[int, np.ndarray]:
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
                result = await embed_image(served, name, source, True, False)
            except ImageError as exc:
                raise OpenAIError(getattr(exc, "status", None) or 400, str(exc), "input") from None
            except Exception as exc:  # noqa: BLE001 - the image service's own problems (queue full, timeout)
                status, message = getattr(exc, "status", 500), getattr(exc, "message", str(exc))
                raise OpenAIError(status, message) from None
            return np.asarray(result["embedding"], np.float32)

        vectors = await asyncio.gather(*(one(i, item) for i, item in images.items()))
        return dict(zip(images, vectors))

    async def embed_all(served: Any, inputs: list[str], dimensions: Any) -> tuple[dict[int, np.ndarray], int]:
        """Unit embeddings by input index, and the text tokens counted."""
        if dimensions is not None and dimensions != served.encoder.embedding_dim:
            raise OpenAIError(400, f"model {served.name} embeds in {served.encoder.embedding_dim} dimensions; "
                                   f"'dimensions': {dimensions!r} is not available", "dimensions")
        images = {i: item for i, item in enumerate(inputs) if is_url(item) or item.startswith(DATA_IMAGE)}
        texts = {i: item for i, item in enumerate(inputs) if i not in images}
        if texts and (embed_texts is None or served.text_model is None):
            raise OpenAIError(400, f"model {served.name} has no text tower: inputs must be image URLs or "
                                   "data:image/ URIs", "input")
        tasks = [embed_images(served, images)]
        if texts:
            tasks.append(embed_texts(served, list(texts.values())))
        try:
            results = await asyncio.gather(*tasks)
        except OpenAIError:
            raise
        except Exception as exc:  # noqa: BLE001 - text problems (limits, queue full) keep their status
            raise OpenAIError(getattr(exc, "status", 500), getattr(exc, "message", str(exc)), "input") from None
        vectors = dict(results[0])
        if not texts:
            return vectors, 0
        unit = results[1] / np.maximum(np.linalg.norm(results[1], axis=1, keepdims=True), 1e-12)
        vectors.update(zip(texts, unit.astype(np.float32)))
        tokenizer = served.text_model.text.tokenizer
        return vectors, sum(count_tokens(tokenizer, text) for text in texts.values())

    @app.post("/v1/embeddings", summary="OpenAI-compatible embeddings of texts, image URLs and data:image/ URIs")
    async def embeddings(request: Request):
        start = time.perf_counter()
        value = await read_json(request)
        inputs = inputs_of(value)
        encoding = value.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise OpenAIError(400, f"encoding_format {encoding!r}: use float or base64", "encoding_format")
        try:
            async with models.use(value.get("model"), request) as served:
                vectors, tokens = await embed_all(served, inputs, value.get("dimensions"))
        except UnknownModel as exc:
            raise OpenAIError(404, str(exc), "model", "model_not_found") from None
        except ModelUnavailable as exc:
            raise OpenAIError(503, str(exc), "model") from None

        def encoded(vector: np.ndarray) -> Any:
            if encoding == "base64":
                return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
            return vector.astype(np.float32).tolist()

        return {"object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": encoded(vectors[i])} for i in range(len(inputs))],
                "model": served.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "processing_time_ms": 1000 * (time.perf_counter() - start)}
