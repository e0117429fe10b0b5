"""HTTP embedding service: FastAPI + uvicorn, dynamic micro-batching, Prometheus metrics.

``create_app`` only wires the parts, each in its own module: the limits (``config``), the
batchers and where the image model runs (``batching``), named models loaded lazily into an LRU
(``profiles``), the error table, body readers and decoders every route shares (``common``), the
routes as ``APIRouter``s reading what they need from ``app.state.service`` (``images``, ``text``,
``openai``, ``search``, ``info``), API key, CORS and rate limit (``security``), request ids,
logs and OpenTelemetry spans (``tracing``), metrics (``metrics``), ``/docs`` without a CDN
(``docs``), and how uvicorn runs it (``server``: forwarded headers, JSON 400s, redacted logs).
Image URLs are fetched with an SSRF guard (``inputs.urlfetch``).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..encoder import VisionEncoder
from ..errors import ArrowVisionError
from ..inputs.urlfetch import AsyncUrlFetcher
from . import images, info, openai, search, text, tracing
from .batching import ImageModel, LocalModel, MicroBatcher
from .common import BodyDeadlineMiddleware, ServiceState, install_error_handlers
from .config import ServiceConfig
from .docs import add_docs_routes
from .metrics import Metrics
from .openai import install_openai_error_handler
from .profiles import ModelRegistry
from .security import SecurityConfig, add_security
from .tracing import RequestContextMiddleware

log = logging.getLogger("arrowvision.service")

ImageModelFactory = Callable[[Callable[[int, float], None]], ImageModel]


def create_app(encoder: VisionEncoder | ModelRegistry, config: ServiceConfig | None = None, text_model: Any = None,
               index: Any = None, *, model: ImageModelFactory | None = None, security: SecurityConfig | None = None,
               name: str | None = None):
    """The FastAPI application serving ``encoder`` (with ``text_model``, an ``ImageTextModel``, also
    the text endpoints), or every model of a ``ModelRegistry`` (profiles). With ``index`` (a
    ``VectorIndex``) the search endpoints and page (they use the default model). ``model(on_batch)``
    builds the ``ImageModel`` that runs inference of a single model (default: ``LocalModel``, this
    process; profiles always run locally). ``security``: API key, CORS, rate limit."""
    config = config or ServiceConfig()
    if model is not None and isinstance(encoder, ModelRegistry):
        raise ArrowVisionError("model profiles run in this process: a custom image model serves a single model")
    models = encoder if isinstance(encoder, ModelRegistry) else ModelRegistry.single(encoder, text_model, name)
    state = ServiceState(config=config, models=models, metrics=Metrics.create(text=models.has_text),
                         decode_pool=ThreadPoolExecutor(config.decode_threads, thread_name_prefix="arrowvision-decode"),
                         text_model=text_model)
    if index is not None:
        state.index = search.open_search(index, models.specs[models.default].info.get("model_checksum"))
    app = FastAPI(title="arrowvision", version="0.1.0", lifespan=_lifespan(state, model), docs_url=None, redoc_url=None,
                  description="SigLIP/CLIP image embeddings with dynamic micro-batching.")
    app.state.service = state
    add_docs_routes(app, "arrowvision")  # Swagger UI from the package, not a CDN (docs)
    install_error_handlers(app)
    install_openai_error_handler(app)
    app.middleware("http")(functools.partial(_observe, state))
    routers = [images.router, info.models_router, *([text.router] if models.has_text else []), openai.router,
               *([search.router] if index is not None else []), info.health_router]
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=config.body_timeout_s)  # a slow body: 408
    add_security(app, security)
    app.add_middleware(RequestContextMiddleware)  # outermost: request id and span around everything
    return app


def _lifespan(state: ServiceState, model: ImageModelFactory | None):
    """Start-up (the default model loaded and warmed up, the URL fetcher) and graceful shutdown."""
    config, metrics = state.config, state.metrics

    def make_image_model(name: str, model_encoder: VisionEncoder) -> ImageModel:
        """One image model per served model (models never share a batch), with its own metrics."""
        record = functools.partial(metrics.record_image_batch, name)
        image_model = model(record) if model is not None else LocalModel(model_encoder, config, record)
        metrics.queue_depth.labels(name).set_function(image_model.queue_depth)
        return image_model

    def make_text_batcher(name: str, run) -> MicroBatcher:
        return MicroBatcher(run, config.max_batch, config.max_wait_ms, config.max_queue,
                            functools.partial(metrics.record_text_batch, name))

    @asynccontextmanager
    async def lifespan(app):
        state.fetcher = AsyncUrlFetcher(config.url_policy())
        await state.models.start(make_image_model, make_text_batcher)
        default = state.models.loaded.get(state.models.default)
        if default is not None and default.text_batcher is not None:
            state.text_batcher = default.text_batcher  # the search endpoints' text queries
        state.started = True
        yield
        state.accepting = False
        await state.models.close(config.request_timeout_s)
        await state.fetcher.close()
        state.started = False
        tracing.flush()
        state.decode_pool.shutdown(wait=False)

    return lifespan


async def _observe(state: ServiceState, request: Request, call_next):
    """The body limit by Content-Length, 503 while shutting down, and the request metrics."""
    start = time.perf_counter()
    endpoint = request.url.path
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.config.max_body_bytes:
        response = JSONResponse({"error": f"request body over {state.config.max_body_bytes} bytes"}, status_code=413)
    elif not state.accepting and endpoint.startswith("/v1/"):
        response = JSONResponse({"error": "shutting down"}, status_code=503, headers={"Retry-After": "1"})
    else:
        response = await call_next(request)
    if endpoint.startswith("/v1/"):
        state.metrics.observe_request(endpoint, response.status_code, getattr(request.state, "model", ""),
                                      time.perf_counter() - start)
    return response


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
    variables turn on tracing (see ``arrowvision.service.tracing``)."""
    import uvicorn

    from .server import server_config

    config = config or ServiceConfig()
    sock = sock or listen(host, port)
    host, port = sock.getsockname()[:2]
    if isinstance(encoder, ModelRegistry):
        names = ", ".join(f"{n}{' (default)' if n == encoder.default else ''}" for n in encoder.specs)
        lines = [f"arrowvision serving models {names} at http://{host}:{port}"]
    else:
        backend = encoder.backend
        lines = [f"arrowvision serving {model_name or encoder.weights.path} ({encoder.config.family}, dim {encoder.embedding_dim}) "
                 f"with {backend.name} {backend.precision} on {backend.device} "
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
