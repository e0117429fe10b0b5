#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 14): the CUDA tests, then benchmarks/gpu.py.
# Needs only python3 with torch (CUDA), torchvision, transformers, pyarrow, numpy, Pillow, OpenCV;
# arrowvision comes from this checkout (PYTHONPATH). Results go to $OUT (default /tmp/gpu-out):
# gpu.json (rewritten after each section), gpu.txt (the printed figures), pytest.txt.
# Budget: under 5 minutes on an H100/H200 with 16 cores (run 1: 157 s; run 2 adds steady-state rows).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export ARROWVISION_CACHE="${ARROWVISION_CACHE:-/tmp/arrowvision-gpu-cache}"
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3; nproc
# PYTEST_K: a -k filter for the CUDA tests (e.g. "embed or graphs"); SKIP_PYTEST=1: benchmark only.
# Arguments go to benchmarks/gpu.py (e.g. --sections e2e --e2e-modes fast,gpu).
if [ -n "${SKIP_PYTEST:-}" ]; then
  echo "CUDA tests skipped (SKIP_PYTEST)" | tee "$OUT/pytest.txt"
elif python3 -c "import pytest" 2>/dev/null; then
  timeout 80 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tail -80 | tee "$OUT/pytest.txt"
else
  echo "pytest not installed here: CUDA tests skipped" | tee "$OUT/pytest.txt"
fi
timeout 240 python3 benchmarks/gpu.py --out "$OUT/gpu.json" --budget 190 --compile "$@" 2>&1 | tee "$OUT/gpu.txt"
echo "exit ${PIPESTATUS[0]}"; date
