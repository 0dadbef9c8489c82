#!/usr/bin/env bash
# Stage-2 benchmark on Fashion-MNIST (2-core CPU): DL-VAE against the strong VQ (vector-quantize-pytorch's
# VectorQuantize, k-means init, dead-code restarts) and residual VQ, each with the same spatial-depth prior (same
# width and depth, same steps, same sampler), sample FID on --fid-images samples against as many test images.
#
#   bash bench/stage2_fashion.sh [OUT] [extra flags of lasers compare]   # default OUT: runs/stage2-fashion
#
# Rates (bits per latent site, K = 512 everywhere): VectorQuantize 9; DL S = 1, B = 16 coefficient bins: 13;
# ResidualVQ 2 x 512: 18. Needs Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist, or --data-root).
# Writes OUT/stage2.md and .json (the table), OUT/pictures/samples-*.png and one run per model under OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/stage2-fashion}"
shift || true
exec lasers compare --stage2 --data fashion-mnist --models dl-vae,vqp-vae,rvq-vae \
  --n-e 512 --sparsity 1 --coeff-bins 16 --rvq-quantizers 2 \
  --steps 1500 --eval-images 1000 \
  --prior-steps 2000 --prior-fid-every 500 --prior-select-images 200 --prior-fid-images 1000 \
  --prior-dropout 0.1 --out "$OUT" "$@"
