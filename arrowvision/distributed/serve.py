"""The HTTP service on Ray Serve: ``arrowvision serve --engine ray --replicas N [--address ADDR]``.

Two deployments. ``ArrowvisionModel`` holds the model, in N replicas (or autoscaled between
``--min-replicas`` and ``--max-replicas``), each with as many inference threads as CPUs Ray gave
it; ``@serve.batch`` groups concurrent requests into one model call. ``ArrowvisionIngress`` serves
the very FastAPI app of ``arrowvision serve`` (``service.app.create_app``: every route, status code,
limit and metric name) with ``ServeModel`` as its image model: requests are parsed, size-checked
and decoded in the ingress, and the preprocessed pixels go to a model replica.

A model replica that dies is replaced by Serve; a request it held gets a 503 with Retry-After
(never a hang: every request also has the service's timeout, 504), and /health reports the
running replicas (503 while none is).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from ..backends.base import BackendBase
from ..errors import ArrowVisionError
from ..service.batching import ItemFailed, QueueFull, failure_of, run_isolating_failures
from ..service.config import ServiceConfig
from ..service.profiles import ModelUnavailable
from ..service.security import SecurityConfig
from . import connect, threads_option

APP_NAME = "arrowvision"
MODEL_DEPLOYMENT = "ArrowvisionModel"
INGRESS_DEPLOYMENT = "ArrowvisionIngress"
STATUS_EVERY_S = 1.0  # how often the ingress refreshes the replica count for /health


@dataclass
class Replicas:
    """How many model replicas to run: a fixed ``count``, or autoscaled (``minimum``..``maximum``,
    starting at ``count``) on ``target_ongoing`` requests per replica."""

    count: int = 1
    minimum: int | None = None
    maximum: int | None = None
    cpus: float = 1.0
    target_ongoing: int | None = None

    @property
    def autoscaling(self) -> bool:
        return self.minimum is not None or self.maximum is not None

    def options(self, max_batch: int, max_queue: int) -> dict[str, Any]:
        """``Deployment.options`` for the model deployment."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus},
            "max_ongoing_requests": 2 * max_batch,  # room for a full batch queued behind the running one
            "max_queued_requests": max_queue,  # beyond this, BackPressureError: our 503
        }
        if self.autoscaling:
            low = self.minimum if self.minimum is not None else 1
            high = self.maximum if self.maximum is not None else max(low, self.count)
            if not 0 <= low <= high or high < 1:
                raise ArrowVisionError(f"--min-replicas {low} / --max-replicas {high}: need 0 <= min <= max, max >= 1")
            options["autoscaling_config"] = {
                "min_replicas": low, "max_replicas": high, "initial_replicas": min(max(self.count, low), high),
                "target_ongoing_requests": self.target_ongoing or max_batch,
            }
        else:
            options["num_replicas"] = self.count
        return options

    def describe(self) -> str:
        if not self.autoscaling:
            return f"{self.count} replica{'s' * (self.count != 1)}"
        return f"{self.minimum or 1}..{self.maximum or self.count} replicas (autoscaling)"


def _assigned_threads() -> int:
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


