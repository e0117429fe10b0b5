"""Image endpoints: ``POST /v1/embed`` (one image) and ``POST /v1/embed/batch`` (several; per-item
errors do not fail the others), and ``embed_image``, the one path from an uploaded image or URL
to an embedding that the text, OpenAI and search routes use too.

An image arrives as a multipart file, base64 or a data: URI in JSON, or an http(s) URL (fetched
with the SSRF guard); it is decoded in a worker thread, then queued for the model's image batcher.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from ..errors import ImageError
from ..inputs.preprocess import load_image, normalize_sketch_image
from ..inputs.urlfetch import UrlError, is_url
from ..util.similarity import l2_normalize
from . import tracing
from .common import (BadInput, ImageUrl, Problem, ServiceState, content_type, decode_base64, option, parse_json_object,
                     parse_multipart, problem_for, read_body, service_state, within)
from .profiles import ServedModel

router = APIRouter()
log = logging.getLogger("arrowvision.service")

_OPTIONS = {
    "normalize": {"type": "boolean", "default": True, "description": "L2-normalize the embedding"},
    "sketch": {"type": "boolean", "default": False, "description": "sketch-normalize the image first"},
    "model": {"type": "string", "description": "model profile (GET /v1/models); default: the service's default"},
}
_BASE64 = {"type": "string", "description": "base64 image bytes, a data:image/...;base64, URI, or an http(s) URL"}
_URL = {"type": "string", "format": "uri", "description": "http(s) URL of the image (fetched with the SSRF guard)"}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
RESPONSES = {status: {"description": text, "content": {"application/json": {"schema": _ERROR}}} for status, text in (
    (401, "API key missing or wrong"), (403, "image URL refused by the SSRF guard"), (404, "unknown model"),
    (413, "body, image count, pixels or fetched image over the limit"), (415, "unsupported content type"),
    (408, "request body not received in time"), (422, "malformed request, undecodable image or unfetchable URL"), (429, "rate limit exceeded"),
    (503, "queue full, model unavailable or shutting down"), (504, "timed out"))}


def request_body(many: bool) -> dict[str, Any]:
    """The OpenAPI request body of an embed endpoint (the handlers parse the body themselves)."""
    if many:
        form = {"type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                                 **_OPTIONS}, "required": ["files"]}
        body = {"type": "object", "properties": {"images": {"type": "array", "items": _BASE64},
                                                 "image_urls": {"type": "array", "items": _URL}, **_OPTIONS},
                "anyOf": [{"required": ["images"]}, {"required": ["image_urls"]}]}
    else:
        form = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}, **_OPTIONS},
                "required": ["file"]}
        body = {"type": "object", "properties": {"image": _BASE64, "image_url": _URL, **_OPTIONS},
                "oneOf": [{"required": ["image"]}, {"required": ["image_url"]}]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": body}}}}

def answered(served: ServedModel, body: dict[str, Any], start: float) -> dict[str, Any]:
    """Every answer names its model and its processing time."""
    return {**body, "model": served.name, "processing_time_ms": 1000 * (time.perf_counter() - start)}


def image_source(field: str, value: Any, *, url_only: bool = False) -> bytes | ImageUrl:
    """A JSON image field: an http(s) URL (fetched later) or base64 / a data: URI."""
    if not isinstance(value, str):
        raise Problem(422, f"'{field}' must be a string")
    if is_url(value):
        return ImageUrl(value.strip())
    if url_only:
        raise Problem(422, f"'{field}' must be an http(s) URL")
    try:
        return decode_base64(value)
    except (binascii.Error, ValueError):
        raise Problem(422, f"'{field}' is not valid base64 (or a data:image/...;base64, URI, or an http(s) URL)") from None


def _json_images(payload: dict[str, Any], many: bool) -> list[tuple[str, bytes | ImageUrl]]:
    """The images of a JSON body: ``images``/``image_urls`` (batch) or one ``image``/``image_url``."""
    files: list[tuple[str, bytes | ImageUrl]] = []
    if not many:
        given = [key for key in ("image", "image_url") if key in payload]
        if len(given) != 1:
            raise Problem(422, "expected 'image': base64 string or 'image_url': http(s) URL (exactly one)")
        return [(given[0], image_source(given[0], payload[given[0]], url_only=given[0] == "image_url"))]
    encoded, urls = payload.get("images", []), payload.get("image_urls", [])
    if not isinstance(encoded, list) or not isinstance(urls, list) or not (encoded or urls) \
            or not all(isinstance(e, str) for e in encoded + urls):
        raise Problem(422, "expected 'images': [base64 or URL, ...] and/or 'image_urls': [URL, ...]")
    for index, text in enumerate(encoded):
        try:
            files.append((f"images[{index}]", image_source(f"images[{index}]", text)))
        except Problem:
            files.append((f"images[{index}]", b""))  # reported per item
    for index, text in enumerate(urls):
        name = f"image_urls[{index}]"
        files.append((name, ImageUrl(text.strip()) if is_url(text) else BadInput(f"{name} is not an http(s) URL")))
    return files


async def parse(request: Request, many: bool) -> tuple[list[tuple[str, bytes | ImageUrl]], bool, bool, Any]:
    """-> ([(name, image bytes or URL)], normalize, sketch, model) from multipart or JSON."""
    config = service_state(request).config
    kind = content_type(request)
    params = request.query_params
    if kind == "multipart/form-data":
        form = await parse_multipart(request, await read_body(request, config.max_body_bytes))
        files: list[tuple[str, bytes | ImageUrl]] = [
            (getattr(v, "filename", None) or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
        fields: Any = form
    elif kind == "application/json":
        fields = parse_json_object(await read_body(request, config.max_body_bytes))
        files = _json_images(fields, many)
    else:
        raise Problem(415, f"unsupported content type {kind or '(none)'}; use multipart/form-data or application/json")
    normalize = option(fields.get("normalize", params.get("normalize")), True)
    sketch = option(fields.get("sketch", params.get("sketch")), False)
    model = fields.get("model", params.get("model"))
    if not files:
        raise Problem(422, "no image in the request")
    if not many and len(files) != 1:
        raise Problem(422, "send exactly one image to /v1/embed (use /v1/embed/batch for several)")
    if len(files) > config.max_batch_items:
        raise Problem(413, f"{len(files)} images in one request; the limit is {config.max_batch_items}")
    return files, normalize, sketch, model


def decode(state: ServiceState, served: ServedModel, name: str, data: bytes, sketch: bool) -> np.ndarray:
    if not data:
        raise ImageError(f"{name}: empty or invalid image data")
    image = load_image(data, max_pixels=state.config.max_pixels, name=name)
    if sketch:
        image = normalize_sketch_image(image)
    return served.encoder.prepare(image)  # uint8 for backends that normalize on their device


async def fetch(state: ServiceState, url: ImageUrl) -> bytes:
    with tracing.span("fetch", **{"url.full": tracing.redact(url)}):
        try:
            data = await state.fetcher.fetch(url)
        except UrlError as exc:
            state.metrics.url_fetches.labels(type(exc).__name__).inc()
            raise
    state.metrics.url_fetches.labels("ok").inc()
    return data


async def embed_image(state: ServiceState, served: ServedModel, name: str, source: bytes | ImageUrl, normalize: bool,
                      sketch: bool) -> dict[str, Any]:
    """One image (bytes, or a URL to fetch) -> its embedding and timings, through the batcher of
    ``served``. Raises the table's errors (``ImageError``, ``QueueFull``...) and 504 on timeout."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    data = await fetch(state, source) if isinstance(source, ImageUrl) else source
    fetched = time.perf_counter()
    label = str(source) if isinstance(source, ImageUrl) else name  # errors name the URL
    with tracing.span("decode", **{"arrowvision.input": label}):
        pixels = await loop.run_in_executor(state.decode_pool, decode, state, served, label, data, sketch)
    decoded = time.perf_counter()
    vector, inference = await within(served.image.submit(pixels), state.config.request_timeout_s)
    done = time.perf_counter()
    model_started = max(decoded, done - inference)
    tracing.record_span("queue wait", decoded, model_started, **{"arrowvision.model": served.name})
    tracing.record_span("model call", model_started, done, **{"arrowvision.model": served.name})
    vector = l2_normalize(vector) if normalize else vector
    timing = {"decode": 1000 * (decoded - fetched), "inference": 1000 * inference,
              "queue": 1000 * max(0.0, done - decoded - inference), "total": 1000 * (done - start)}
    if isinstance(source, ImageUrl):
        timing["fetch"] = 1000 * (fetched - start)
    return {
        "embedding": vector.astype(np.float32).tolist(),
        "dim": int(vector.shape[0]),
        "model_checksum": served.encoder.checksum,
        "timing_ms": timing,
    }


