"""One model per process per (weights, backend, options), shared by every engine's threads.

Engines call a UDF once per vector of rows (DuckDB: 2048, polars: a morsel, Ray: a block), often
from several threads at once: loading the model each time would dominate, and a backend holds
one inference request that two threads must not drive together. ``shared_model`` loads once
(keyed by the weights file's identity, so a rewritten file reloads) and pairs the encoder with
the lock its model calls take; decoding stays outside the lock and runs in parallel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import ArrowVisionError, ImageError
from .arrow.columns import ColumnEmbeddings, embed_image_column, embed_text_column, errors_message

log = logging.getLogger("arrowvision")
ON_ERROR = ("null", "raise")

_lock = threading.Lock()
_models: dict[tuple, SharedModel] = {}


def default_backend() -> str:
    """What ``--backend default`` means on the CLI: OpenVINO (exact fp32) if installed, else torch."""
    return "openvino" if importlib.util.find_spec("openvino") else "torch"


@dataclass
class SharedModel:
    """An encoder (vision or text) and the lock its model calls take; ``embed`` does the rest."""

    encoder: Any
    tower: str  # "vision" or "text"
    options: dict[str, Any] = field(default_factory=dict)  # batch_size, workers, decode, normalize
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dim(self) -> int:
        return int(self.encoder.embedding_dim)

    def embed(self, column: pa.Array | pa.ChunkedArray) -> ColumnEmbeddings:
        if self.tower == "text":
            keep = {k: v for k, v in self.options.items() if k in ("batch_size", "normalize")}
            return embed_text_column(self.encoder, column, model_lock=self.lock, **keep)
        return embed_image_column(self.encoder, column, model_lock=self.lock, **self.options)

    def embed_arrow(self, column: pa.Array | pa.ChunkedArray, on_error: str = "null") -> pa.FixedSizeListArray:
        """The column's embeddings for an engine: rows that fail are null and logged as a warning
        (``on_error="null"``), or fail the call with every reason (``"raise"``)."""
        result = self.embed(column)
        if result.errors:
            if on_error == "raise":
                raise ImageError(errors_message(result.errors))
            log.warning("arrowvision: %s", errors_message(result.errors))
        return result.to_arrow()


COLUMN_OPTIONS = ("batch_size", "workers", "decode", "normalize")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ArrowVisionError(f"on_error={on_error!r}: choose null (failed rows are null, logged) or raise")
    return on_error


def _key(weights: str | os.PathLike, tower: str, backend: str, device: str, options: dict[str, Any]) -> tuple:
    path = Path(weights).expanduser()
    try:
        status = path.stat()
    except OSError as exc:
        raise ArrowVisionError(f"{weights}: cannot read the weights file ({exc.strerror})") from None
    identity = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    return (identity, tower, backend, device, json.dumps(options, sort_keys=True, default=str))


def shared_model(weights: str | os.PathLike, *, tower: str = "vision", backend: str = "default",
                 device: str = "cpu", **options: Any) -> SharedModel:
    """The process's model for these weights and options, loaded on first use.

    ``options``: the column options (batch_size, workers, decode, normalize) and the backend's own
    (precision, mode, cache_dir, min_cosine, num_threads...)."""
    if tower not in ("vision", "text"):
        raise ArrowVisionError(f"tower must be vision or text, got {tower!r}")
    backend = default_backend() if backend == "default" else backend
    column_options = {k: options.pop(k) for k in COLUMN_OPTIONS if k in options}
    key = _key(weights, tower, backend, device, {**options, **column_options})
    with _lock:  # one load at a time: a second thread asking for the same model waits for it
        model = _models.get(key)
        if model is None:
            model = _models[key] = SharedModel(_load(weights, tower, backend, device, options), tower, column_options)
    return model


def _load(weights: str | os.PathLike, tower: str, backend: str, device: str, options: dict[str, Any]) -> Any:
    if backend == "torch" and str(device).upper() == "CPU":
        device = "cpu"
    if tower == "text":
        from .text_encoder import TextEncoder

        text_backend = backend if backend in ("torch", "openvino") else default_backend()  # text: no onnx/auto
        kept = ("precision", "cache_dir", "min_cosine", "num_threads") if text_backend == "openvino" else ()
        return TextEncoder.from_parquet(weights, backend=text_backend, device=device,
                                        **{k: v for k, v in options.items() if k in kept})
    from .encoder import VisionEncoder

    return VisionEncoder.from_parquet(weights, backend=backend, device=device, **options)


def has_text_tower(weights: str | os.PathLike) -> bool:
    """Whether a weights file holds a text tower (converted with ``--tower all``)."""
    from .model.text_config import TextConfig
    from .weights.format import WeightLoader

    try:
        TextConfig.from_weights(WeightLoader(weights))
    except ArrowVisionError:
        return False
    return True


def clear() -> None:
    """Forget every loaded model (tests; a long-lived process swapping models)."""
    with _lock:
        _models.clear()
