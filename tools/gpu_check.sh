#!/usr/bin/env bash
# The one command for a lent GPU machine (issues 14 and 26): the CUDA tests, then benchmarks/gpu.py.
# Needs only python3 with torch (CUDA), torchvision, transformers (and what they pull in: numpy,
# Pillow, pyarrow, filelock); no openvino, onnxruntime or fastapi. arrowvision comes from this
# checkout (PYTHONPATH). Results go to $OUT (default /tmp/gpu-out): gpu.json (rewritten after each
# section), gpu.txt (the printed figures), pytest.txt.
# Budget: under 10 minutes on an H200 with 16 cores: CUDA tests <= 150 s, then the benchmark, whose
# sections stop starting after 340 s (timeout 420 s): model only (ours eager / fused / compiled /
# compiled + CUDA graphs vs transformers, with the ratios), a second process's compiled start
# from our cache (benchmarks/compile_start.py), end to end fast/gpu vs the DataLoader peer.
# A CPU dry run of the whole script: tools/gpu_check.sh --device cpu --tiny (its figures mean nothing).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
export ARROWVISION_CACHE="${ARROWVISION_CACHE:-/tmp/arrowvision-gpu-cache}"
PYTHON="${PYTHON:-python3}"
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3; nproc
"$PYTHON" -c "import importlib.util as u; m=[n for n in 'torch torchvision transformers pyarrow numpy PIL cv2 ml_dtypes platformdirs filelock pytest'.split() if u.find_spec(n) is None]; print('python modules missing here:', ' '.join(m) or 'none')"
# PYTEST_K: a -k filter for the CUDA tests (e.g. "fused or cache"); SKIP_PYTEST=1: benchmark only.
# Arguments go to benchmarks/gpu.py after these defaults, so they override them
# (e.g. --sections model,compile-start or --e2e-modes exact,fast,gpu).
if [ -n "${SKIP_PYTEST:-}" ]; then
  echo "CUDA tests skipped (SKIP_PYTEST)" | tee "$OUT/pytest.txt"
elif "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tail -80 | tee "$OUT/pytest.txt"
else
  echo "pytest not installed here: CUDA tests skipped" | tee "$OUT/pytest.txt"
fi
timeout 420 "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu.json" --budget 340 --compile \
  --sections accuracy,model,compile-start,e2e,peer --e2e-modes fast,gpu "$@" 2>&1 | tee "$OUT/gpu.txt"
echo "exit ${PIPESTATUS[0]}"; date
