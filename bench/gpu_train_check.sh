#!/usr/bin/env bash
# The whole package on a GPU, one call of at most about 8 minutes on a bare machine with torch and nvcc:
#   1. builds the CUDA extension for the visible GPU (skipped with --device cpu: the current environment is used);
#   2. `lasers compare` on a short schedule (both models, bfloat16 autocast, pictures and table), and the same under
#      `torchrun --nproc_per_node=1` (NCCL on a GPU, gloo on the CPU);
#   3. training-step time of DL against VQ (bench/train_step_bench.py): 32x32/b32 and 256x256/b8, VAE and GAN pairs,
#      eager and torch.compile(fullgraph=True), with the share of lasers_ext::batch_omp in the DL step;
#   4. the Triton backend with autotuning on beside the CUDA kernel (bench/gpu_extras.py triton);
#   5. FID of the compare run's DL reconstructions on the GPU against the CPU value, same images (gpu_extras.py fid);
#   6. dated files under bench/results/ (*-train-*.json/.txt/.log) and a copy under $OUT when the device tool runs it.
# A step that fails is reported and the others still run; the exit status is non-zero if any step failed.
#
#   bash bench/gpu_train_check.sh                       # on the GPU machine
#   bash bench/gpu_train_check.sh --device cpu --tiny   # rehearsal on a CPU: tiny models, a few steps (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
device=cuda
tiny=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) echo "unknown argument $1 (use --device cpu|cuda, --tiny)"; exit 2 ;;
  esac
done
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0)) s] $*"; }
status=0
fail() { echo "*** FAILED: $*"; status=1; }

stamp="$(date +%F)"
if [[ "$device" == cuda ]]; then
  card="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')"
else
  card="cpu-$(nproc)core"
fi
tag="$([[ $tiny == 1 ]] && echo "-tiny" || true)"
out="${RESULTS_DIR:-bench/results}/${stamp}-${card}-train${tag}"
runs="${RUNS_DIR:-/tmp/lasers-gpu-train}"
mkdir -p "$(dirname "$out")" "$runs"
exec > >(tee "${out}-log.txt") 2>&1

if [[ $tiny == 1 ]]; then
  model=(--hidden 16 --res-hidden 8 --n-e 32 --e-dim 4 --sparsity 2)
  compare_flags=(--steps 4 --batch-size 8 --image-size 16 --train-length 32 --eval-images 8 --eval-every 0
                 --checkpoint-every 4 --log-every 2 "${model[@]}")
  bench_flags=(--settings 16x16/b4 --steps 2 --warmup 1 --hidden 16 --res-hidden 8 --n-e 32 --e-dim 4 --sparsity 2
               --ndf 8 --disc-layers 2)
  triton_n=256; fid_images=8
else
  compare_flags=(--steps 300 --eval-images 256 --eval-every 0)
  bench_flags=(--settings 32x32/b32,256x256/b8 --steps 30 --warmup 5)
  triton_n=1048576; fid_images=256
fi

if [[ "$device" == cuda ]]; then
  step "build (nvcc for the visible GPU only)"
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
    export TORCH_CUDA_ARCH_LIST
  fi
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  LASERS_EXT_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/build.log 2>&1 \
    || { tail -40 /tmp/build.log; fail "build"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
"$PY" -c "import torch, lasers_ext; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'backends',
lasers_ext.available_backends('$device'))" || { fail "import"; exit 1; }

step "lasers compare on $device (bf16 autocast on CUDA)"
rm -rf "$runs/compare" "$runs/compare-ddp"
"$PY" -m lasers_ext.training.cli compare --device "$device" --out "$runs/compare" --no-progress "${compare_flags[@]}" \
  | tee "${out}-compare.txt" || fail "compare"

step "the same under torchrun --nproc_per_node=1 ($([[ $device == cuda ]] && echo NCCL || echo gloo))"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m lasers_ext.training.cli compare --device "$device" \
  --out "$runs/compare-ddp" --no-progress "${compare_flags[@]}" | tee "${out}-compare-ddp.txt" \
  || fail "torchrun compare"

step "training-step time, DL against VQ"
"$PY" bench/train_step_bench.py --device "$device" "${bench_flags[@]}" --json "${out}-steps.json" \
  | tee "${out}-steps.txt" || fail "step-time benchmark (see the error rows)"

step "Triton with autotuning beside the compiled kernel"
LASERS_TRITON_AUTOTUNE=1 "$PY" bench/gpu_extras.py triton --device "$device" --n "$triton_n" \
  --json "${out}-triton.json" || fail "triton check"

step "FID on $device against the CPU, same images"
"$PY" bench/gpu_extras.py fid "$runs/compare/dl-vae" --images "$fid_images" --json "${out}-fid.json" \
  || fail "FID check"

echo "results: ${out}-*   [total $((SECONDS - t0)) s, status $status]"
if [[ -n "${OUT:-}" ]]; then
  cp "${out}"-* "$OUT"/ 2>/dev/null || true
  cp -r "$runs/compare/pictures" "$OUT/compare-pictures" 2>/dev/null || true
fi
exit "$status"