@router.post("/v1/embed", summary="Embed one image (multipart 'file', JSON {'image': base64} or {'image_url': URL})",
             openapi_extra=request_body(many=False), responses=RESPONSES)
async def embed(request: Request):
    start = time.perf_counter()
    files, normalize, sketch, model = await parse(request, many=False)
    state = service_state(request)
    async with state.models.use(model, request) as served:
        return answered(served, await embed_image(state, served, *files[0], normalize, sketch), start)


@router.post("/v1/embed/batch", summary="Embed several images; per-item errors do not fail the others",
             openapi_extra=request_body(many=True), responses=RESPONSES)
async def embed_batch(request: Request):
    start = time.perf_counter()
    files, normalize, sketch, model = await parse(request, many=True)
    state = service_state(request)

    async def one(served: ServedModel, name: str, data: bytes | ImageUrl) -> dict[str, Any]:
        if isinstance(data, BadInput):
            return {"error": str(data), "status": 422}
        try:
            return await embed_image(state, served, name, data, normalize, sketch)
        except Exception as exc:  # noqa: BLE001 - the table's errors are this item's answer
            problem = problem_for(exc)
            if problem is None:  # a crash fails this item only (logged)
                log.exception("%s: embedding failed", name)
                return {"error": f"internal error ({type(exc).__name__}); the server log has the details", "status": 500}
            return {"error": problem.message, "status": problem.status}

    async with state.models.use(model, request) as served:
        results = await asyncio.gather(*(one(served, name, data) for name, data in files))
        return answered(served, {"results": results, "model_checksum": served.encoder.checksum,
                                 "dim": served.encoder.embedding_dim}, start)
