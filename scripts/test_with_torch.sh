#!/usr/bin/env bash
# Builds fused_ce against another torch in a virtual environment and runs the
# test suite there, on the CPU: e.g. the GPU machine's torch 2.11 before a
# GPU session, so that a test or an API that only works with the torch of
# the development machines does not cost device time.
#
# Usage: scripts/test_with_torch.sh TORCH [pytest arguments]
#   TORCH: a wheel file, or a pip requirement such as torch==2.11.0
#
# Environment:
#   VENV   the virtual environment (default /tmp/fused_ce-torch-venv; reused
#          when it exists, so the second run skips the installation)
#   CUDA=1 also compile the CUDA kernels and their binding, as on the GPU
#          machine (a CUDA build of torch and nvcc needed; TORCH_CUDA_ARCH_LIST
#          defaults to 9.0; about 8 minutes on 2 cores). Without a GPU the
#          CUDA tests skip, but the extension that loads is the CUDA build.
#
# The build happens in a clone of the committed HEAD under the venv, so the
# working tree's own build is left alone; the tests are the working tree's.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,20p' "$0"
  exit 2
fi
TORCH_SPEC=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/fused_ce-torch-venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy pytest hypothesis ninja pybind11 setuptools
fi
echo "[test_with_torch] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"

SRC="$VENV/fused_ce-src"
rm -rf "$SRC"
git clone -q "$ROOT" "$SRC"
cp "$ROOT"/tests/*.py "$SRC/tests/"
cd "$SRC"
if [ "${CUDA:-0}" = 1 ]; then
  # nvcc in /usr/local/bin makes torch guess CUDA_HOME=/usr/local, which has no libcudart.
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/lib64 ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
else
  export FUSED_CE_CPU_ONLY=1
fi
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --inplace >"$VENV/build.log" 2>&1 || {
  tail -30 "$VENV/build.log"
  echo "[test_with_torch] build failed: $VENV/build.log"
  exit 1
}
PYTHONPATH="$SRC" "$VENV/bin/python" -c \
  'import fused_ce; print("[test_with_torch] built with CUDA:", fused_ce.built_with_cuda())'
PYTHONPATH="$SRC" "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
