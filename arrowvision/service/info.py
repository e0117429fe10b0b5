"""What the service serves and how it is doing: ``GET /v1/models``, ``/health`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .common import service_state

models_router = APIRouter()
health_router = APIRouter()


@models_router.get("/v1/models", summary="The models this service serves (family, towers, dimension, backend)")
async def list_models(request: Request):
    models = service_state(request).models
    return {"object": "list", "data": models.describe(), "default": models.default}


@health_router.get("/health", summary="Model loaded, backend and device (503 unless ready to embed)")
async def health(request: Request):
    state = service_state(request)
    models = state.models
    served = models.loaded.get(models.default)
    model_error = (served.error if served else None) or models.failures.get(models.default)
    model_loaded = bool(state.started and served is not None and served.error is None)
    extra = served.image.health() if served is not None else {}
    ready = extra.pop("ready", True)  # e.g. no model replica running
    if not state.accepting:
        status = "shutting down"
    elif model_loaded and ready:
        status = "ok"
    else:
        status = "unavailable" if model_error or model_loaded else "starting"
    spec = models.specs[models.default]
    backend = served.encoder.backend if served else None
    body = {"status": status, "model_loaded": model_loaded, "backend": backend.name if backend else spec.backend or None,
            "device": str(backend.device) if backend else "cpu", "precision": backend.precision if backend else "fp32",
            "family": spec.info.get("family"), "dim": spec.info.get("dim"), "model_checksum": spec.info.get("model_checksum"),
            "text": served.text_model is not None if served else "text" in spec.info.get("towers", ()),
            "model": models.default, "models": {n: n in models.loaded for n in models.specs}, **extra}
    if model_error:
        body["error"] = model_error
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@health_router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    body, media_type = service_state(request).metrics.exposition()
    return Response(body, media_type=media_type)
