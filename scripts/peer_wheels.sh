#!/usr/bin/env bash
# Downloads the peer GPU libraries the benchmark compares with (Liger-Kernel,
# Apple's Cut Cross-Entropy: pure-Python wheels over Triton) into .whl/, for a
# GPU machine without network: scripts/gpu_check.sh installs what it finds
# there (the device call carries .whl). Their own dependencies (torch,
# triton) must already be on that machine.
#
#   bash scripts/peer_wheels.sh [PYTHON_VERSION]    (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version "${1:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    liger-kernel cut-cross-entropy
ls -l .whl
