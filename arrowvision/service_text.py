"""Text endpoints of the HTTP service, for weights converted with ``--tower all``.

``POST /v1/embed/text``: ``{"texts": [...], "normalize": true}`` -> one embedding per text.
``POST /v1/score``: ``{"image": base64, "texts": [...]}`` -> logits (transformers'
``logits_per_image``), probabilities (SigLIP: sigmoid per text; CLIP: softmax over the texts) and
CLIP scores (``max(100 cos, 0)``) of the image against each text.

Texts from concurrent requests are grouped into one model call by their own ``MicroBatcher``
(tokenized inside the call, so CLIP pads only to the batch's longest text); the image of
``/v1/score`` goes through the image batcher like ``/v1/embed``. Limits: at most
``max_texts`` texts per request (413) and ``max_text_chars`` characters per text (422).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import scoring
from .errors import ArrowVisionError, ImageError


class TextProblem(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status, self.message, self.headers = status, message, headers


def add_text_routes(app: FastAPI, model: Any, config: Any, *, registry: Any, state: dict[str, Any],
                    embed_image: Callable[..., Awaitable[dict[str, Any]]], image_problem: Callable[[ImageError], Any],
                    batcher_factory: Callable[..., Any], queue_full: type[Exception]) -> None:
    """Register the text endpoints on ``app``; ``state["text_batcher"]`` is started and drained
    by the app's lifespan (see ``service.create_app``)."""
    from prometheus_client import Counter, Histogram

    texts_total = Counter("arrowvision_texts_total", "Texts embedded", registry=registry)
    text_batch_sizes = Histogram("arrowvision_text_batch_size", "Texts per text-tower call", registry=registry,
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    def record(size: int, seconds: float) -> None:
        text_batch_sizes.observe(size)
        texts_total.inc(size)

    def run(texts: np.ndarray) -> np.ndarray:
        return model.text.encode([str(t) for t in texts], batch_size=max(1, len(texts)), normalize=False)

    state["text_batcher"] = batcher_factory(run, config.max_batch, config.max_wait_ms, config.max_queue, record)

    @app.exception_handler(TextProblem)
    async def text_problem_handler(request: Request, exc: TextProblem):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    async def payload(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise TextProblem(415, f"unsupported content type {content_type or '(none)'}; use application/json")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise TextProblem(413, f"request body over {config.max_body_bytes} bytes")
        try:
            value = json.loads(bytes(body) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TextProblem(422, f"malformed JSON: {exc}") from None
        if not isinstance(value, dict):
            raise TextProblem(422, "JSON body must be an object")
        return value

    def texts_of(value: dict[str, Any]) -> list[str]:
        texts = value.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TextProblem(422, "expected 'texts': a non-empty list of strings")
        if len(texts) > config.max_texts:
            raise TextProblem(413, f"{len(texts)} texts in one request; the limit is {config.max_texts}")
        too_long = [i for i, t in enumerate(texts) if len(t) > config.max_text_chars]
        if too_long:
            raise TextProblem(422, f"texts[{too_long[0]}] has {len(texts[too_long[0]])} characters; the limit is {config.max_text_chars}")
        return texts

    async def embed_texts(texts: list[str]) -> np.ndarray:
        batcher = state["text_batcher"]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(np.str_(t)) for t in texts)), config.request_timeout_s)
        except queue_full:
            raise TextProblem(503, "server busy: request queue is full", {"Retry-After": "1"}) from None
        except TimeoutError:
            raise TextProblem(504, f"timed out after {config.request_timeout_s} s") from None
        except ArrowVisionError as exc:
            raise TextProblem(422, str(exc)) from None
        return np.stack([vector for vector, _ in results]).astype(np.float32)

    @app.post("/v1/embed/text", summary="Embed a batch of texts (JSON {'texts': [...], 'normalize': true})")
    async def embed_text(request: Request):
        value = await payload(request)
        texts = texts_of(value)
        vectors = await embed_texts(texts)
        if value.get("normalize", True) not in (False, "false", 0):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1]), "model_checksum": model.checksum}

    @app.post("/v1/score", summary="Score one image against texts: logits, probabilities, CLIP scores")
    async def score(request: Request):
        import base64
        import binascii

        value = await payload(request)
        texts = texts_of(value)
        if not isinstance(value.get("image"), str):
            raise TextProblem(422, "expected 'image': base64 string")
        try:
            data = base64.b64decode(value["image"], validate=True)
        except (binascii.Error, ValueError):
            raise TextProblem(422, "'image' is not valid base64") from None
        try:
            image_result, text_vectors = await asyncio.gather(embed_image("image", data, True, False), embed_texts(texts))
        except ImageError as exc:
            problem = image_problem(exc)
            raise TextProblem(problem.status, problem.message) from None
        image_vector = np.asarray(image_result["embedding"], np.float32)[np.newaxis]
        logits = scoring.logits(image_vector, text_vectors, model.logit_scale, model.logit_bias)
        return {
            "texts": texts,
            "logits": logits[0].tolist(),
            "probabilities": scoring.probabilities(logits, model.family)[0].tolist(),
            "clip_score": scoring.clip_score(np.repeat(image_vector, len(texts), axis=0), text_vectors).tolist(),
            "family": model.family,
            "model_checksum": model.checksum,
        }
