"""How results are shown: terminal table, Markdown, JSON, and the headline summary."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from .environment import describe
from .impls import COMPILE, COPY, EAGER, FUSED
from .runner import Result
from .steps import BACKWARD, FWD_BWD, GRAPHED

COLUMNS = ("mode", "impl", "median ms", "p10-p90 ms", "GB/s", "x copy", "vs eager", "peak MB", "x logits",
           "parity (loss/grad diff)")


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) + suffix


def _ms(value: float) -> str:
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def _parity_text(r: Result) -> str:
    if r.impl == COPY:
        return "(roofline)"
    if r.impl == EAGER:
        return "(reference)"
    p = r.parity
    if not p:
        return "-"
    if p.get("error"):
        return f"ERROR {p['error']}"
    if not p.get("reference_finite", True):
        return "n/a: eager's loss is not finite"
    verdict = "ok" if p["ok"] else "MISMATCH"
    return f"{verdict} {p['loss_max_abs_diff']:.1e}/{p['grad_max_abs_diff']:.1e}"


def _cells(r: Result) -> List[str]:
    """One row of figures, or (mode, impl, status) for a result without a time."""
    if not r.ok:
        return [r.mode, r.impl, r.status]
    t = r.timing
    peak = r.peak_bytes
    if r.memory and r.memory.get("error"):
        peak_text, ratio_text = "error", "-"
    else:
        peak_text = _fmt(None if peak is None else peak / 1e6, ".1f")
        ratio_text = _fmt(None if peak is None else peak / r.workload.logits_bytes, ".2f")
    return [
        r.mode,
        r.impl,
        _ms(t["median_ms"]),
        f"{_ms(t['p10_ms'])}-{_ms(t['p90_ms'])}",
        _fmt(r.gbps, ".1f"),
        _fmt(r.ratio_to_copy, ".2f"),
        _fmt(r.speedup_vs_eager, ".2f", "x"),
        peak_text,
        ratio_text,
        _parity_text(r),
    ]


def _grouped(results: Sequence[Result]) -> "OrderedDict[str, List[Result]]":
    groups: "OrderedDict[str, List[Result]]" = OrderedDict()
    for r in results:
        groups.setdefault(r.workload.name, []).append(r)
    return groups


def _text_table(header: Sequence[str], rows: List[List[str]], indent: str = "  ") -> str:
    """Aligned columns; a short row (mode, impl, status) lets its status run across the figures."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(c) for c in column) for column in zip(header, *full)]
    numeric = range(2, len(header) - 1)

    def line(cells: Sequence[str]) -> str:
        if len(cells) < len(header):
            cells = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])] + list(cells[2:])
        else:
            cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(cells)).rstrip()

    return "\n".join(line(r) for r in [list(header)] + rows)


def _not_run(group: Sequence[Result]) -> Tuple[List[Result], str]:
    """Split a workload's results into rows to show and a one-line list of what did not run.

    An implementation that has the same non-failure status in every mode
    (not installed, GPU only, unsupported option) is listed once instead of
    once per mode; failures stay as rows.
    """
    statuses: "OrderedDict[str, set]" = OrderedDict()
    for r in group:
        statuses.setdefault(r.impl, set()).add(None if r.ok or r.status.startswith("failed") else r.status)
    skipped = {impl: s.pop() for impl, s in statuses.items() if len(s) == 1 and None not in s}
    rows = [r for r in group if r.impl not in skipped]
    text = ", ".join(f"{impl} ({status})" for impl, status in skipped.items())
    return rows, text


def terminal(results: Sequence[Result], meta: dict) -> str:
    parts = [describe(meta)] + [f"note: {n}" for n in meta.get("notes", [])] + [""]
    for name, group in _grouped(results).items():
        w = group[0].workload
        parts.append(f"{name}  logits {w.shape_str} {w.dtype} ({w.logits_bytes / 1e6:.1f} MB)  "
                     f"options: {w.options_str}")
        shown, not_run = _not_run(group)
        parts.append(_text_table(COLUMNS, [_cells(r) for r in shown]))
        if not_run:
            parts.append(f"  not run: {not_run}")
        parts.append("")
    parts.append(summary(results))
    return "\n".join(parts)


