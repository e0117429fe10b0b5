"""HTTP embedding service: FastAPI + uvicorn, dynamic micro-batching, Prometheus metrics.

Requests are decoded in worker threads, then queued for the ``MicroBatcher``, which groups
whatever arrives within ``max_wait_ms`` (up to ``max_batch`` images) into one inference call run
off the event loop. The queue is bounded: when it is full the service answers 503 with
Retry-After instead of letting latency grow without limit.

Where the model runs is pluggable (``ImageModel``): in this process (``LocalModel``, the
default), or in Ray Serve replicas (``arrowvision.distributed.serve``) behind the same routes,
validation and metrics.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .encoder import VisionEncoder, l2_normalize
from .errors import ArrowVisionError, ImageError, ImageTooLarge
from .preprocess import MAX_PIXELS, load_image, normalize_sketch_image

log = logging.getLogger("arrowvision.service")


DATA_URI = re.compile(r"^data:(?:image/[\w.+-]+)?(?:;[\w-]+=[^;,]*)*;base64,", re.IGNORECASE)


def decode_base64(text: str) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URI (what browsers' FileReader produces)."""
    return base64.b64decode(DATA_URI.sub("", text.strip(), count=1), validate=True)


_OPTIONS = {
    "normalize": {"type": "boolean", "default": True, "description": "L2-normalize the embedding"},
    "sketch": {"type": "boolean", "default": False, "description": "sketch-normalize the image first"},
}
_BASE64 = {"type": "string", "description": "base64 image bytes, or a data:image/...;base64, URI"}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
RESPONSES = {status: {"description": text, "content": {"application/json": {"schema": _ERROR}}} for status, text in (
    (413, "body, image count or pixels over the limit"), (415, "unsupported content type"),
    (422, "malformed request or undecodable image"), (503, "queue full or shutting down"), (504, "timed out"))}


def request_body(many: bool) -> dict[str, Any]:
    """The OpenAPI request body of an embed endpoint (the handlers parse the body themselves)."""
    if many:
        form = {"type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                                                 **_OPTIONS}, "required": ["files"]}
        body = {"type": "object", "properties": {"images": {"type": "array", "items": _BASE64}, **_OPTIONS},
                "required": ["images"]}
    else:
        form = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}, **_OPTIONS},
                "required": ["file"]}
        body = {"type": "object", "properties": {"image": _BASE64, **_OPTIONS}, "required": ["image"]}
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
    decode_threads: int = 2
    max_texts: int = 64  # texts per /v1/embed/text or /v1/score request (413 above)
    max_text_chars: int = 1000  # characters per text (422 above)


class QueueFull(Exception):
    pass


class MalformedRequest(Exception):
    pass


class ModelUnavailable(Exception):
    """The model cannot answer now (e.g. its replica died); the client should retry (503)."""


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
            try:
                outputs = await loop.run_in_executor(self.executor, self.run, np.stack([p for p, _ in live]))
            except Exception as exc:  # the model failed: every waiter gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.in_flight = 0
            seconds = time.perf_counter() - start
            self.on_batch(len(live), seconds)
            for (_, future), output in zip(live, outputs):
                if not future.done():
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


