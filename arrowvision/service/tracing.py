"""OpenTelemetry spans and request-id logging for the service.

Tracing is off by default and costs nothing then (``span`` is a null context). The standard
``OTEL_*`` environment variables turn it on: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER=otlp|console`` export spans over
OTLP/HTTP (or to stderr); ``OTEL_SDK_DISABLED=true`` keeps it off; ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` name the service. Each request gets a server span (continuing the
caller's W3C ``traceparent``) with children for URL fetch, decode, queue wait and model call.

Every request also gets a request id (the caller's ``X-Request-ID`` if it is sane, else a new
one), echoed in the response header and put into every log line written while it runs;
``logging_config("json")`` makes those lines JSON documents. Every line is redacted: the API key
and credential-like URL parts (``?api_key=``, ``&token=``, ``user:pass@``) never reach a log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger("arrowvision.service")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("arrowvision_request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_tracer: Any = None  # None: tracing off
_provider: Any = None


# ----------------------------------------------------------------------------- tracer set-up


def tracing_requested(environ: dict[str, str] | None = None) -> bool:
    """Do the standard OTEL_* variables ask for trace export?"""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_from_environment() -> bool:
    """Turn tracing on when OTEL_* asks for it (``serve`` calls this once). Returns whether it is on."""
    if not tracing_requested():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_* asks for tracing but opentelemetry-sdk is not installed (pip install 'arrowvision[serve]')")
        return False
    exporters = [e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if e.strip()]
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "arrowvision")}))
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
            if protocol != "http/protobuf":
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting with http/protobuf", protocol)
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTLP export needs opentelemetry-exporter-otlp-proto-http (pip install 'arrowvision[serve]')")
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_OTLP_*
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (use otlp or console)", name)
    use_provider(provider)
    return True


def use_provider(provider: Any) -> None:
    """Trace with ``provider`` (an SDK ``TracerProvider``; ``None`` turns tracing off). Tests pass
    one with an in-memory exporter."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("arrowvision") if provider is not None else None


def flush() -> None:
    """Export the spans still buffered (the service calls this when it shuts down: a SIGTERM exit
    skips the SDK's own exit hook)."""
    if _provider is not None and hasattr(_provider, "force_flush"):
        _provider.force_flush()


def enabled() -> bool:
    return _tracer is not None


# ----------------------------------------------------------------------------- spans


def span(name: str, **attributes: Any):
    """A child span of the current one (a null context when tracing is off)."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None})


def record_span(name: str, start: float, end: float, **attributes: Any) -> None:
    """A span for an interval measured with ``time.perf_counter`` (queue wait, model call)."""
    if _tracer is None:
        return
    offset = time.time_ns() - int(time.perf_counter() * 1e9)
    item = _tracer.start_span(name, start_time=offset + int(start * 1e9),
                              attributes={k: v for k, v in attributes.items() if v is not None})
    item.end(end_time=offset + int(end * 1e9))


@contextmanager
def server_span(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> Iterator[Any]:
    """The request's span, continuing the caller's trace (W3C traceparent) when there is one."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    with _tracer.start_as_current_span(f"{method} {path}", context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
                                       attributes={"http.request.method": method, "url.path": path,
                                                   "arrowvision.request_id": request_id.get()}) as current:
        yield current


# ----------------------------------------------------------------------------- request ids and logs


class RequestContextMiddleware:
    """Pure ASGI, outermost: request id (contextvar + ``X-Request-ID`` response header) and the
    request's server span, around everything else (auth, CORS, rate limit, the app)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        try:
            with server_span(scope["method"], scope["path"], scope["headers"]) as current:
                async def send_with_id(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                        if current is not None:
                            current.set_attribute("http.response.status_code", message["status"])
                    await send(message)

                await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` ("-" outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON document per line: time, level, logger, request_id, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                    "level": record.levelname.lower(), "logger": record.name,
                    "request_id": getattr(record, "request_id", request_id.get()), "message": record.getMessage()}
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


# query parameters whose values are credentials, and user:password@ in URLs
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:api[_-]?key|apikey|key|access[_-]?token|token|auth|authorization|password|"
                           r"passwd|secret|client[_-]?secret|signature|sig)=)[^&;#\s\"'\\]*")
_USERINFO = re.compile(r"(?i)(\bhttps?://)[^/?#@\s\"'\\]+@")
REDACTED = "REDACTED"


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with credential-like query values (``?api_key=K``, ``&token=T``), URL user info and
    each of ``secrets`` (also as JSON escapes it) replaced by ``REDACTED``."""
    text = _USERINFO.sub(rf"\1{REDACTED}@", _SECRET_QUERY.sub(rf"\1{REDACTED}", text))
    for secret in secrets:
        text = text.replace(secret, REDACTED).replace(json.dumps(secret, ensure_ascii=False)[1:-1], REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """Formats with ``inner``, then redacts the whole line (message, arguments, traceback):
    no log line carries the API key or a credential sent in a URL, whatever wrote it."""

    def __init__(self, inner: logging.Formatter, secrets: Sequence[str] = ()):
        super().__init__()
        self.inner, self.secrets = inner, [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


def logging_config(log_format: str = "text", level: str = "INFO", secrets: Sequence[str] = ()) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and arrowvision with the request id in every
    line and ``secrets`` (the API key) and credential-like URL parts redacted from every line."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {log_format!r}")
    if log_format == "json":
        default, access = JsonFormatter(), JsonFormatter()
    else:
        from uvicorn.logging import AccessFormatter, DefaultFormatter

        default = DefaultFormatter(fmt="%(levelprefix)s [%(request_id)s] %(message)s", use_colors=False)
        access = AccessFormatter(fmt='%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s',
                                 use_colors=False)
    formatters = {name: {"()": RedactingFormatter, "inner": inner, "secrets": list(secrets)}
                  for name, inner in (("default", default), ("access", access))}
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "filters": ["request_id"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": formatters,
        "handlers": {"default": {**handler, "formatter": "default"}, "access": {**handler, "formatter": "access"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "arrowvision": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