# --------------------------------------------------------------------------- summary


def _geomean(values: List[float]) -> Optional[float]:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _headline(results: Sequence[Result], mode: str, title: str) -> List[str]:
    """fused_ce's geometric means in ``mode`` against the copy, eager and torch.compile."""
    head = [r for r in results if r.impl == FUSED and r.mode == mode and r.ok]
    if not head:
        return []
    compiled = {r.workload.name: r for r in results if r.impl == COMPILE and r.mode == mode and r.ok}
    vs_compile = [compiled[r.workload.name].median_ms / r.median_ms for r in head if r.workload.name in compiled]
    gm_copy = _geomean([r.ratio_to_copy for r in head])
    gm_eager = _geomean([r.speedup_vs_eager for r in head])
    gm_compile = _geomean(vs_compile)
    worst = max(head, key=lambda r: r.ratio_to_copy or 0)
    return [f"{title}, fused_ce over all workloads:",
            f"  geometric mean: {_fmt(gm_copy, '.2f')}x the time of the copy roofline, "
            f"speedup {_fmt(gm_eager, '.2f')}x over eager"
            + (f", {_fmt(gm_compile, '.2f')}x over torch.compile" if gm_compile else ""),
            f"  furthest from the roofline: {worst.workload.name} at {_fmt(worst.ratio_to_copy, '.2f')}x copy"]


def summary(results: Sequence[Result]) -> str:
    """The headline: fused_ce in fwd+bwd (and replayed from CUDA graphs, where that was run)
    against the copy and the alternatives, and any parity problem."""
    lines = (_headline(results, FWD_BWD, "Headline (fwd+bwd, reduction=mean)")
             or ["No fused_ce fwd+bwd result (not importable, failed, or not selected)."])
    lines += _headline(results, GRAPHED, "The same step replayed from CUDA graphs (graphed: the kernels "
                                         "without the host's launch costs)")

    problems = []
    seen = set()
    for r in results:
        key = (r.workload.name, r.impl)
        if r.parity and not r.parity["ok"] and key not in seen:
            seen.add(key)
            p = r.parity
            if not p.get("reference_finite", True):
                problems.append(f"  no parity reference for {r.impl} on {r.workload.name}: eager's loss is "
                                f"not finite, {r.impl}'s is")
                continue
            detail = p.get("error") or (f"loss diff {p['loss_max_abs_diff']:.3g}, "
                                        f"grad diff {p['grad_max_abs_diff']:.3g}")
            problems.append(f"  PARITY MISMATCH {r.impl} on {r.workload.name}: {detail}")
        if r.status.startswith("failed") and (r.workload.name, r.impl, "failed") not in seen:
            seen.add((r.workload.name, r.impl, "failed"))
            problems.append(f"  FAILED {r.impl} on {r.workload.name} ({r.mode}): {r.status[8:]}")
    lines.extend(problems or ["  parity: every timed implementation matches eager within tolerance"])
    if any(r.mode == BACKWARD and r.ok for r in results):
        lines.append("  note: 'backward' alone is not comparable across implementations (fused_ce computes "
                     "the gradient of a reduced loss inside the forward); compare fwd+bwd.")
    return "\n".join(lines)


def parity_failures(results: Sequence[Result]) -> int:
    return len({(r.workload.name, r.impl) for r in results
                if r.parity and not r.parity["ok"] and r.parity.get("reference_finite", True)})


# --------------------------------------------------------------------------- Markdown


