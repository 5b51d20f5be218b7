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

# pip rebuilds every source file on each install (minutes on two cores), so
# the build is skipped when the library in place is current: built (a stamp
# written after each build) for this torch, Python and build settings, no
# source newer than it, and this checkout the fused_ce that Python imports.
# FUSED_CE_REBUILD=1 builds anyway.
STAMP=build/fused_ce-build.stamp
build_key() {
  "$PYTHON" -c 'import os, sys, torch
print(torch.__version__, sys.version.split()[0],
      *(f"{k}={os.environ.get(k, chr(45))}" for k in
        ("FORCE_CUDA", "FUSED_CE_CPU_ONLY", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CXX")))'
  command -v nvcc || true
}
build_is_current() {
  local library repo=$PWD
  library=$(ls fused_ce/_C*.so 2>/dev/null | head -n 1)
  [ "${FUSED_CE_REBUILD:-0}" != 1 ] && [ -n "$library" ] && [ -f "$STAMP" ] &&
    [ "$(cat "$STAMP")" = "$(build_key)" ] &&
    [ -z "$(find csrc setup.py pyproject.toml -newer "$library" -print -quit)" ] &&
    (cd / && "$PYTHON" -c 'import sys, fused_ce; sys.exit(fused_ce.__file__ != sys.argv[1])' \
        "$repo/fused_ce/__init__.py") >/dev/null 2>&1
}

if build_is_current; then
  echo "[setup] fused_ce is built from the current sources (FUSED_CE_REBUILD=1 rebuilds)"
else
  echo "[setup] building fused_ce against torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  rm -f "$STAMP"
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps -e .
  mkdir -p build && build_key > "$STAMP"
fi
"$PYTHON" -c "import fused_ce; print('[setup] fused_ce', fused_ce.__version__, '| CPU kernels:', fused_ce.cpu_capability(), '| CUDA kernels:', fused_ce.built_with_cuda())"
