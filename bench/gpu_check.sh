#!/usr/bin/env bash
# One command for a bare GPU machine that has torch, nvcc and no network (at most about 8 minutes):
#   1. builds the CUDA extension against the local torch (for the visible GPU's architecture only, in parallel), and
#      the omp-gpu anchor from .anchors/omp-gpu when that folder was carried;
#   2. runs the CUDA tests (fast path bit for bit against the CPU kernel, general kernel, Triton compiled for real);
#   3. runs compute-sanitizer memcheck and racecheck over both CUDA kernels;
#   4. benchmarks every backend, the CUDA kernel's variants and the batched-PyTorch anchors at N = 65536 and 2^22;
#   5. profiles the fast kernel with Nsight Compute (instructions, issue rate, L2 bytes per vector, stall mix);
#   6. writes dated files under bench/results/, a summary table (also appended to bench/results/README.md), and a
#      copy of everything under $OUT when the device tool runs it.
# A step that fails is reported and the others still run; the exit status is non-zero if any step failed.
#
#   bash bench/gpu_check.sh [extra lasers-omp-bench arguments]
#
# Environment: PYTEST_ARGS (default: the CUDA-related test files), SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_NCU=1,
# BENCH_N (default 65536,4194304).
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0)) s] $*"; }
status=0
fail() { echo "*** FAILED: $*"; status=1; }

stamp="$(date +%F)"
card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')"
out="bench/results/${stamp}-${card}"
mkdir -p bench/results
log="${out}-log.txt"
exec > >(tee "$log") 2>&1

step "build (nvcc for the visible GPU only)"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
anchor_build=""
if [[ -d .anchors/omp-gpu ]] && ! "$PY" -c "import orthogonal_matching_pursuit_gpu" 2>/dev/null; then
  ("$PY" -m pip install -q --no-build-isolation --no-deps --no-index .anchors/omp-gpu >/tmp/omp-gpu.log 2>&1 \
    || echo "omp-gpu anchor did not build: $(tail -3 /tmp/omp-gpu.log)") &
  anchor_build=$!
fi
LASERS_EXT_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/build.log 2>&1 \
  || { tail -40 /tmp/build.log; fail "build"; exit 1; }
if [[ -n "$anchor_build" ]]; then wait "$anchor_build"; fi
"$PY" -c "import lasers_ext, torch; assert lasers_ext._C.with_cuda; print('built with CUDA for torch', torch.__version__)" \
  || { fail "import"; exit 1; }

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  step "tests"
  # fixed Triton launch configuration for the tests (autotuning every parametrisation costs minutes)
  LASERS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
    ${PYTEST_ARGS:-python_tests/test_cuda.py python_tests/test_triton.py python_tests/test_ops_api.py} || fail "tests"
fi

if [[ "${SKIP_SANITIZER:-0}" != 1 ]]; then
  step "compute-sanitizer"
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      # racecheck reports hazards as warnings: fail on any reported hazard, not only on errors
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" bench/cuda_sanitize.py >/tmp/sanitizer.log 2>&1 \
        || fail "sanitizer $tool"
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Race reported|sanitize run finished|Device not supported" \
        /tmp/sanitizer.log | sort | uniq -c | head -20
      if grep -q "Race reported" /tmp/sanitizer.log; then fail "racecheck hazards"; fi
    done
  else
    echo "compute-sanitizer not found: skipped"
  fi
fi

step "benchmark"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "${out}-gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "${out}-gpu.txt"
cat "${out}-gpu.txt"
LASERS_TRITON_AUTOTUNE=0 "$PY" bench/omp_bench.py --device cuda --N "${BENCH_N:-65536,4194304}" \
  --only cuda,cuda-general,cuda-fast-v1,triton,naive-torch,omp-gpu,sklearn --json "${out}-float32.json" "$@" \
  | tee "${out}-float32.txt" || fail "benchmark"

if [[ "${SKIP_NCU:-0}" != 1 ]]; then
  step "Nsight Compute: the fast kernel at N = 2^20"
  if command -v ncu >/dev/null; then
    sections=(--section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats
              --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis)
    metrics=smsp__inst_executed.sum,sm__inst_executed.avg.per_cycle_active,lts__t_bytes.sum,dram__bytes.sum,l1tex__t_sector_hit_rate.pct,smsp__sass_thread_inst_executed_op_ffma_pred_on.sum,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,launch__registers_per_thread
    ncu_args=(--clock-control none --kernel-name-base demangled -k "regex:fast::kernel" --launch-skip 1 -c 1)
    if ! timeout 240 ncu "${ncu_args[@]}" "${sections[@]}" --metrics "$metrics" --csv --page raw \
        "$PY" bench/ncu_fast.py > "${out}-ncu.csv" 2>/tmp/ncu.err; then
      echo "ncu with explicit metrics failed ($(tail -2 /tmp/ncu.err)); again with the sections only"
      timeout 180 ncu "${ncu_args[@]}" "${sections[@]}" --csv --page raw "$PY" bench/ncu_fast.py \
        > "${out}-ncu.csv" 2>/tmp/ncu.err || { tail -5 /tmp/ncu.err; fail "ncu"; }
    fi
  else
    echo "ncu not found: skipped"
  fi
fi

step "summary"
"$PY" bench/gpu_summary.py "$out" || fail "summary"
echo "results: ${out}-*   [total $((SECONDS - t0)) s, status $status]"
if [[ -n "${OUT:-}" ]]; then
  cp "${out}"-*.txt "${out}"-*.json "${out}"-*.csv "${out}"-*.md bench/results/README.md "$OUT"/ 2>/dev/null || true
fi
exit "$status"
