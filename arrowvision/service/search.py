"""Search endpoints and page of the HTTP service (``arrowvision serve --index OUT_DIR``).

``POST /v1/search``: a query image (multipart ``file``, or JSON ``{"image": base64}``), with
``sketch=true`` for sketch normalization, or a text (``{"text": ...}``, weights converted with
``--tower all``); ``k`` results (default 12, at most ``MAX_K``) ->
``{"results": [{"path", "score"}, ...]}``, ``score`` the cosine similarity.

``GET /v1/thumbnail?path=...``: a small JPEG of an *indexed* image. Any other path is a 404, and so
is an indexed path that now resolves elsewhere (a symlink planted on the way, even while the
request runs) or is not a regular file: the path is opened one component at a time from ``/``,
each with ``O_NOFOLLOW`` relative to its parent's descriptor, and the file read is the one stat'ed.

``GET /``: the search page (``web/index.html``: one self-contained file, no CDN).

The index is reloaded when ``embed`` or ``index`` rewrites it (``meta.json`` changes).
"""

from __future__ import annotations

import asyncio
import binascii
import io
import os
import stat
import threading
import time
from collections import OrderedDict
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..errors import ArrowVisionError, ImageError, IndexMismatch
from .common import (Problem, ServiceState, content_type, decode_base64, option, parse_json_object, parse_multipart,
                     read_body, service_state, unicode_problem, within)
from .images import embed_image

MAX_K = 100
DEFAULT_K = 12
THUMBNAIL_PX = 256
MAX_THUMBNAIL_SOURCE_BYTES = 64 * 1024 * 1024
THUMBNAIL_CACHE = 512  # thumbnails kept in memory (~10 KB each)


@cache
def page_html() -> str:
    """The search page shipped as package data."""
    return resources.files("arrowvision").joinpath("service/web/index.html").read_text(encoding="utf-8")


def _k(value: Any) -> int:
    if value is None or value == "":
        return DEFAULT_K
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
        raise Problem(422, f"'k' must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not 1 <= k <= MAX_K:
        raise Problem(422, f"'k' must be between 1 and {MAX_K}, got {value!r}")
    return k


def _open_without_symlinks(path: str) -> int:
    """A read-only descriptor of ``path`` opened one component at a time from ``/``, each with
    ``O_NOFOLLOW`` relative to its parent's descriptor: a symlink at *any* component fails
    (ELOOP/ENOTDIR), even one swapped in while the walk is under way, so the file opened is
    the one at that path in the real tree, never one a link points to."""
    parts = [part for part in path.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise FileNotFoundError(path)
    nofollow = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    directory = os.open("/", os.O_RDONLY | os.O_DIRECTORY | nofollow)
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=directory)
            os.close(directory)
            directory = child
        return os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | nofollow, dir_fd=directory)  # NONBLOCK: a FIFO
    finally:
        os.close(directory)