def _md_table(header: Sequence[str], rows: List[List[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(results: Sequence[Result], meta: dict, modes: Sequence[str]) -> str:
    m = meta["machine"]
    fused = meta["fused_ce"]
    parts = [
        "# fused_ce benchmark",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gb']} GB, {m['platform']}",
        f"- torch {meta['torch']} (CPU capability {m['torch_cpu_capability']}), python {meta['python']}",
        f"- fused_ce {fused.get('version')}, cpu_capability {fused.get('cpu_capability', fused.get('error', '?'))}"
        + (f", commit {meta['git_commit']}" if meta.get("git_commit") else ""),
    ]
    if "cuda" in meta:
        c = meta["cuda"]
        parts.append(f"- GPU: {c['gpu']} (sm {c['capability']}, {c['memory_gb']} GB), CUDA {c['torch_cuda']}")
    parts += [f"- note: {n}" for n in meta.get("notes", [])]
    if meta.get("complete") is False:
        parts.append("- **partial results**: written while the run was still going (or after it stopped)")
    alongside = any(r.timing and r.timing.get("alongside") for r in results)
    copy_basis = ("timed in alternation with each implementation, one repetition after each of its own"
                  if alongside else "its own measurement")
    parts += ["", "Times are medians (p10-p90 in brackets) of warm repetitions; `x copy` is time / time of "
              f"`out.copy_(logits)` ({copy_basis}; the roofline, 1.00 is ideal), `vs eager` is the speedup "
              "over eager `F.cross_entropy`; peak memory is over the inputs (see benchmarks/README.md).", ""]

    groups = _grouped(results)
    header = ["workload", "impl", "median ms (p10-p90)"] + list(COLUMNS[4:])
    parts += ["## Workloads", ""]
    parts.append(_md_table(["workload", "logits", "dtype", "MB", "options"], [
        [name, g[0].workload.shape_str, g[0].workload.dtype, f"{g[0].workload.logits_bytes / 1e6:.1f}",
         g[0].workload.options_str] for name, g in groups.items()]))
    parts.append("")

    for mode in modes:
        title = f"## {mode}" + (" (headline)" if mode == FWD_BWD else "")
        rows, not_run = [], []
        for name, group in groups.items():
            shown, skipped = _not_run([r for r in group if r.mode == mode])
            if skipped:
                not_run.append(f"{name}: {skipped}")
            for r in shown:
                cells = _cells(r)
                if r.ok:
                    rows.append([name, r.impl, f"{cells[2]} ({cells[3]})"] + cells[4:])
                else:
                    rows.append([name, r.impl, r.status] + [""] * (len(header) - 3))
        parts += [title, "", _md_table(header, rows), ""]
        if not_run:
            parts += ["Not run: " + "; ".join(_dedupe_not_run(not_run)), ""]
    parts += ["## Summary", "", "```", summary(results), "```", ""]
    return "\n".join(parts)


def _dedupe_not_run(entries: List[str]) -> List[str]:
    """'w1: liger (GPU only)', 'w2: liger (GPU only)' -> 'liger (GPU only)' when every workload says the same."""
    reasons = {e.split(": ", 1)[1] for e in entries}
    return [reasons.pop() + " on every workload"] if len(reasons) == 1 else entries


# --------------------------------------------------------------------------- JSON and files


def to_json(results: Sequence[Result], meta: dict, config: dict) -> dict:
    return {"metadata": meta, "config": config, "results": [r.as_dict() for r in results]}


def load(path: str):
    """(results, metadata, config) from a results.json written by :func:`write`."""
    with open(path) as f:
        data = json.load(f)
    return [Result.from_dict(d) for d in data["results"]], data["metadata"], data["config"]


def write(out_dir: str, results: Sequence[Result], meta: dict, config: dict, modes: Sequence[str]) -> Dict[str, str]:
    """Write results.json, results.md and table.txt into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "markdown": os.path.join(out_dir, "results.md"),
        "table": os.path.join(out_dir, "table.txt"),
    }
    with open(paths["json"], "w") as f:
        json.dump(to_json(results, meta, config), f, indent=1, allow_nan=True)
        f.write("\n")
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results, meta, modes))
    with open(paths["table"], "w") as f:
        f.write(terminal(results, meta) + "\n")
    return paths
