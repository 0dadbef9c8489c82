#!/usr/bin/env bash
# One command for a GPU machine that has torch, nvcc and no network: build the CUDA extension against the local
# torch, run the test suite on the GPU (Triton compiled for real, not interpreted), benchmark every backend on the
# GPU, and write dated results under bench/results/ (card, driver, torch and CUDA versions, figures).
#
#   bash bench/gpu_check.sh [extra lasers-omp-bench arguments]
#
# Needs pytest, hypothesis and scikit-learn for the tests (skipped with a message when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

LASERS_EXT_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >/dev/null
"$PY" -c "import lasers_ext, torch; assert lasers_ext._C.with_cuda; print('built with CUDA for torch', torch.__version__)"

if "$PY" -c "import pytest, hypothesis, sklearn" 2>/dev/null; then
  "$PY" -m pytest python_tests -q -x
else
  echo "pytest/hypothesis/scikit-learn missing: tests skipped" >&2
fi

stamp="$(date +%F)"
card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' )"
out="bench/results/${stamp}-${card}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${out}-gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "${out}-gpu.txt"
"$PY" bench/omp_bench.py --device cuda --N 65536,1048576,4194304 --json "${out}-float32.json" "$@"
echo "results: ${out}-*"
