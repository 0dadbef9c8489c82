#!/usr/bin/env bash
# Runs a command inside the project's virtual environment, creating or refreshing it first when needed.
#
#   bash scripts/env.sh lasers-omp-bench          # the main job (benchmark on the paper's default shape)
#   bash scripts/env.sh python -m pytest          # the test suite (what CI runs)
#
# The environment (.venv, or $LASERS_VENV) gets torch ($LASERS_TORCH, default torch==2.14.1: the CUDA 13.0 build,
# which compiles the CUDA sources with this machine's nvcc even without a GPU) and lasers_ext as an editable install
# built against that torch (--no-build-isolation). It is rebuilt when setup.py, pyproject.toml, csrc/ or the
# requested torch/CUDA settings change. LASERS_EXT_CUDA=0|1|auto is passed to setup.py (see there).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LASERS_VENV:-.venv}"
TORCH_SPEC="${LASERS_TORCH:-torch==2.14.1}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi

stamp_of_inputs() {
  {
    echo "$TORCH_SPEC ${LASERS_EXT_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"
    find setup.py pyproject.toml csrc -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -d' ' -f1
}

stamp="$(stamp_of_inputs)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[env] creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [[ "$(cat "$VENV/.lasers_stamp" 2>/dev/null)" != "$stamp" ]]; then
  echo "[env] installing $TORCH_SPEC and building lasers_ext (a cold build takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" numpy ninja "setuptools>=77" wheel
  "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[test]"
  echo "$stamp" > "$VENV/.lasers_stamp"
fi

export PATH="$PWD/$VENV/bin:$PATH"
exec "$@"
