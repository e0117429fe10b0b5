"""Text endpoints of the HTTP service, for weights converted with ``--tower all``.

``POST /v1/embed/text``: ``{"texts": [...], "normalize": true}`` -> one embedding per text.
``POST /v1/score``: ``{"image": base64 | "image_url": URL, "texts": [...]}`` -> logits
(transformers' ``logits_per_image``), probabilities (SigLIP: sigmoid per text; CLIP: softmax
over the texts) and CLIP scores (``max(100 cos, 0)``) of the image against each text. The
evaluation-API shape ``{"image_input": URL or base64, "text_prompt": "...", "model_config_name":
"fast"}`` is accepted too; it answers ``clip_score`` as one number, with ``model_used``.

Both take ``"model"`` (a profile of ``serve --model``). Texts from concurrent requests are
grouped into one model call by the model's own text ``MicroBatcher`` (tokenized inside the call,
so CLIP pads only to the batch's longest text); the image of ``/v1/score`` goes through the
model's image batcher like ``/v1/embed``. Limits: at most ``max_texts`` texts per request (413)
and ``max_text_chars`` characters per text (422).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from .. import scoring
from ..errors import ArrowVisionError
from ..inputs.urlfetch import is_url
from . import tracing
from .common import (ImageUrl, Problem, ServiceState, decode_base64, read_json_object, service_state, unicode_problem,
                     within)
from .images import answered, embed_image
from .profiles import ServedModel

router = APIRouter()


def check_texts(state: ServiceState, texts: Any) -> list[str]:
    """``texts`` if it is a non-empty list of strings within the service's limits."""
    config = state.config
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise Problem(422, "expected 'texts': a non-empty list of strings")
    if len(texts) > config.max_texts:
        raise Problem(413, f"{len(texts)} texts in one request; the limit is {config.max_texts}")
    too_long = [i for i, t in enumerate(texts) if len(t) > config.max_text_chars]
    if too_long:
        raise Problem(422, f"texts[{too_long[0]}] has {len(texts[too_long[0]])} characters; the limit is {config.max_text_chars}")
    for index, text in enumerate(texts):
        if reason := unicode_problem(text, f"texts[{index}]"):
            raise Problem(422, reason)
    return texts


async def embed_texts(state: ServiceState, served: ServedModel, texts: list[str]) -> np.ndarray:
    """Raw (not normalized) text embeddings through the text batcher of ``served``."""
    if served.text_batcher is None:
        raise Problem(422, f"model {served.name} has no text tower (convert it with --tower all)")
    queued = time.perf_counter()
    try:
        results = await within(asyncio.gather(*(served.text_batcher.submit(np.str_(t)) for t in texts)),
                               state.config.request_timeout_s)
    except ArrowVisionError as exc:  # the tokenizer refused a text
        raise Problem(422, str(exc)) from None
    done = time.perf_counter()
    model_started = max(queued, done - max(seconds for _, seconds in results))
    tracing.record_span("text queue wait", queued, model_started, **{"arrowvision.model": served.name})
    tracing.record_span("text model call", model_started, done, **{"arrowvision.model": served.name,
                                                                   "arrowvision.texts": len(texts)})
    return np.stack([vector for vector, _ in results]).astype(np.float32)


@router.post("/v1/embed/text", summary="Embed a batch of texts (JSON {'texts': [...], 'normalize': true, 'model': name})")
async def embed_text(request: Request):
    start = time.perf_counter()
    state = service_state(request)
    value = await read_json_object(request, state.config.max_body_bytes)
    texts = check_texts(state, value.get("texts"))
    async with state.models.use(value.get("model"), request) as served:
        vectors = await embed_texts(state, served, texts)
        if value.get("normalize", True) not in (False, "false", 0):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return answered(served, {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1]),
                                 "model_checksum": served.text_model.checksum}, start)


def image_of(value: dict[str, Any]) -> bytes | ImageUrl:
    """The image of a /v1/score body: ``image`` (base64 or URL), ``image_url`` or ``image_input``."""
    given = [key for key in ("image", "image_url", "image_input") if key in value]
    if len(given) != 1 or not isinstance(value[given[0]], str):
        raise Problem(422, "expected 'image': base64 string, 'image_url': http(s) URL or 'image_input' (exactly one)")
    field, text = given[0], value[given[0]]
    if is_url(text):
        return ImageUrl(text.strip())
    if field == "image_url":
        raise Problem(422, "'image_url' must be an http(s) URL")
    try:
        return decode_base64(text)
    except ValueError:  # binascii.Error is a ValueError
        raise Problem(422, f"'{field}' is not valid base64 (or a data:image/...;base64, URI, or an http(s) URL)") from None


@router.post("/v1/score", summary="Score one image against texts: logits, probabilities, CLIP scores")
async def score(request: Request):
    start = time.perf_counter()
    state = service_state(request)
    value = await read_json_object(request, state.config.max_body_bytes)
    single = "text_prompt" in value and "texts" not in value  # the evaluation-API shape
    texts = check_texts(state, [value["text_prompt"]] if single else value.get("texts"))
    source = image_of(value)
    model = value.get("model", value.get("model_config_name"))
    async with state.models.use(model, request) as served:
        if served.text_model is None:
            raise Problem(422, f"model {served.name} has no text tower (convert it with --tower all)")
        image_result, text_vectors = await asyncio.gather(embed_image(state, served, "image", source, True, False),
                                                          embed_texts(state, served, texts))
        text_model = served.text_model
        image_vector = np.asarray(image_result["embedding"], np.float32)[np.newaxis]
        logits = scoring.logits(image_vector, text_vectors, text_model.logit_scale, text_model.logit_bias)
        clip_scores = scoring.clip_score(np.repeat(image_vector, len(texts), axis=0), text_vectors).tolist()
        body = answered(served, {
            "texts": texts,
            "logits": logits[0].tolist(),
            "probabilities": scoring.probabilities(logits, text_model.family)[0].tolist(),
            "clip_score": clip_scores[0] if single else clip_scores,
            "family": text_model.family,
            "model_checksum": text_model.checksum,
        }, start)
        if single:
            body["model_used"] = served.name
        return body
