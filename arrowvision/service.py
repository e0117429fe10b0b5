"""HTTP embedding service: FastAPI + uvicorn, dynamic micro-batching, Prometheus metrics.

Requests are decoded in worker threads, then queued for the ``MicroBatcher``, which groups
whatever arrives within ``max_wait_ms`` (up to ``max_batch`` images) into one inference call run
off the event loop. The queue is bounded: when it is full the service answers 503 with
Retry-After instead of letting latency grow without limit.

Where the model runs is pluggable (``ImageModel``): in this process (``LocalModel``, the
default), or in Ray Serve replicas (``arrowvision.distributed.serve``) behind the same routes,
validation and metrics.

Around that core, each in its own module: image URLs fetched with an SSRF guard (``urlfetch``),
named models loaded lazily into an LRU, each with its own image model and text batcher
(``service_models``), the text endpoints (``service_text``), OpenAI-compatible
``/v1/embeddings`` (``service_openai``), API key, CORS and rate limit (``service_security``),
request ids, logs and OpenTelemetry spans (``tracing``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import functools
import logging
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, Response

from . import tracing
from .encoder import VisionEncoder, l2_normalize
from .errors import ArrowVisionError, ImageError, ImageTooLarge
from .service_batching import run_isolating_failures
from .service_docs import add_docs_routes
from .service_http import BodyDeadlineMiddleware, Problem, install_error_handlers, parse_json_object
from .service_http import read_body as read_limited_body
from .preprocess import MAX_PIXELS, load_image, normalize_sketch_image
from .service_models import ModelRegistry, ModelUnavailable, ServedModel, UnknownModel
from .service_security import SecurityConfig, add_security
from .tracing import RequestContextMiddleware
from .urlfetch import AsyncUrlFetcher, UrlError, UrlPolicy, is_url

log = logging.getLogger("arrowvision.service")


DATA_URI = re.compile(r"^data:(?:image/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URI (what browsers' FileReader produces)."""
    return base64.b64decode(DATA_URI.sub("", text.strip(), count=1), validate=True)


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


@dataclass
class ServiceConfig:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_batch_items: int = 64  # images per /v1/embed/batch request
    request_timeout_s: float = 30.0
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (408 after)
    decode_threads: int = 2
    max_texts: int = 64  # texts per /v1/embed/text or /v1/score request (413 above)
    max_text_chars: int = 1000  # characters per text (422 above)
    allow_private_urls: bool = False  # image URLs may point at loopback/private/link-local hosts
    url_timeout_s: float = 20.0  # a whole image-URL fetch, redirects included
    url_connect_timeout_s: float = 5.0
    url_read_timeout_s: float = 10.0  # longest silence while fetching
    url_max_redirects: int = 5

    def url_policy(self) -> UrlPolicy:
        """Image URLs: the upload byte limit, these timeouts, the SSRF guard unless allowed."""
        return UrlPolicy(max_bytes=self.max_body_bytes, connect_timeout_s=self.url_connect_timeout_s,
                         read_timeout_s=self.url_read_timeout_s, total_timeout_s=self.url_timeout_s,
                         max_redirects=self.url_max_redirects, allow_private=self.allow_private_urls)


class QueueFull(Exception):
    pass


class MalformedRequest(Exception):
    pass


