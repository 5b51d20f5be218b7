#!/usr/bin/env bash
# Installs what fused_ce needs and builds it in place (editable install).
#
# torch: the one already installed is used as it is. Only when there is none
# do we install the pinned CPU build (an unpinned `pip install torch` pulls
# gigabytes of CUDA packages). Set FUSED_CE_TORCH to pin something else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] torch not found: installing ${FUSED_CE_TORCH:-torch==2.13.0}"
  "$PYTHON" -m pip install --quiet "${FUSED_CE_TORCH:-torch==2.13.0}"
fi
"$PYTHON" -m pip install --quiet ninja pybind11 numpy setuptools wheel "$@"

echo "[setup] building fused_ce against torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
"$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PYTHON" -c "import fused_ce; print('[setup] fused_ce', fused_ce.__version__, '| CPU kernels:', fused_ce.cpu_capability(), '| CUDA kernels:', fused_ce.built_with_cuda())"
