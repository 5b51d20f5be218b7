"""Entry point of ``python -m fused_ce.bench`` (and the ``fused-ce-bench`` script)."""

import sys

from fused_ce.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