class MicroBatcher:
    """Collects single images from concurrent requests into batches for one model call.

    A lone request runs at once (no added latency); under concurrency, whatever queued while
    the model was busy forms the next batch, topped up for at most ``max_wait_ms``."""

    def __init__(self, run, max_batch: int, max_wait_ms: float, max_queue: int, on_batch=None):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="arrowvision-infer")  # one model, one runner
        self.task: asyncio.Task | None = None
        self.in_flight = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Queue one preprocessed image; resolves to (embedding, inference seconds of its batch)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((pixels, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():  # whatever queued up meanwhile
                batch.append(self.queue.get_nowait())
            if len(batch) > 1:  # concurrent traffic: give stragglers up to max_wait to join
                deadline = loop.time() + self.max_wait
                while len(batch) < self.max_batch and (remaining := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except TimeoutError:
                        break
            live = [(p, f) for p, f in batch if not f.cancelled()]  # timed-out requests drop out
            if not live:
                continue
            self.in_flight = len(live)
            start = time.perf_counter()
            try:  # a failing batch is bisected: one bad item fails only itself (service_batching)
                outputs = await loop.run_in_executor(self.executor, run_isolating_failures, self.run, [p for p, _ in live])
            finally:
                self.in_flight = 0
            seconds = time.perf_counter() - start
            self.on_batch(len(live), seconds)
            for (_, future), output in zip(live, outputs):
                if future.done():
                    continue
                if isinstance(output, Exception):
                    future.set_exception(output)
                else:
                    future.set_result((output, seconds))

    async def drain(self, timeout: float) -> None:
        """Wait until everything queued has been answered (graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while (not self.queue.empty() or self.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)


class ImageModel(Protocol):
    """Where the image model runs for the service: started (warmed up) by the app's lifespan,
    fed one preprocessed image per ``submit``, drained at shutdown."""

    async def start(self) -> None: ...  # raises if the model cannot embed (reported by /health)

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]: ...  # QueueFull, ModelUnavailable

    def queue_depth(self) -> int: ...

    def health(self) -> dict[str, Any]: ...  # extra /health fields; "ready": False makes it 503

    async def drain(self, timeout: float) -> None: ...


class LocalModel:
    """The model in this process, fed by a ``MicroBatcher`` (the default ``ImageModel``)."""

    def __init__(self, encoder: VisionEncoder, config: ServiceConfig, on_batch: Callable[[int, float], None]):
        self.encoder = encoder
        # run_prepared: uint8 rows for backends that normalize on their device (torch), else float32
        self.batcher = MicroBatcher(encoder.run_prepared, config.max_batch, config.max_wait_ms, config.max_queue, on_batch)

    def _warm_up(self) -> None:
        """One inference on a blank image: /health says the model is loaded only once it has
        actually produced an embedding of the right size (and OpenVINO has compiled it)."""
        size = self.encoder.config.image_size
        output = np.asarray(self.encoder.backend(np.zeros((1, self.encoder.config.num_channels, size, size), np.float32)))
        if output.shape != (1, self.encoder.embedding_dim):
            raise ValueError(f"warm-up produced shape {output.shape}, expected (1, {self.encoder.embedding_dim})")

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.batcher.executor, self._warm_up)
        finally:
            self.batcher.start()  # a failed warm-up still leaves a service that answers /health

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        return await self.batcher.submit(pixels)

    def queue_depth(self) -> int:
        return self.batcher.queue.qsize()

    def health(self) -> dict[str, Any]:
        return {}

    async def drain(self, timeout: float) -> None:
        await self.batcher.drain(timeout)


def create_app(encoder: VisionEncoder | ModelRegistry, config: ServiceConfig | None = None, text_model: Any = None,
               index: Any = None, *, model: Callable[[Callable[[int, float], None]], ImageModel] | None = None,
               security: SecurityConfig | None = None, name: str | None = None):
    """The FastAPI application serving ``encoder`` (with ``text_model``, an ``ImageTextModel``, also
    the text endpoints of ``service_text``), or every model of a ``ModelRegistry`` (profiles).
    With ``index`` (a ``VectorIndex``) the search endpoints and page of ``service_search`` (they
    use the default model). ``model(on_batch)`` builds the ``ImageModel`` that runs inference of a
    single model (default: ``LocalModel``, this process; profiles always run locally).
    ``security``: API key, CORS, rate limit (``service_security``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    config = config or ServiceConfig()
    models = encoder if isinstance(encoder, ModelRegistry) else ModelRegistry.single(encoder, text_model, name)
    registry = CollectorRegistry()
    requests_total = Counter("arrowvision_requests_total", "HTTP requests by endpoint, status and model",
                             ["endpoint", "status", "model"], registry=registry)
    latency = Histogram("arrowvision_request_latency_seconds", "Request latency", ["endpoint", "model"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch_sizes = Histogram("arrowvision_batch_size", "Images per model call", ["model"], registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    inference_seconds = Histogram("arrowvision_inference_seconds", "Model call duration", ["model"], registry=registry)
    queue_depth = Gauge("arrowvision_queue_depth", "Images waiting for the model", ["model"], registry=registry)
    images_total = Counter("arrowvision_images_total", "Images embedded", ["model"], registry=registry)
    url_fetches = Counter("arrowvision_url_fetches_total", "Image URL fetches by outcome", ["outcome"], registry=registry)
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="arrowvision-decode")
    state: dict[str, Any] = {"accepting": True, "started": False, "models": models, "fetcher": None}
    recorders: dict[str, Any] = {}

    if model is not None and isinstance(encoder, ModelRegistry):
        raise ArrowVisionError("model profiles run in this process: a custom image model serves a single model")

    def make_image_model(name: str, model_encoder: VisionEncoder) -> ImageModel:
        """One image model per served model (models never share a batch), with its own metrics."""
        def record(size: int, seconds: float) -> None:
            batch_sizes.labels(name).observe(size)
            inference_seconds.labels(name).observe(seconds)
            images_total.labels(name).inc(size)

        image_model = model(record) if model is not None else LocalModel(model_encoder, config, record)
        queue_depth.labels(name).set_function(image_model.queue_depth)
        return image_model

    def make_text_batcher(name: str, run) -> MicroBatcher:
        return MicroBatcher(run, config.max_batch, config.max_wait_ms, config.max_queue,
                            functools.partial(recorders["text"], name))

    @asynccontextmanager
    async def lifespan(app):
        state["fetcher"] = AsyncUrlFetcher(config.url_policy())
        await models.start(make_image_model, make_text_batcher)
        default = models.loaded.get(models.default)
        if default is not None and default.text_batcher is not None:
            state["text_batcher"] = default.text_batcher  # the search endpoints' text queries
        state["started"] = True
        yield
        state["accepting"] = False
        await models.close(config.request_timeout_s)
        await state["fetcher"].close()
        state["started"] = False
        tracing.flush()
        decode_pool.shutdown(wait=False)

    app = FastAPI(title="arrowvision", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="SigLIP/CLIP image embeddings with dynamic micro-batching.")
    app.state.models = models
    add_docs_routes(app, "arrowvision")  # Swagger UI from the package, not a CDN (service_docs)

    install_error_handlers(app)  # every error body is {"error": ...} JSON, 500s included

    @app.exception_handler(MalformedRequest)
    async def malformed_handler(request: Request, exc: MalformedRequest):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(UnknownModel)
    async def unknown_model_handler(request: Request, exc: UnknownModel):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ModelUnavailable)
    async def unavailable_handler(request: Request, exc: ModelUnavailable):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        endpoint = request.url.path
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            response = JSONResponse({"error": f"request body over {config.max_body_bytes} bytes"}, status_code=413)
        elif not state["accepting"] and endpoint.startswith("/v1/"):
            response = JSONResponse({"error": "shutting down"}, status_code=503, headers={"Retry-After": "1"})
        else:
            response = await call_next(request)
        if endpoint.startswith("/v1/"):
            model = getattr(request.state, "model", "")
            requests_total.labels(endpoint, str(response.status_code), model).inc()
            latency.labels(endpoint, model).observe(time.perf_counter() - start)
        return response

    async def read_body(request: Request) -> bytes:
        return await read_limited_body(request, config.max_body_bytes)

    def option(value: Any, default: bool) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")

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

    async def parse(request: Request, many: bool) -> tuple[list[tuple[str, bytes | ImageUrl]], bool, bool, Any]:
        """-> ([(name, image bytes or URL)], normalize, sketch, model) from multipart or JSON."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = request.query_params
        if content_type == "multipart/form-data":
            body = await read_body(request)
            form = await _parse_multipart(request, body)
            files: list[tuple[str, bytes | ImageUrl]] = [
                (getattr(v, "filename", None) or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            normalize, sketch = option(form.get("normalize", params.get("normalize")), True), option(form.get("sketch", params.get("sketch")), False)
            model = form.get("model", params.get("model"))
        elif content_type == "application/json":
            payload = parse_json_object(await read_body(request))
            files = []
            if many:
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
            else:
                given = [key for key in ("image", "image_url") if key in payload]
                if len(given) != 1:
                    raise Problem(422, "expected 'image': base64 string or 'image_url': http(s) URL (exactly one)")
                files.append((given[0], image_source(given[0], payload[given[0]], url_only=given[0] == "image_url")))
            normalize = option(payload.get("normalize", params.get("normalize")), True)
            sketch = option(payload.get("sketch", params.get("sketch")), False)
            model = payload.get("model", params.get("model"))
        else:
            raise Problem(415, f"unsupported content type {content_type or '(none)'}; use multipart/form-data or application/json")
        if not files:
            raise Problem(422, "no image in the request")
        if not many and len(files) != 1:
            raise Problem(422, "send exactly one image to /v1/embed (use /v1/embed/batch for several)")
        if len(files) > config.max_batch_items:
            raise Problem(413, f"{len(files)} images in one request; the limit is {config.max_batch_items}")
        return files, normalize, sketch, model

    def decode(served: ServedModel, name: str, data: bytes, sketch: bool) -> np.ndarray:
        if not data:
            raise ImageError(f"{name}: empty or invalid image data")
        image = load_image(data, max_pixels=config.max_pixels, name=name)
        if sketch:
            image = normalize_sketch_image(image)
        return served.encoder.prepare(image)  # uint8 for backends that normalize on their device

    async def fetch(url: ImageUrl) -> bytes:
        with tracing.span("fetch", **{"url.full": tracing.redact(url)}):
            try:
                data = await state["fetcher"].fetch(url)
            except UrlError as exc:
                url_fetches.labels(type(exc).__name__).inc()
                raise
        url_fetches.labels("ok").inc()
        return data

    async def embed_one(served: ServedModel, name: str, source: bytes | ImageUrl, normalize: bool, sketch: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        data = await fetch(source) if isinstance(source, ImageUrl) else source
        fetched = time.perf_counter()
        label = str(source) if isinstance(source, ImageUrl) else name  # errors name the URL
        with tracing.span("decode", **{"arrowvision.input": label}):
            pixels = await loop.run_in_executor(decode_pool, decode, served, label, data, sketch)
        decoded = time.perf_counter()
        try:
            vector, inference = await asyncio.wait_for(served.image.submit(pixels), config.request_timeout_s)
        except QueueFull:
            raise Problem(503, "server busy: request queue is full", {"Retry-After": "1"}) from None
        except ModelUnavailable as exc:
            raise Problem(503, f"model unavailable: {exc}", {"Retry-After": "1"}) from None
        except TimeoutError:
            raise Problem(504, f"timed out after {config.request_timeout_s} s") from None
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

    def image_problem(exc: ImageError) -> Problem:
        status = getattr(exc, "status", None) or (413 if isinstance(exc, ImageTooLarge) else 422)
        return Problem(status, str(exc))

    def answered(request: Request, served: ServedModel, body: dict[str, Any], start: float) -> dict[str, Any]:
        """Every answer names its model and its processing time."""
        return {**body, "model": served.name, "processing_time_ms": 1000 * (time.perf_counter() - start)}

    @app.post("/v1/embed", summary="Embed one image (multipart 'file', JSON {'image': base64} or {'image_url': URL})",
              openapi_extra=request_body(many=False), responses=RESPONSES)
    async def embed(request: Request):
        start = time.perf_counter()
        files, normalize, sketch, model = await parse(request, many=False)
        async with models.use(model, request) as served:
            try:
                return answered(request, served, await embed_one(served, *files[0], normalize, sketch), start)
            except ImageError as exc:
                raise image_problem(exc) from None

    @app.post("/v1/embed/batch", summary="Embed several images; per-item errors do not fail the others",
              openapi_extra=request_body(many=True), responses=RESPONSES)
    async def embed_batch(request: Request):
        start = time.perf_counter()
        files, normalize, sketch, model = await parse(request, many=True)

        async def one(served: ServedModel, name: str, data: bytes | ImageUrl) -> dict[str, Any]:
            if isinstance(data, BadInput):
                return {"error": str(data), "status": 422}
            try:
                return await embed_one(served, name, data, normalize, sketch)
            except ImageError as exc:
                problem = image_problem(exc)
                return {"error": problem.message, "status": problem.status}
            except Problem as problem:
                return {"error": problem.message, "status": problem.status}
            except Exception as exc:  # noqa: BLE001 - one item's crash fails that item only (logged)
                log.exception("%s: embedding failed", name)
                return {"error": f"internal error ({type(exc).__name__}); the server log has the details", "status": 500}

        async with models.use(model, request) as served:
            results = await asyncio.gather(*(one(served, name, data) for name, data in files))
            return answered(request, served, {"results": results, "model_checksum": served.encoder.checksum,
                                              "dim": served.encoder.embedding_dim}, start)

    @app.get("/v1/models", summary="The models this service serves (family, towers, dimension, backend)")
    async def list_models():
        return {"object": "list", "data": models.describe(), "default": models.default}

    embed_texts = None
    if models.has_text:
        from .service_text import add_text_routes

        embed_texts = add_text_routes(app, models, config, registry=registry, recorders=recorders, embed_image=embed_one,
                                      image_problem=image_problem, queue_full=QueueFull, answered=answered)

    from .service_openai import add_openai_routes

    add_openai_routes(app, models, config, embed_image=embed_one, embed_texts=embed_texts)

    if index is not None:
        from .service_search import add_search_routes

        async def embed_default(name: str, data: Any, normalize: bool, sketch: bool) -> dict[str, Any]:
            async with models.use(None) as served:  # search runs on the default model
                return await embed_one(served, name, data, normalize, sketch)

        default_spec = models.specs[models.default]
        add_search_routes(app, index, config, model_checksum=default_spec.info.get("model_checksum"), state=state,
                          embed_image=embed_default, image_problem=image_problem, text_model=text_model,
                          queue_full=QueueFull)

    @app.get("/health", summary="Model loaded, backend and device (503 unless ready to embed)")
    async def health():
        served = models.loaded.get(models.default)
        model_error = (served.error if served else None) or models.failures.get(models.default)
        model_loaded = bool(state["started"] and served is not None and served.error is None)
        extra = served.image.health() if served is not None else {}
        ready = extra.pop("ready", True)  # e.g. no model replica running
        if not state["accepting"]:
            status = "shutting down"
        elif model_loaded and ready:
            status = "ok"
        else:
            status = "unavailable" if model_error or model_loaded else "starting"
        spec = models.specs[models.default]
        backend = served.encoder.backend if served else None
        body = {"status": status, "model_loaded": model_loaded, "backend": backend.name if backend else spec.backend or None,
                "device": str(getattr(backend, "device", "cpu")), "precision": getattr(backend, "precision", "fp32"),
                "family": spec.info.get("family"), "dim": spec.info.get("dim"), "model_checksum": spec.info.get("model_checksum"),
                "text": served.text_model is not None if served else "text" in spec.info.get("towers", ()),
                "model": models.default, "models": {n: n in models.loaded for n in models.specs}, **extra}
        if model_error:
            body["error"] = model_error
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyDeadlineMiddleware, timeout_s=config.body_timeout_s)  # a slow body: 408
    add_security(app, security)
    app.add_middleware(RequestContextMiddleware)  # outermost: request id and span around everything
    return app


class ImageUrl(str):
    """An image given by http(s) URL in a JSON body (fetched with the SSRF guard)."""


class BadInput(str):
    """An item of a batch request that is unusable as given (reported in its result)."""


async def _parse_multipart(request, body: bytes):
    """Parse an already-read (size-checked) multipart body with Starlette's parser."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        return await MultiPartParser(Headers(scope=request.scope), stream(), max_part_size=len(body) + 1).parse()
    except MultiPartException as exc:
        raise MalformedRequest(f"malformed multipart body: {exc.message}") from None


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (port busy, unknown host) before anything loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ArrowVisionError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ArrowVisionError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def serve(encoder: VisionEncoder | ModelRegistry, host: str = "127.0.0.1", port: int = 8000,
          config: ServiceConfig | None = None, *, sock: socket.socket | None = None, access_log: bool = True,
          model_name: str | None = None, text_model: Any = None, index: Any = None,
          security: SecurityConfig | None = None, log_format: str = "text") -> None:
    """Run the service until SIGINT/SIGTERM (then drain). ``encoder``: one model, or a
    ``ModelRegistry`` of profiles; ``sock``: an already listening socket; ``text_model`` (an
    ``ImageTextModel``) adds the text endpoints, ``index`` the search ones; ``security``: API key,
    CORS, rate limit; ``log_format``: text or json (every line carries the request id). OTEL_*
    variables turn on tracing (see ``arrowvision.tracing``)."""
    import uvicorn

    from .service_uvicorn import server_config

    config = config or ServiceConfig()
    sock = sock or listen(host, port)
    host, port = sock.getsockname()[:2]
    if isinstance(encoder, ModelRegistry):
        names = ", ".join(f"{n}{' (default)' if n == encoder.default else ''}" for n in encoder.specs)
        lines = [f"arrowvision serving models {names} at http://{host}:{port}"]
    else:
        backend = encoder.backend
        lines = [f"arrowvision serving {model_name or encoder.weights.path} ({encoder.config.family}, dim {encoder.embedding_dim}) "
                 f"with {backend.name} {getattr(backend, 'precision', 'fp32')} on {getattr(backend, 'device', 'cpu')} "
                 f"at http://{host}:{port}"]
    if security and security.api_key:
        lines.append("API key required (Authorization: Bearer ...) on every endpoint but /health")
    app = create_app(encoder, config, text_model, index, security=security)
    server = uvicorn.Server(server_config(app, security=security, access_log=access_log, log_format=log_format,
                                          graceful_shutdown_s=int(config.request_timeout_s)))
    for line in lines:  # JSON logs stay all JSON; text keeps the plain start-up line
        log.warning(line) if log_format == "json" else print(line, file=sys.stderr, flush=True)
    tracing.configure_from_environment()
    server.run(sockets=[sock])
    if not server.started:
        raise ArrowVisionError("the service failed to start (see the log above)")
