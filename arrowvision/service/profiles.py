"""Model profiles of the service: several named weights files, loaded lazily, at most N at once.

``serve --model fast=W1.parquet --model accurate=W2.parquet --default fast`` registers one
``ModelSpec`` per profile. A request names its model (``"model": "fast"``; the default
otherwise); the first request for a model loads it (in a thread, then one warm-up inference) and
gives it its own image and text micro-batchers, so models never share a batch. Loaded models
form an LRU bounded by ``max_loaded``: loading one more retires the least recently used model,
which first answers everything already queued for it (requests in flight hold it with ``use``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArrowVisionError

log = logging.getLogger("arrowvision.service")

TEXT_TENSOR = "text_model.embeddings.token_embedding.weight"


class UnknownModel(ArrowVisionError):
    """A request named a model the service does not serve (404)."""


class ModelUnavailable(ArrowVisionError):
    """A model cannot answer now: it failed to load, or its replica died (503, retry later)."""


@dataclass
class ModelSpec:
    """One profile: ``load()`` returns ``(VisionEncoder, ImageTextModel | None)``."""

    name: str
    load: Callable[[], tuple[Any, Any]]
    weights: str = ""
    backend: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # family, towers, dim (known before loading)


def describe_weights(path: str) -> dict[str, Any]:
    """Family, towers and embedding dimension of a weights file, without building a model."""
    from ..model.config import VisionConfig
    from ..weights.format import WeightLoader

    weights = WeightLoader(path)
    towers = ["vision"] + (["text"] if TEXT_TENSOR in weights else [])
    return {"family": weights.family, "towers": towers, "dim": VisionConfig.from_hf(weights.config).embedding_dim,
            "model_checksum": weights.checksum}


def describe_loaded(encoder: Any, text_model: Any) -> dict[str, Any]:
    return {"family": encoder.config.family, "towers": ["vision"] + (["text"] if text_model is not None else []),
            "dim": encoder.embedding_dim, "model_checksum": encoder.checksum}


class ServedModel:
    """A loaded model with its own image model (``batching.ImageModel``: by default a
    ``MicroBatcher`` in this process) and text batcher; ``users`` counts the requests holding it."""

    def __init__(self, spec: ModelSpec, encoder: Any, text_model: Any, make_image_model: Callable[..., Any],
                 make_text_batcher: Callable[..., Any]):
        self.spec, self.name = spec, spec.name
        self.encoder, self.text_model = encoder, text_model
        self.image = make_image_model(self.name, encoder)
        self.text_batcher = make_text_batcher(self.name, self._encode_texts) if text_model is not None else None
        self.users = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.error: str | None = None  # warm-up failure

    def _encode_texts(self, texts: np.ndarray) -> np.ndarray:
        # tokenized inside the model call, so CLIP pads only to the batch's longest text
        return self.text_model.text.encode([str(t) for t in texts], batch_size=max(1, len(texts)), normalize=False)

    async def start(self) -> None:
        """Start (and warm up) the image model, errors recorded in ``error``; start the text batcher."""
        try:
            await self.image.start()
        except Exception as exc:  # keep serving /health, which reports the failure
            log.exception("model %s: warm-up failed", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
        if self.text_batcher is not None:
            self.text_batcher.start()

    async def close(self, timeout: float) -> None:
        """Answer everything queued, then stop."""
        await self.image.drain(timeout)
        if self.text_batcher is not None:
            await self.text_batcher.drain(timeout)


class ModelRegistry:
    """The service's named models: lazily loaded, LRU-bounded, each with its own batchers."""

    def __init__(self, specs: list[ModelSpec], default: str | None = None, max_loaded: int | None = None):
        if not specs:
            raise ArrowVisionError("no model to serve")
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ArrowVisionError(f"model name(s) given twice: {', '.join(duplicates)}")
        self.specs = {spec.name: spec for spec in specs}
        self.default = default or specs[0].name
        if self.default not in self.specs:
            raise ArrowVisionError(f"--default {self.default}: no such model (serving {', '.join(names)})")
        if max_loaded is not None and max_loaded < 1:
            raise ArrowVisionError(f"max_loaded must be >= 1, got {max_loaded}")
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.preloaded: dict[str, tuple[Any, Any]] = {}  # given loaded (single model); kept across restarts
        self.failures: dict[str, str] = {}  # last load failure per model
        self.factories: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task] = set()

    @classmethod
    def single(cls, encoder: Any, text_model: Any = None, name: str | None = None) -> ModelRegistry:
        """One model that is already loaded (the classic ``serve --weights W``)."""
        name = name or Path(str(encoder.weights.path)).stem
        spec = ModelSpec(name, lambda: (encoder, text_model), str(encoder.weights.path), encoder.backend.name,
                         describe_loaded(encoder, text_model))
        registry = cls([spec])
        registry.preloaded[name] = (encoder, text_model)
        return registry

    @property
    def has_text(self) -> bool:
        return any("text" in spec.info.get("towers", ()) for spec in self.specs.values())

    def resolve(self, name: Any) -> str:
        if name is None or name == "":
            return self.default
        if not isinstance(name, str) or name not in self.specs:
            raise UnknownModel(f"unknown model {name!r}; this service serves {', '.join(self.specs)}")
        return name

    async def start(self, make_image_model: Callable[..., Any], make_text_batcher: Callable[..., Any]) -> None:
        """Bind the factories of each model's image model and text batcher, and load the default
        model (its failure is kept for /health)."""
        self.factories = (make_image_model, make_text_batcher)
        try:
            await self._acquire(self.default, hold=False)
        except ModelUnavailable:
            pass  # recorded in failures; /health reports it

    @asynccontextmanager
    async def use(self, name: Any = None, request: Any = None) -> AsyncIterator[ServedModel]:
        """Hold model ``name`` (default: the default model) for one request; with ``request``, its
        metrics are labelled with the model (``request.state.model``)."""
        served = await self._acquire(self.resolve(name))
        if request is not None:
            request.state.model = served.name
        try:
            yield served
        finally:
            served.users -= 1
            if served.users == 0:
                served.idle.set()

    async def _acquire(self, name: str, hold: bool = True) -> ServedModel:
        served = self.loaded.get(name)
        if served is None:
            async with self._locks.setdefault(name, asyncio.Lock()):
                served = self.loaded.get(name)
                if served is None:
                    served = await self._load(name)
        self.loaded.move_to_end(name)
        if hold:
            served.users += 1
            served.idle.clear()
        return served

    async def _load(self, name: str) -> ServedModel:
        if self.factories is None:
            raise ModelUnavailable("the service has not started")
        spec = self.specs[name]
        try:
            encoder, text_model = self.preloaded.get(name) or await asyncio.to_thread(spec.load)
        except Exception as exc:  # a model that cannot load is this request's 503, not a crash
            log.exception("model %s: loading %s failed", name, spec.weights)
            self.failures[name] = f"{type(exc).__name__}: {exc}"
            raise ModelUnavailable(f"model {name} failed to load: {exc}") from None
        spec.backend = encoder.backend.name
        spec.info = {**spec.info, **describe_loaded(encoder, text_model)}
        served = ServedModel(spec, encoder, text_model, *self.factories)
        await served.start()
        self.failures.pop(name, None)
        self.loaded[name] = served
        log.info("model %s loaded (%s, %s)", name, spec.weights, spec.backend)
        while self.max_loaded is not None and len(self.loaded) > self.max_loaded:
            oldest = next(n for n in self.loaded if n != name)
            self._retire(self.loaded.pop(oldest))
        return served

    def _retire(self, served: ServedModel) -> None:
        async def retire() -> None:
            await served.idle.wait()  # requests holding it finish first
            await served.close(30.0)
            log.info("model %s unloaded (least recently used)", served.name)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self, timeout: float) -> None:
        """Answer everything queued for every model, then stop."""
        while self.loaded:
            await self.loaded.popitem(last=False)[1].close(timeout)
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout)

    def describe(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: one entry per profile, loaded or not."""
        rows = []
        for name, spec in self.specs.items():
            served = self.loaded.get(name)
            row = {"id": name, "object": "model", "owned_by": "arrowvision", "default": name == self.default,
                   "loaded": served is not None, "weights": Path(spec.weights).name if spec.weights else None,
                   "backend": spec.backend or None, **spec.info}
            if served is not None:
                row["precision"] = served.encoder.backend.precision
                row["device"] = str(served.encoder.backend.device)
            if name in self.failures:
                row["error"] = self.failures[name]
            rows.append(row)
        return rows


def registry_from_profiles(profiles: list[str], load: Callable[[str], tuple[Any, Any]], *, default: str | None = None,
                           max_loaded: int | None = None, backend: str = "") -> ModelRegistry:
    """``["fast=W1.parquet", "accurate=W2.parquet"]`` -> a registry; every file is checked (exists,
    readable weights) now, so a typo fails at start rather than at the first request."""
    specs = []
    for profile in profiles:
        name, sep, weights = profile.partition("=")
        name, weights = name.strip(), weights.strip()
        if not sep or not name or not weights:
            raise ArrowVisionError(f"--model {profile!r}: expected NAME=WEIGHTS.parquet")
        if not all(c.isalnum() or c in "._-" for c in name):
            raise ArrowVisionError(f"--model {profile!r}: a model name uses letters, digits, '.', '_' and '-' only")
        if not Path(weights).is_file():
            raise ArrowVisionError(f"--model {name}={weights}: no such weights file")
        specs.append(ModelSpec(name, lambda weights=weights: load(weights), weights, backend, describe_weights(weights)))
    return ModelRegistry(specs, default=default, max_loaded=max_loaded)
