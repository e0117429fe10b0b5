"""Exports of large models run in a child process, so that the process that then serves the model
never holds what exporting needed.

Exporting imports torch, builds our ViT over the mapped Parquet weights (whose pages it reads),
and makes the runtime's own copy of the graph; after it, freed heap that glibc keeps, torch's
libraries and the read weight pages stay in the process. SigLIP-B/16, OpenVINO fp32, first load
then batch 32: 1.7 GB peak RSS in one process, against 0.8 GB when the export ran in a child
(which peaks at ~1 GB itself and exits). The child costs a Python start and the imports (~1 s),
small next to an export, and only models of ``CHILD_MIN_BYTES`` or more use one; small ones
(the demo model, tests) export in-process.

    python -m arrowvision.backends.export_child   # reads its job (a pickle) on stdin
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .. import errors
from ..errors import BackendError
from ..weights.format import WeightLoader

CHILD_MIN_BYTES = 64 << 20  # weights from this size up export in a child process

log = logging.getLogger("arrowvision")


def export_entry(function: str, weights: WeightLoader, **options: Any) -> Path:
    """``function(weights, **options)`` (``"module:name"``, an exporter returning the cache entry),
    run in a child process when the weights are ``CHILD_MIN_BYTES`` or more, else here."""
    module, _, name = function.partition(":")
    if weights.nbytes < CHILD_MIN_BYTES:
        return getattr(importlib.import_module(module), name)(weights, **options)
    return _run_child(module, name, weights.path, options)


def _run_child(module: str, name: str, weights_path: Path, options: dict[str, Any]) -> Path:
    with tempfile.TemporaryDirectory(prefix="arrowvision-export-") as folder:
        result_path = Path(folder) / "result.json"
        job = {"module": module, "function": name, "weights": str(weights_path), "options": options,
               "result": str(result_path), "log_level": log.getEffectiveLevel()}
        package_root = str(Path(__file__).resolve().parents[2])  # the arrowvision this process runs
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        # The child's stdout goes to our stderr: a CLI's stdout (e.g. JSON output) stays clean.
        run = subprocess.run([sys.executable, "-m", __name__], input=pickle.dumps(job), stdout=2, env=env, check=False)
        if not result_path.exists():
            raise BackendError(f"the export process ended without a result (exit status {run.returncode})")
        result = json.loads(result_path.read_text())
    if "entry" in result:
        return Path(result["entry"])
    error = getattr(errors, result["type"], None)
    if not (isinstance(error, type) and issubclass(error, errors.ArrowVisionError)):
        raise BackendError(f"export failed: {result['type']}: {result['message']}")
    raise error(result["message"])


def main() -> None:
    job = pickle.loads(sys.stdin.buffer.read())  # written by _run_child of the parent process
    logging.basicConfig(level=job["log_level"], format="%(message)s")
    try:
        exporter = getattr(importlib.import_module(job["module"]), job["function"])
        result: dict[str, str] = {"entry": str(exporter(WeightLoader(job["weights"]), **job["options"]))}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        if not isinstance(exc, errors.ArrowVisionError):
            log.exception("export failed")
        result = {"type": type(exc).__name__, "message": str(exc)}
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