def create_app(encoder: VisionEncoder, config: ServiceConfig | None = None, text_model: Any = None, index: Any = None, *,
               model: Callable[[Callable[[int, float], None]], ImageModel] | None = None):
    """The FastAPI application serving ``encoder``; with ``text_model`` (an ``ImageTextModel``)
    also the text endpoints of ``service_text``; with ``index`` (a ``VectorIndex``) the search
    endpoints and page of ``service_search``. ``model(on_batch)`` builds the ``ImageModel``
    that runs inference (default: ``LocalModel``, this process)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    config = config or ServiceConfig()
    registry = CollectorRegistry()
    requests_total = Counter("arrowvision_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry)
    latency = Histogram("arrowvision_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch_sizes = Histogram("arrowvision_batch_size", "Images per model call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    inference_seconds = Histogram("arrowvision_inference_seconds", "Model call duration", registry=registry)
    queue_depth = Gauge("arrowvision_queue_depth", "Images waiting for the model", registry=registry)
    images_total = Counter("arrowvision_images_total", "Images embedded", registry=registry)
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="arrowvision-decode")
    state: dict[str, Any] = {"accepting": True, "model_loaded": False, "model_error": None}

    def record_batch(size: int, seconds: float) -> None:
        batch_sizes.observe(size)
        inference_seconds.observe(seconds)
        images_total.inc(size)

    @asynccontextmanager
    async def lifespan(app):
        image_model = model(record_batch) if model is not None else LocalModel(encoder, config, record_batch)
        try:
            await image_model.start()
            state["model_loaded"] = True
        except Exception as exc:  # keep serving /health, which reports the failure
            log.exception("model warm-up failed")
            state["model_error"] = f"{type(exc).__name__}: {exc}"
        queue_depth.set_function(image_model.queue_depth)
        state["model"] = image_model
        if "text_batcher" in state:
            state["text_batcher"].start()
        yield
        state["accepting"] = False
        await image_model.drain(config.request_timeout_s)
        if "text_batcher" in state:
            await state["text_batcher"].drain(config.request_timeout_s)
        state["model_loaded"] = False
        decode_pool.shutdown(wait=False)

    app = FastAPI(title="arrowvision", version="0.1.0", lifespan=lifespan,
                  description="SigLIP/CLIP image embeddings with dynamic micro-batching.")

    class HTTPProblem(Exception):
        def __init__(self, status: int, message: str, headers: dict | None = None):
            self.status, self.message, self.headers = status, message, headers

    @app.exception_handler(HTTPProblem)
    async def problem_handler(request: Request, exc: HTTPProblem):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(MalformedRequest)
    async def malformed_handler(request: Request, exc: MalformedRequest):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_handler(request: Request, exc: StarletteHTTPException):  # 404, 405... in our shape
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_handler(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "; ".join(str(e.get("msg", e)) for e in exc.errors()) or "invalid request"}, status_code=422)

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
            requests_total.labels(endpoint, str(response.status_code)).inc()
            latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # enforce the limit for chunked bodies too
            body += chunk
            if len(body) > config.max_body_bytes:
                raise HTTPProblem(413, f"request body over {config.max_body_bytes} bytes")
        return bytes(body)

    def option(value: Any, default: bool) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")

    async def parse(request: Request, many: bool) -> tuple[list[tuple[str, bytes]], bool, bool]:
        """-> ([(name, image bytes)], normalize, sketch) from multipart or JSON (base64)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = request.query_params
        if content_type == "multipart/form-data":
            body = await read_body(request)
            form = await _parse_multipart(request, body)
            files = [(getattr(v, "filename", None) or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            normalize, sketch = option(form.get("normalize", params.get("normalize")), True), option(form.get("sketch", params.get("sketch")), False)
        elif content_type == "application/json":
            import json

            body = await read_body(request)
            try:
                payload = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise HTTPProblem(422, f"malformed JSON: {exc}") from None
            if not isinstance(payload, dict):
                raise HTTPProblem(422, "JSON body must be an object")
            encoded = payload.get("images") if many else [payload.get("image")]
            if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
                raise HTTPProblem(422, "expected 'images': [base64, ...]" if many else "expected 'image': base64 string")
            files = []
            for index, text in enumerate(encoded):
                try:
                    files.append((f"images[{index}]", decode_base64(text)))
                except (binascii.Error, ValueError):
                    if not many:
                        raise HTTPProblem(422, "'image' is not valid base64 (or a data:image/...;base64, URI)") from None
                    files.append((f"images[{index}]", b""))  # reported per item
            normalize = option(payload.get("normalize", params.get("normalize")), True)
            sketch = option(payload.get("sketch", params.get("sketch")), False)
        else:
            raise HTTPProblem(415, f"unsupported content type {content_type or '(none)'}; use multipart/form-data or application/json")
        if not files:
            raise HTTPProblem(422, "no image in the request")
        if not many and len(files) != 1:
            raise HTTPProblem(422, "send exactly one image to /v1/embed (use /v1/embed/batch for several)")
        if len(files) > config.max_batch_items:
            raise HTTPProblem(413, f"{len(files)} images in one request; the limit is {config.max_batch_items}")
        return files, normalize, sketch

    def decode(name: str, data: bytes, sketch: bool) -> np.ndarray:
        if not data:
            raise ImageError(f"{name}: empty or invalid image data")
        image = load_image(data, max_pixels=config.max_pixels, name=name)
        if sketch:
            image = normalize_sketch_image(image)
        return encoder.prepare(image)  # uint8 for backends that normalize on their device

    async def embed_one(name: str, data: bytes, normalize: bool, sketch: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        pixels = await loop.run_in_executor(decode_pool, decode, name, data, sketch)
        decoded = time.perf_counter()
        try:
            vector, inference = await asyncio.wait_for(state["model"].submit(pixels), config.request_timeout_s)
        except QueueFull:
            raise HTTPProblem(503, "server busy: request queue is full", {"Retry-After": "1"}) from None
        except ModelUnavailable as exc:
            raise HTTPProblem(503, f"model unavailable: {exc}", {"Retry-After": "1"}) from None
        except TimeoutError:
            raise HTTPProblem(504, f"timed out after {config.request_timeout_s} s") from None
        vector = l2_normalize(vector) if normalize else vector
        done = time.perf_counter()
        return {
            "embedding": vector.astype(np.float32).tolist(),
            "dim": int(vector.shape[0]),
            "model_checksum": encoder.checksum,
            "timing_ms": {"decode": 1000 * (decoded - start), "inference": 1000 * inference,
                          "queue": 1000 * max(0.0, done - decoded - inference), "total": 1000 * (done - start)},
        }

    def image_problem(exc: ImageError) -> HTTPProblem:
        return HTTPProblem(413 if isinstance(exc, ImageTooLarge) else 422, str(exc))

    @app.post("/v1/embed", summary="Embed one image (multipart 'file' or JSON {'image': base64})",
              openapi_extra=request_body(many=False), responses=RESPONSES)
    async def embed(request: Request):
        files, normalize, sketch = await parse(request, many=False)
        try:
            return await embed_one(*files[0], normalize, sketch)
        except ImageError as exc:
            raise image_problem(exc) from None

    @app.post("/v1/embed/batch", summary="Embed several images; per-item errors do not fail the others",
              openapi_extra=request_body(many=True), responses=RESPONSES)
    async def embed_batch(request: Request):
        files, normalize, sketch = await parse(request, many=True)

        async def one(name: str, data: bytes) -> dict[str, Any]:
            try:
                return await embed_one(name, data, normalize, sketch)
            except ImageError as exc:
                problem = image_problem(exc)
                return {"error": problem.message, "status": problem.status}
            except HTTPProblem as problem:
                return {"error": problem.message, "status": problem.status}

        results = await asyncio.gather(*(one(name, data) for name, data in files))
        return {"results": results, "model_checksum": encoder.checksum, "dim": encoder.embedding_dim}

    if text_model is not None:
        from .service_text import add_text_routes

        add_text_routes(app, text_model, config, registry=registry, state=state, embed_image=embed_one,
                        image_problem=image_problem, batcher_factory=MicroBatcher, queue_full=QueueFull)

    if index is not None:
        from .service_search import add_search_routes

        add_search_routes(app, index, config, model_checksum=encoder.checksum, state=state, embed_image=embed_one,
                          image_problem=image_problem, text_model=text_model, queue_full=QueueFull)

    @app.get("/health", summary="Model loaded, backend and device (503 unless ready to embed)")
    async def health():
        backend = encoder.backend
        extra = state["model"].health() if "model" in state else {}
        ready = extra.pop("ready", True)  # e.g. no model replica running
        if not state["accepting"]:
            status = "shutting down"
        elif state["model_loaded"] and ready:
            status = "ok"
        else:
            status = "unavailable" if state["model_error"] or state["model_loaded"] else "starting"
        body = {"status": status, "model_loaded": state["model_loaded"], "backend": backend.name,
                "device": str(getattr(backend, "device", "cpu")), "precision": getattr(backend, "precision", "fp32"),
                "family": encoder.config.family, "dim": encoder.embedding_dim, "model_checksum": encoder.checksum,
                "text": text_model is not None, **extra}
        if state["model_error"]:
            body["error"] = state["model_error"]
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


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


def serve(encoder: VisionEncoder, host: str = "127.0.0.1", port: int = 8000, config: ServiceConfig | None = None, *,
          sock: socket.socket | None = None, access_log: bool = True, model_name: str | None = None,
          text_model: Any = None, index: Any = None) -> None:
    """Run the service until SIGINT/SIGTERM (then drain). ``sock``: an already listening socket;
    ``text_model`` (an ``ImageTextModel``) adds the text endpoints, ``index`` the search ones."""
    import uvicorn

    config = config or ServiceConfig()
    sock = sock or listen(host, port)
    host, port = sock.getsockname()[:2]
    backend = encoder.backend
    print(f"arrowvision serving {model_name or encoder.weights.path} ({encoder.config.family}, dim {encoder.embedding_dim}) "
          f"with {backend.name} {getattr(backend, 'precision', 'fp32')} on {getattr(backend, 'device', 'cpu')} "
          f"at http://{host}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(encoder, config, text_model, index), access_log=access_log,
                                           timeout_graceful_shutdown=int(config.request_timeout_s)))
    server.run(sockets=[sock])
    if not server.started:
        raise ArrowVisionError("the service failed to start (see the log above)")
