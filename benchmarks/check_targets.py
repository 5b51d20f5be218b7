"""The cuda issue's speed and memory targets, checked against benchmark results.

    python benchmarks/check_targets.py RESULTS.json [MORE_RESULTS.json ...]

Reads the results.json files that ``python -m fused_ce.bench --device cuda``
writes (the fwd+bwd run and, where it was run, the one with ``--modes
graphed``) and prints one markdown table row per target and workload: what
was measured, the bound, and whether it is met. A target whose workload or
implementation is missing from the results says so rather than passing. The
exit status is 0 whatever the verdicts (this is a report, for the closing
note of a GPU session), 2 when no results file could be read.

The targets (issue 3, forward + backward, ``reduction="mean"``):

* 16384 x 128256 bfloat16 and 8192 x 32000 float32: at most 1.6x the time of
  the copy of the logits timed alongside, at least 3x faster than eager
  ``F.cross_entropy``, faster than ``torch.compile(F.cross_entropy)``;
* 65536 x 10 float32: at least 3x faster than eager (launched, and replayed
  from CUDA graphs where that mode was run: its host-free counterpart);
* peak memory during forward + backward at most logits + gradient + O(N):
  measured beyond the inputs, so at most one logits-sized gradient plus
  ``PER_ROW_BYTES`` per row, for every workload with a memory probe.

The CUDA-graph replay target is a test's (``test_cuda_graph*``), not a
benchmark's.
"""

import argparse
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fused_ce.bench import report  # noqa: E402  (the repository's package, importable from here)

ROOFLINE_BOUND = 1.6  # time over the copy's
EAGER_BOUND = 3.0  # speedup over eager
PER_ROW_BYTES = 64  # the O(N) allowance: per-row statistics and partial sums, with room to spare

# (shape, dtype) -> the targets that apply to it
SPEED_TARGETS: Dict[Tuple[Tuple[int, int], str], Tuple[str, ...]] = {
    ((16384, 128256), "bf16"): ("copy", "eager", "compile"),
    ((8192, 32000), "fp32"): ("copy", "eager", "compile"),
    ((65536, 10), "fp32"): ("eager",),
}
FWD_BWD, GRAPHED = "fwd+bwd", "graphed"


def _is_plain(workload) -> bool:
    """The issue's workloads: the loss with default options (and no LM head)."""
    return (workload.reduction == "mean" and workload.label_smoothing == 0.0 and workload.ignore_fraction == 0.0
            and not workload.weighted and workload.z_loss == 0.0 and workload.softcap is None
            and not workload.inplace_backward and workload.hidden == 0)


def _verdict(value: Optional[float], bound: float, at_most: bool) -> str:
    if value is None:
        return "not measured"
    return "yes" if (value <= bound if at_most else value >= bound) else "no"


def _find(results: Sequence, shape, dtype: str, mode: str, impl: str):
    for r in results:
        w = r.workload
        if tuple(w.shape) == shape and w.dtype == dtype and r.mode == mode and r.impl == impl and _is_plain(w):
            return r
    return None


def speed_rows(results: Sequence) -> List[List[str]]:
    """[target, workload, measured, bound, met] rows for the speed targets."""
    rows = []
    for (shape, dtype), targets in SPEED_TARGETS.items():
        label = f"{shape[0]} x {shape[1]} {dtype}"
        for mode in (FWD_BWD, GRAPHED):
            fused = _find(results, shape, dtype, mode, "fused_ce")
            if mode == GRAPHED and fused is None:
                continue  # the graphed mode is opt-in; its absence is no verdict
            where = label if mode == FWD_BWD else f"{label}, CUDA graph"
            if fused is None or not fused.ok:
                why = "not in the results" if fused is None else fused.status
                rows += [[_target_name(t), where, why, _bound_text(t), "not measured"] for t in targets]
                continue
            for target in targets:
                rows.append([_target_name(target), where, *_measure(target, fused, results, mode)])
    return rows


def _target_name(target: str) -> str:
    return {"copy": "time / copy's", "eager": "speedup over eager", "compile": "speedup over torch.compile"}[target]


def _bound_text(target: str) -> str:
    return {"copy": f"<= {ROOFLINE_BOUND}", "eager": f">= {EAGER_BOUND}", "compile": "> 1"}[target]


def _measure(target: str, fused, results: Sequence, mode: str) -> List[str]:
    """[measured, bound, met] of one target for fused_ce's result ``fused``."""
    if target == "copy":
        value = fused.ratio_to_copy
        return [_number(value, "x"), _bound_text(target), _verdict(value, ROOFLINE_BOUND, at_most=True)]
    if target == "eager":
        value = fused.speedup_vs_eager
        return [_number(value, "x"), _bound_text(target), _verdict(value, EAGER_BOUND, at_most=False)]
    w = fused.workload
    compiled = _find(results, tuple(w.shape), w.dtype, mode, "compile")
    if compiled is None or not compiled.ok:
        return ["torch.compile " + ("not in the results" if compiled is None else compiled.status), "> 1",
                "not measured"]
    speedup = compiled.median_ms / fused.median_ms
    return [_number(speedup, "x"), "> 1", "yes" if speedup > 1.0 else "no"]


def memory_rows(results: Iterable) -> List[List[str]]:
    """[target, workload, measured, bound, met] rows for fused_ce's peak memory, one per workload probed."""
    rows = []
    for r in results:
        if r.impl != "fused_ce" or r.mode != FWD_BWD or not r.ok or r.peak_bytes is None or r.workload.hidden:
            continue
        w = r.workload
        allowed = w.logits_bytes + PER_ROW_BYTES * (w.numel // w.classes)  # rows: the loss elements
        rows.append(["peak memory beyond the inputs", f"{w.name} ({w.shape_str})",
                     f"{r.peak_bytes / w.logits_bytes:.2f} x logits",
                     f"<= {allowed / w.logits_bytes:.2f} x logits (gradient + {PER_ROW_BYTES} B per row)",
                     "yes" if r.peak_bytes <= allowed else "no"])
    return rows


def _number(value: Optional[float], unit: str) -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def table(results: Sequence) -> str:
    header = ["target", "workload", "measured", "bound", "met"]
    body = speed_rows(results) + memory_rows(results)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files of python -m fused_ce.bench")
    args = parser.parse_args(argv)
    results, sources = [], []
    for path in args.results:
        try:
            loaded, metadata, _ = report.load(path)
        except (OSError, ValueError, KeyError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        results += loaded
        machine = (metadata.get("cuda") or {}).get("gpu") or (metadata.get("machine") or {}).get("cpu_model")
        sources.append(f"{path} ({machine}, torch {metadata.get('torch')}, commit {metadata.get('git_commit')})")
    if not sources:
        print("no results could be read", file=sys.stderr)
        return 2
    print("Targets of the cuda issue, from " + "; ".join(sources) + ":\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