@serve.deployment(name=MODEL_DEPLOYMENT)
class ArrowvisionModel:
    """One model per replica; ``embed`` takes one image's pixels, ``@serve.batch`` batches them."""

    def __init__(self, weights: str, backend: str, device: str, options: dict[str, Any], max_batch: int,
                 max_wait_ms: float):
        from ..encoder import VisionEncoder

        threads = _assigned_threads()
        options = {**options, **threads_option(backend, threads)}  # threads = the CPUs Ray gave this replica
        self.encoder = VisionEncoder.from_parquet(weights, backend=backend, device=device, **options)
        size = self.encoder.config.image_size
        warm = self.encoder.backend(np.zeros((1, self.encoder.config.num_channels, size, size), np.float32))
        if np.asarray(warm).shape != (1, self.encoder.embedding_dim):
            raise ArrowVisionError(f"warm-up produced shape {np.asarray(warm).shape}, expected (1, {self.encoder.embedding_dim})")
        self.embed.set_max_batch_size(max_batch)
        self.embed.set_batch_wait_timeout_s(max_wait_ms / 1000)
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="arrowvision-infer")  # keeps the event loop free
        self.batches = 0
        self.replica = f"{os.getpid()}-{id(self):x}"
        self.threads = self.encoder.backend.inference_threads() or threads

    def describe(self) -> dict[str, Any]:
        backend = self.encoder.backend
        return {"backend": backend.name, "precision": backend.precision,
                "device": str(backend.device), "pid": os.getpid(), "threads": self.threads}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, float, str, int] | ItemFailed]:
        """One output per image, or an ``ItemFailed`` for an image that fails (only that one:
        a failing batch is bisected, ``service.batching``)."""
        start = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(self.runner, run_isolating_failures,
                                                                   self.encoder.backend, pixels)
        seconds = time.perf_counter() - start
        self.batches += 1
        batch = f"{self.replica}/{self.batches}"
        return [failure_of(output) if isinstance(output, Exception) else
                (np.asarray(output, np.float32), seconds, batch, len(pixels)) for output in outputs]


class ReplicaBackend(BackendBase):
    """What the ingress knows of the replicas' backend (for /health); it runs no model itself."""

    def __init__(self, name: str, precision: str | None, device: str):
        self.name, self.precision, self.device = name, precision or "fp32", device

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        raise ModelUnavailable("the model runs in the Ray Serve replicas")


class ServeModel:
    """The service's ``ImageModel`` backed by the model deployment's handle."""

    def __init__(self, handle: Any, on_batch: Callable[[int, float], None], backend: ReplicaBackend,
                 replicas: Replicas, config: ServiceConfig):
        self.handle, self.on_batch, self.backend, self.replicas = handle, on_batch, backend, replicas
        self.timeout = config.request_timeout_s
        self.in_flight = 0
        self.recorded: OrderedDict[str, None] = OrderedDict()  # batches already counted in the metrics
        self.running = 0
        self.poller: asyncio.Task | None = None

    async def start(self) -> None:
        info = await asyncio.wait_for(self.handle.describe.remote(), 600)  # waits for a first replica
        self.backend.name, self.backend.precision, self.backend.device = info["backend"], info["precision"], info["device"]
        await self._refresh()
        self.poller = asyncio.get_running_loop().create_task(self._poll())

    async def submit(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError, RayServeException

        self.in_flight += 1
        try:
            result = await self.handle.embed.remote(pixels)
            if isinstance(result, ItemFailed):  # this image failed in the replica; its batch-mates did not
                raise result
            vector, seconds, batch, size = result
        except BackPressureError:
            raise QueueFull from None
        except (RayError, RayServeException) as exc:  # the replica died or is gone: retry later
            raise ModelUnavailable(f"model unavailable: {type(exc).__name__}; retry shortly") from None
        finally:
            self.in_flight -= 1
        if batch not in self.recorded:  # every member of a batch says so; count it once
            self.recorded[batch] = None
            if len(self.recorded) > 10_000:
                self.recorded.popitem(last=False)
            self.on_batch(size, seconds)
        return vector, seconds

    def queue_depth(self) -> int:
        return self.in_flight

    def health(self) -> dict[str, Any]:
        target = (f"{self.replicas.minimum or 1}..{self.replicas.maximum or self.replicas.count}"
                  if self.replicas.autoscaling else self.replicas.count)
        return {"engine": "ray", "replicas": {"running": self.running, "target": target}, "ready": self.running > 0}

    async def _refresh(self) -> None:
        def count() -> int:
            status = serve.status().applications.get(APP_NAME)
            deployment = status.deployments.get(MODEL_DEPLOYMENT) if status else None
            return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0

        try:
            self.running = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, count), 10)
        except Exception:  # noqa: BLE001 - the controller is busy or gone: keep the last count
            pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await self._refresh()

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.poller:
            self.poller.cancel()


TEXT_TOWER = "text_model.embeddings.token_embedding.weight"


