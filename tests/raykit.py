"""One local Ray cluster per test run, shared by the Ray test modules (import ``ray_cluster``
from here). Two CPUs, a small object store, no dashboard, no runtime_env (no network)."""

from __future__ import annotations

import os

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture(scope="session")
def ray_cluster():
    """``ray`` connected to the run's local cluster (started on first use, reused by every
    module: a process can hold one connection; Ray shuts it down at exit)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 logging_level="WARNING", log_to_driver=False)
    return ray
