#!/usr/bin/env bash
# Sets up fused_ce (scripts/setup.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gradcheck`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh pytest hypothesis
"$PYTHON" -m pytest tests -q "$@"