def read_thumbnail_source(path: str, max_bytes: int = MAX_THUMBNAIL_SOURCE_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes (and ``fstat``) of ``path`` if it is still a regular file reached without any
    symlink (the indexed identity is a resolved path): no FIFO, no device, nothing outside the tree."""
    if "\0" in path or not os.path.isabs(path):
        raise FileNotFoundError(path)
    fd = _open_without_symlinks(path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise FileNotFoundError(path)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1), info
    finally:
        os.close(fd)


def make_thumbnail(data: bytes, max_pixels: int, size: int = THUMBNAIL_PX) -> bytes:
    from PIL import Image

    from ..inputs.preprocess import load_image

    image = load_image(data, max_pixels=max_pixels).convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class IndexHolder:
    """The served index, reopened when its ``meta.json`` is replaced (an ``embed`` or ``index`` run)."""

    def __init__(self, index: Any, model_checksum: str):
        self.index = index
        self.model_checksum = model_checksum
        self.mmap = index.mmap  # reopened the way it was opened
        self.lock = threading.Lock()
        self.meta_mtime = self._mtime()
        self.thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()  # LRU of THUMBNAIL_CACHE
        self.thumbnail_lock = threading.Lock()

    def _mtime(self) -> int | None:
        from ..search.index import index_folder

        try:
            return (index_folder(self.index.dataset) / "meta.json").stat().st_mtime_ns
        except OSError:
            return None

    def current(self) -> Any:
        mtime = self._mtime()
        if mtime is not None and mtime != self.meta_mtime:
            with self.lock:
                if mtime != self.meta_mtime:
                    from ..search.index import VectorIndex

                    self.index = VectorIndex.open(self.index.dataset, model_checksum=self.model_checksum, mmap=self.mmap,
                                                  reuse=self.index)  # a delta update reads only the delta
                    self.meta_mtime = mtime
        return self.index


def _openapi_body() -> dict[str, Any]:
    options = {"sketch": {"type": "boolean", "default": False}, "k": {"type": "integer", "default": DEFAULT_K,
                                                                     "minimum": 1, "maximum": MAX_K}}
    form = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}, "text": {"type": "string"},
                                             **options}}
    body = {"type": "object", "properties": {"image": {"type": "string", "description": "base64 or data: URI"},
                                             "text": {"type": "string"}, **options}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form},
                                                          "application/json": {"schema": body}}}}


def open_search(index: Any, model_checksum: str) -> IndexHolder:
    """The served index of ``serve --index``. Refuses (``IndexMismatch``) an index built from
    another model's embeddings."""
    if index.model_checksum != model_checksum:
        raise IndexMismatch(f"{index.dataset}: indexed embeddings come from model {index.model_checksum[:19] or 'unknown'}, "
                            f"the service runs {model_checksum[:19]}; serve the weights that embedded it")
    return IndexHolder(index, model_checksum)


router = APIRouter()


async def parse(request: Request) -> tuple[str, bytes | str, bool, int]:
    """-> (kind "image"/"text", image bytes or text, sketch, k)."""
    config = service_state(request).config
    kind = content_type(request)
    params = request.query_params
    if kind == "multipart/form-data":
        form = await parse_multipart(request, await read_body(request, config.max_body_bytes))
        files = [value for _, value in form.multi_items() if hasattr(value, "read")]
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        if len(files) > 1:
            raise Problem(422, "send one image per search")
        value: dict[str, Any] = {**fields, **({"image_bytes": await files[0].read()} if files else {})}
    elif kind == "application/json":
        value = parse_json_object(await read_body(request, config.max_body_bytes))
        if "image" in value:
            if not isinstance(value["image"], str):
                raise Problem(422, "'image' must be a base64 string")
            try:
                value["image_bytes"] = decode_base64(value["image"])
            except (binascii.Error, ValueError):
                raise Problem(422, "'image' is not valid base64 (or a data:image/...;base64, URI)") from None
    else:
        raise Problem(415, f"unsupported content type {kind or '(none)'}; use multipart/form-data or application/json")
    k = _k(value.get("k", params.get("k")))
    sketch = option(value.get("sketch", params.get("sketch")), False)
    has_text = value.get("text") is not None
    if has_text == ("image_bytes" in value):
        raise Problem(422, "give exactly one query: an image ('file' or 'image') or a 'text'")
    if has_text:
        text = value["text"]
        if not isinstance(text, str) or not text.strip():
            raise Problem(422, "'text' must be a non-empty string")
        if len(text) > config.max_text_chars:
            raise Problem(422, f"'text' has {len(text)} characters; the limit is {config.max_text_chars}")
        if reason := unicode_problem(text, "'text'"):
            raise Problem(422, reason)
        if sketch:
            raise Problem(422, "sketch=true applies to image queries, not text")
        return "text", text, False, k
    if not value["image_bytes"]:
        raise Problem(422, "the image is empty")
    return "image", value["image_bytes"], sketch, k


async def embed_query_text(state: ServiceState, text: str) -> np.ndarray:
    """A text query through the default model's text batcher."""
    if state.text_model is None or state.text_batcher is None:
        raise Problem(422, "this model has no text tower: search by image or sketch "
                           "(or serve weights converted with --tower all)")
    try:
        vector, _ = await within(state.text_batcher.submit(np.str_(text)), state.config.request_timeout_s)
    except ArrowVisionError as exc:
        raise Problem(422, str(exc)) from None
    return np.asarray(vector, np.float32)


async def embed_query_image(state: ServiceState, image: bytes, sketch: bool) -> np.ndarray:
    """An image query through the default model (search runs on it)."""
    async with state.models.use(None) as served:
        return np.asarray((await embed_image(state, served, "image", image, True, sketch))["embedding"], np.float32)


@router.post("/v1/search", summary="Top-k indexed images for an image, a sketch (sketch=true) or a text",
             openapi_extra=_openapi_body())
async def search(request: Request):
    kind, query, sketch, k = await parse(request)
    state = service_state(request)
    start = time.perf_counter()
    vector = await (embed_query_text(state, query) if kind == "text" else embed_query_image(state, query, sketch))
    embedded = time.perf_counter()
    current = await asyncio.to_thread(state.index.current)
    hits = await asyncio.to_thread(current.search, vector, k)
    done = time.perf_counter()
    return {"results": [{"path": path, "score": score} for score, path in hits],
            "query": "sketch" if sketch else kind, "k": k, "indexed": current.rows,
            "timing_ms": {"embed": 1000 * (embedded - start), "search": 1000 * (done - embedded)}}


@router.get("/v1/search/info", summary="What the search endpoints search: rows, index kind, text queries")
async def search_info(request: Request):
    state = service_state(request)
    current = await asyncio.to_thread(state.index.current)
    return {"rows": current.rows, "kind": current.kind, "dim": current.dim, "text": state.text_model is not None,
            "model_checksum": current.model_checksum, "max_k": MAX_K, "default_k": DEFAULT_K}


def thumbnail_of(holder: IndexHolder, path: str, max_pixels: int) -> bytes:
    """A JPEG thumbnail of an indexed image, from the holder's LRU when it is unchanged on disk."""
    try:
        data, info = read_thumbnail_source(path)  # the identity of the file actually read
    except OSError:
        raise Problem(404, "no such indexed image") from None
    key = (path, info.st_mtime_ns, info.st_size)
    with holder.thumbnail_lock:
        if key in holder.thumbnails:
            holder.thumbnails.move_to_end(key)
            return holder.thumbnails[key]
    try:
        jpeg = make_thumbnail(data, max_pixels)
    except ImageError:
        raise Problem(404, "no thumbnail for this image (it no longer decodes)") from None
    with holder.thumbnail_lock:
        holder.thumbnails[key] = jpeg
        while len(holder.thumbnails) > THUMBNAIL_CACHE:
            holder.thumbnails.popitem(last=False)
    return jpeg


@router.get("/v1/thumbnail", summary="A small JPEG of an indexed image (404 for any other path)",
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "not an indexed image"}})
async def thumbnail(request: Request, path: str = ""):
    state = service_state(request)
    current = await asyncio.to_thread(state.index.current)
    if not path or path not in current:
        raise Problem(404, "no such indexed image")
    jpeg = await asyncio.to_thread(thumbnail_of, state.index, path, state.config.max_pixels)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300",
                                                            "X-Content-Type-Options": "nosniff"})


@router.get("/", summary="The search page: draw, drop a photo or type", response_class=HTMLResponse)
async def search_page():
    return HTMLResponse(page_html(), headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                                                         "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})
