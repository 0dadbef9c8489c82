#!/usr/bin/env bash
# One command for a GPU machine that has torch, nvcc and no network: build the CUDA extension against the local
# torch, run the test suite on the GPU (CUDA kernel, Triton compiled for real), run compute-sanitizer over the CUDA
# kernel, benchmark every backend and the GPU anchors, and write dated results under bench/results/ (card, driver,
# torch and CUDA versions, figures).
#
#   bash bench/gpu_check.sh [extra lasers-omp-bench arguments]
#
# Environment: PYTEST_ARGS (default: python_tests, the whole suite), SKIP_TESTS=1, SKIP_SANITIZER=1, BENCH_N (default
# 65536,1048576,4194304). The omp-gpu anchor is timed when `orthogonal-matching-pursuit-gpu` is importable.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

LASERS_EXT_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >/dev/null
"$PY" -c "import lasers_ext, torch; assert lasers_ext._C.with_cuda; print('built with CUDA for torch', torch.__version__)"

status=0
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  # fixed Triton launch configuration for the tests (autotuning every parametrisation costs minutes)
  LASERS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q ${PYTEST_ARGS:-python_tests} || status=1  # still sanitize and bench
fi

if [[ "${SKIP_SANITIZER:-0}" != 1 ]] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    # racecheck reports hazards as warnings: fail on any reported hazard, not only on errors
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" bench/cuda_sanitize.py 2>&1 | tee /tmp/sanitizer.log \
      || status=1
    if grep -q "Race reported" /tmp/sanitizer.log; then status=1; fi
  done
fi

stamp="$(date +%F)"
card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' )"
out="bench/results/${stamp}-${card}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "${out}-gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "${out}-gpu.txt"
"$PY" bench/omp_bench.py --device cuda --N "${BENCH_N:-65536,1048576,4194304}" --json "${out}-float32.json" "$@" \
  | tee "${out}-float32.txt"
echo "results: ${out}-*"
exit "$status"
