"""Optional PNG: speedup over eager, ratio to the copy roofline and peak memory, per workload.

Needs matplotlib (``pip install fused_ce[bench]``); without it :func:`plot`
returns None and the caller prints a note.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from .impls import COPY, EAGER
from .steps import FWD_BWD
from .runner import Result

# (title, value of a result, y-axis label, log scale, reference line, implementations left out)
PANELS = (
    ("speedup over eager", lambda r: r.speedup_vs_eager, "eager time / time", True, 1.0, (EAGER, COPY)),
    ("time / copy of the logits", lambda r: r.ratio_to_copy, "x copy (1 = roofline)", True, 1.0, (COPY,)),
    ("peak memory over the inputs", lambda r: None if r.peak_bytes is None else r.peak_bytes / r.workload.logits_bytes,
     "x logits size", False, None, (COPY,)),
)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: Sequence[Result], modes: Sequence[str], path: str, title: str = "") -> Optional[str]:
    """Draw one row of panels per mode; returns the path written, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return None

    workloads: List[str] = list(dict.fromkeys(r.workload.name for r in results))
    impls = [i for i in dict.fromkeys(r.impl for r in results) if any(r.impl == i and r.ok for r in results)]
    colors = {name: plt.get_cmap("tab10")(k % 10) for k, name in enumerate(impls)}

    # The headline mode first; panels widen with the number of workloads.
    modes = sorted(modes, key=lambda m: m != FWD_BWD)
    panel_width = max(5.0, 0.38 * len(workloads) + 1.5)
    fig, axes = plt.subplots(len(modes), len(PANELS), squeeze=False,
                             figsize=(panel_width * len(PANELS), 4.8 * len(modes) + 0.6))
    for row, mode in enumerate(modes):
        lookup = {(r.workload.name, r.impl): r for r in results if r.mode == mode and r.ok}
        for col, (panel_title, value, ylabel, log, ref, left_out) in enumerate(PANELS):
            ax = axes[row][col]
            series = {}
            for impl in impls:
                if impl in left_out:
                    continue
                points = [(j, value(lookup[(name, impl)])) for j, name in enumerate(workloads)
                          if (name, impl) in lookup]
                points = [(j, v) for j, v in points if v is not None and v > 0]
                if points:
                    series[impl] = points
            width = 0.8 / max(1, len(series))
            for k, (impl, points) in enumerate(series.items()):
                ax.bar([j - 0.4 + width * (k + 0.5) for j, _ in points], [v for _, v in points], width,
                       label=impl, color=colors[impl])
            if not series:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            elif log:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            if ref is not None and series:
                ax.axhline(ref, color="black", linewidth=0.8, linestyle="--")
            ax.set_xlim(-0.5, len(workloads) - 0.5)
            ax.set_xticks(range(len(workloads)))
            ax.set_xticklabels(workloads, rotation=60, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {panel_title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if series:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # leave room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
