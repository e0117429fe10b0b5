"""The service's Prometheus metrics, one registry per app (so several apps can live in a process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Metrics:
    registry: Any
    requests_total: Any
    latency: Any
    batch_sizes: Any
    inference_seconds: Any
    queue_depth: Any
    images_total: Any
    url_fetches: Any
    texts_total: Any = None  # only when a served model has a text tower
    text_batch_sizes: Any = None

    @classmethod
    def create(cls, text: bool) -> Metrics:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        registry = CollectorRegistry()
        metrics = cls(
            registry=registry,
            requests_total=Counter("arrowvision_requests_total", "HTTP requests by endpoint, status and model",
                                   ["endpoint", "status", "model"], registry=registry),
            latency=Histogram("arrowvision_request_latency_seconds", "Request latency", ["endpoint", "model"],
                              registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
            batch_sizes=Histogram("arrowvision_batch_size", "Images per model call", ["model"], registry=registry,
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
            inference_seconds=Histogram("arrowvision_inference_seconds", "Model call duration", ["model"], registry=registry),
            queue_depth=Gauge("arrowvision_queue_depth", "Images waiting for the model", ["model"], registry=registry),
            images_total=Counter("arrowvision_images_total", "Images embedded", ["model"], registry=registry),
            url_fetches=Counter("arrowvision_url_fetches_total", "Image URL fetches by outcome", ["outcome"], registry=registry),
        )
        if text:
            metrics.texts_total = Counter("arrowvision_texts_total", "Texts embedded", ["model"], registry=registry)
            metrics.text_batch_sizes = Histogram("arrowvision_text_batch_size", "Texts per text-tower call", ["model"],
                                                 registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        return metrics

    def record_image_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_sizes.labels(model).observe(size)
        self.inference_seconds.labels(model).observe(seconds)
        self.images_total.labels(model).inc(size)

    def record_text_batch(self, model: str, size: int, seconds: float) -> None:
        self.text_batch_sizes.labels(model).observe(size)
        self.texts_total.labels(model).inc(size)

    def observe_request(self, endpoint: str, status: int, model: str, seconds: float) -> None:
        self.requests_total.labels(endpoint, str(status), model).inc()
        self.latency.labels(endpoint, model).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The /metrics body and its media type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