class _Ingress:
    """Serves ``service.app.create_app`` (built in the replica, with the model handle). Weights with
    a text tower also get the text endpoints, whose (small) text model runs here in the ingress;
    images always go to the model replicas."""

    def __init__(self, model: Any, weights: str, config: ServiceConfig, replicas: Replicas, backend: str,
                 device: str, options: dict[str, Any], security: SecurityConfig | None = None):
        from ..encoder import VisionEncoder
        from ..model.config import VisionConfig
        from ..weights.format import WeightLoader

        loader = WeightLoader(weights)
        self.encoder = VisionEncoder(loader, ReplicaBackend(backend, None, device), VisionConfig.from_weights(loader))
        self.text_model = None
        if TEXT_TOWER in loader:
            from ..image_text import ImageTextModel

            self.text_model = ImageTextModel.from_parquet(weights, backend=backend, device=device, **options)
        self.model, self.config, self.replicas, self.security = model, config, replicas, security

    def __serve_build_asgi_app__(self):
        from ..service.app import create_app

        def serve_model(on_batch: Callable[[int, float], None]) -> ServeModel:
            return ServeModel(self.model, on_batch, self.encoder.backend, self.replicas, self.config)

        return create_app(self.encoder, self.config, self.text_model, model=serve_model, security=self.security)


ArrowvisionIngress = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress()(_Ingress))


def build_app(weights: str, *, backend: str = "openvino", device: str = "CPU", backend_options: dict | None = None,
              config: ServiceConfig | None = None, replicas: Replicas | None = None,
              security: SecurityConfig | None = None) -> Any:
    """The Serve application: the ingress bound to the model deployment; the ingress serves the
    app of ``serve`` with the same access policy (``security``: key, CORS, rate limit)."""
    config = config or ServiceConfig()
    replicas = replicas or Replicas()
    weights = os.path.abspath(weights)
    model = ArrowvisionModel.options(**replicas.options(config.max_batch, config.max_queue)).bind(
        weights, backend, device, backend_options or {}, config.max_batch, config.max_wait_ms)
    # the ingress parses and decodes; it reserves no CPU so that the model replicas get them all
    ingress = ArrowvisionIngress.options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                                         max_ongoing_requests=4 * config.max_queue)
    return ingress.bind(model, weights, config, replicas, backend, device, backend_options or {}, security)


def start(app: Any, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Deploy ``app`` at http://host:port/ (Serve's proxy), waiting until it is ready."""
    connect(address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001 - Serve reports a failed replica start as RuntimeError & co
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise ArrowVisionError(f"Ray Serve could not deploy the service ({type(exc).__name__}: "
                               f"{lines[-1] if lines else 'no detail'}); see the Ray log above") from None


def run_service(weights: str, *, host: str, port: int, address: str | None, backend: str, device: str,
                backend_options: dict, config: ServiceConfig, replicas: Replicas,
                security: SecurityConfig | None = None) -> None:
    """``arrowvision serve --engine ray``: deploy, then serve until SIGINT/SIGTERM, then tear down.
    Serve's proxy (uvicorn) reads ``FORWARDED_ALLOW_IPS``: on a cluster started here it inherits
    ours, set to the proxies the user named (none by default; uvicorn's default trusts 127.0.0.1).
    A joined cluster (``--address``) keeps its own setting: see docs/SECURITY.md."""
    trusted = ",".join(security.forwarded_allow_ips) if security else ""
    os.environ["FORWARDED_ALLOW_IPS"] = trusted or "none"  # a literal no peer address equals
    connect(address)  # first: ray.init installs signal handlers of its own, ours replace them
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(build_app(weights, backend=backend, device=device, backend_options=backend_options, config=config,
                        replicas=replicas, security=security), host, port, address)
        print(f"arrowvision serving {weights} on Ray Serve ({replicas.describe()}, {backend}) at http://{host}:{port}",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.delete(APP_NAME)  # the ingress drains in-flight requests (its lifespan) first
        except Exception:  # noqa: BLE001 - nothing deployed (a failed start): nothing to remove
            pass
        if address is None and not os.environ.get("RAY_ADDRESS"):
            serve.shutdown()  # our own local cluster: stop the proxy and controller too
