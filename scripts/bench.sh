#!/usr/bin/env bash
# Sets up fused_ce (scripts/setup.sh) and runs the benchmark: on the CPU by
# default, quick mode unless arguments are given, e.g.
#   bash scripts/bench.sh                 # quick CPU run (about 20 s once set up)
#   bash scripts/bench.sh --device cuda   # full run on the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# matplotlib draws the plot; the benchmark runs (without the plot) where it cannot be installed.
bash scripts/setup.sh matplotlib || bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- --quick; fi
"$PYTHON" -m fused_ce.bench "$@"
