"""The benchmark CLI (the README's main job) runs end to end and writes its files.

Timings are not asserted (they belong to benchmarks, not tests); parity is:
--strict makes the run fail when any implementation disagrees with eager.
"""

import json
import subprocess
import sys


def test_bench_cli_small_run(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "fused_ce.bench", "--shapes", "64x100,4x3x5x5:bf16",
           "--label-smoothing", "0.1", "--repeat", "5", "--warmup", "1", "--no-compile",
           "--no-memory", "--no-plot", "--strict", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in ("results.json", "results.md", "table.txt"):
        assert (out / name).is_file(), f"bench did not write {name}"
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert "fused_ce" in text and "eager" in text and "copy" in text
