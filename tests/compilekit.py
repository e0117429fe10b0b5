"""A fresh process that loads a compiled torch backend and reports torch's compile-cache counters
(tests/test_compile_cache.py on the CPU, tests/test_cuda.py on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, logging, sys
import numpy as np
from torch._dynamo.utils import counters
from arrowvision import VisionEncoder

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
weights, cache, pixels, device = sys.argv[1:5]
encoder = VisionEncoder.from_parquet(weights, backend="torch", device=device, precision="fp32", compile=True,
                                     cache_dir=cache)
output = encoder.backend(np.load(pixels))
print(json.dumps({"loaded": encoder.backend.compile_cache.loaded, "path": str(encoder.backend.compile_cache.path),
                  "counters": {name: dict(counters[name]) for name in ("inductor", "aot_autograd")},
                  "output": output.tolist()}))
"""


def run_child(weights: Path, cache: Path, inductor: Path, pixels: Path, device: str = "cpu") -> tuple[dict, str]:
    """Run CHILD with its own Inductor (and Triton) folders; (its JSON report, its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(inductor),
           "TRITON_CACHE_DIR": str(inductor / "triton")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(weights), str(cache), str(pixels), device], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr
