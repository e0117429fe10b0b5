"""arrowvision on Ray (the optional ``arrowvision[ray]`` extra): corpus embedding on Ray Data
(``data``) and the HTTP service on Ray Serve (``serve``). Only ``--engine ray`` imports this
package; the rest of arrowvision never imports ray."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ArrowVisionError


def require_ray() -> Any:
    """``import ray``, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ArrowVisionError("--engine ray needs Ray: pip install 'arrowvision[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), else start a local one; a process that
    is already connected (a notebook, the tests) keeps its connection."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"address": address, "logging_level": "WARNING", "log_to_driver": False}
    if address is None:
        options.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ArrowVisionError(f"cannot connect to {where}: {exc}") from None
    return ray


def threads_option(backend: str, cpus: int) -> dict[str, Any]:
    """Backend options that give the model exactly ``cpus`` inference threads (OpenVINO's
    ``INFERENCE_NUM_THREADS``, ONNX Runtime's intra-op threads; torch is set process-wide)."""
    if backend in ("openvino", "onnxruntime"):
        return {"num_threads": cpus}
    if backend == "torch":
        import torch

        torch.set_num_threads(cpus)
    return {}


