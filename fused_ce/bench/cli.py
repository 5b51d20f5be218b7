"""The command line: ``python -m fused_ce.bench [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import environment, plot, report, runner, steps, workloads
from .impls import COMPILE, Impl, all_impls

EPILOG = """\
examples:
  python -m fused_ce.bench --quick                     # a couple of minutes on a laptop CPU
  python -m fused_ce.bench                             # full CPU suite
  python -m fused_ce.bench --device cuda               # full GPU suite (real LM sizes)
  python -m fused_ce.bench --filter lm-32k --modes fwd+bwd
  python -m fused_ce.bench --device cuda --filter cls --modes fwd+bwd,graphed  # kernels without the host
  python -m fused_ce.bench --filter linear --no-compile  # LM head: fused_ce.linear_cross_entropy vs
                                                       # F.linear + F.cross_entropy vs torch's chunked one
  python -m fused_ce.bench --shapes 4096x32000:bf16,8x21x128x128 --label-smoothing 0.1
  python -m fused_ce.bench --list                      # show the workloads and exit

Outputs go to --out: results.json (everything, with metadata), results.md,
table.txt and results.png (when matplotlib is installed). See
benchmarks/README.md for how to read the numbers.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_ce.bench",
        description="Benchmark fused_ce.cross_entropy against eager F.cross_entropy, torch.compile, "
                    "the copy of the logits (the roofline) and installed peers; on the LM-head workloads "
                    "(linear-*), fused_ce.linear_cross_entropy against F.linear + F.cross_entropy, its "
                    "torch.compile and torch's chunked F.linear_cross_entropy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    g = p.add_argument_group("what to run")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where to run (default: cpu; auto = cuda when available)")
    g.add_argument("--quick", action="store_true",
                   help="small suite, fewer repetitions, no torch.compile and no memory probes unless asked")
    g.add_argument("--filter", action="append", default=[], metavar="PATTERN",
                   help="keep workloads whose name contains PATTERN or matches it as a glob "
                        "(repeatable, or comma-separated)")
    g.add_argument("--shapes", metavar="SPEC",
                   help="custom workloads instead of the suite: comma-separated NxC[xHxW...][:dtype], "
                        "e.g. 4096x32000:bf16,8x21x128x128")
    g.add_argument("--dtype", default="fp32", choices=sorted(workloads.DTYPES),
                   help="dtype of --shapes items without one (default: fp32)")
    g.add_argument("--modes", default=",".join(steps.DEFAULT_MODES), metavar="LIST",
                   help=f"comma-separated subset of {','.join(steps.MODES)} (default: "
                        f"{','.join(steps.DEFAULT_MODES)}; {','.join(steps.CUDA_ONLY_MODES)}: the "
                        "fwd+bwd step replayed from a CUDA graph, CUDA only)")
    g.add_argument("--impls", metavar="LIST",
                   help="comma-separated implementations to run (default: all of "
                        f"{','.join(i.name for i in all_impls())})")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile(F.cross_entropy) (default: yes, except with --quick)")
    g.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory (CPU: one child process per probe; "
                        "default: yes, except with --quick on the CPU)")
    g.add_argument("--list", action="store_true", help="print the selected workloads and exit")

    g = p.add_argument_group("loss options applied to every workload (mostly with --shapes)")
    g.add_argument("--label-smoothing", type=float, metavar="EPS")
    g.add_argument("--ignore-fraction", type=float, metavar="F",
                   help="fraction of targets set to ignore_index (-100)")
    g.add_argument("--weight", action="store_true", help="random per-class weights")
    g.add_argument("--reduction", choices=("mean", "sum"), help="default: mean")
    g.add_argument("--class-last", action="store_true",
                   help="logits of 3 or more dimensions stored class axis last and passed as a view, "
                        "as F.cross_entropy(logits.transpose(1, 2), target) of (B, T, V) logits")

    g = p.add_argument_group("measurement")
    g.add_argument("--repeat", type=int, metavar="N",
                   help="maximum timed repetitions per measurement (default: 20, quick: 10)")
    g.add_argument("--warmup", type=int, metavar="N", help="warm-up repetitions (default: 3, quick: 2)")
    g.add_argument("--max-time", type=float, metavar="S",
                   help="cap a measurement near S seconds by cutting repetitions, never below 5 "
                        "(default: 5, quick: 1.5; 0 = always --repeat)")
    g.add_argument("--copy-alongside", action=argparse.BooleanOptionalAction, default=True,
                   help="time the copy of the logits after every repetition of each implementation, "
                        "and take its ratio to the copy from those (default: on; off: against the "
                        "copy's own measurement, minutes apart on a drifting machine)")
    g.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("benchmarks", "results", "latest"), metavar="DIR",
                   help="output directory (default: benchmarks/results/latest)")
    g.add_argument("--no-plot", action="store_true", help="do not draw results.png")
    g.add_argument("--render", metavar="DIR",
                   help="do not run anything: rewrite the table, Markdown and plot of DIR/results.json "
                        "(e.g. to draw the plot of a run made where matplotlib was missing)")
    g.add_argument("--strict", action="store_true",
                   help="exit with status 3 when any implementation disagrees with eager")
    return p


def _split(values: List[str]) -> List[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return choice


def select_workloads(args, device: str) -> List[workloads.Workload]:
    if args.shapes:
        chosen = workloads.parse_shapes(args.shapes, args.dtype)
    else:
        chosen = workloads.suite(device, args.quick)
    if (any(v is not None for v in (args.label_smoothing, args.ignore_fraction, args.reduction)) or args.weight
            or args.class_last):
        chosen = workloads.with_options(chosen, args.label_smoothing, args.ignore_fraction, args.weight,
                                        args.reduction, args.class_last)
    return workloads.select(chosen, _split(args.filter))


def select_impls(args, use_compile: bool) -> List[Impl]:
    impls = all_impls()
    if args.impls:
        wanted = _split([args.impls])
        unknown = set(wanted) - {i.name for i in impls}
        if unknown:
            parser().error(f"unknown implementation(s) {sorted(unknown)}; "
                           f"choose from {', '.join(i.name for i in impls)}")
        impls = [i for i in impls if i.name in wanted]
    return [i for i in impls if use_compile or i.name != COMPILE]


def select_modes(args, device: str) -> List[str]:
    requested = _split([args.modes])
    unknown = [m for m in requested if m not in steps.MODES]
    if unknown or not requested:
        parser().error(f"unknown mode(s) {unknown}; choose from {','.join(steps.MODES)}")
    cuda_only = [m for m in requested if m in steps.CUDA_ONLY_MODES]
    if cuda_only and device != "cuda":
        parser().error(f"mode(s) {','.join(cuda_only)} need --device cuda (CUDA graphs)")
    return [m for m in steps.MODES if m in requested]


def build_config(args, device: str, modes: List[str]) -> runner.Config:
    """Explicit options win; otherwise --quick picks smaller defaults."""
    def pick(value, quick, full):
        return value if value is not None else (quick if args.quick else full)

    return runner.Config(
        device=device,
        modes=modes,
        warmup=pick(args.warmup, 2, 3),
        repeat=pick(args.repeat, 10, 20),
        max_time=pick(args.max_time, 1.5, 5.0),
        # CPU probes cost a child process each; CUDA probes are nearly free.
        memory=pick(args.memory, device == "cuda", True),
        seed=args.seed,
        copy_alongside=args.copy_alongside,
    )


def run_notes(args, config: runner.Config, use_compile: bool, meta: dict) -> List[str]:
    notes = []
    if not use_compile:
        why = "--quick" if args.compile is None else "--no-compile"
        notes.append(f"torch.compile not run ({why}; pass --compile to include it)")
    if not config.memory:
        notes.append("memory not measured (pass --memory to include it)")
    if not config.copy_alongside:
        notes.append("x copy is against the copy's own measurement (--no-copy-alongside)")
    busy = environment.busy_warning(meta)
    if busy:
        notes.append(busy)
    return notes


def write_plot(results, modes, meta, out_dir: str) -> Optional[str]:
    if plot.available():
        return plot.plot(results, modes, os.path.join(out_dir, "results.png"), environment.describe(meta))
    print("note: matplotlib is not installed, so no plot "
          "(pip install matplotlib, or the fused_ce[bench] extra)", file=sys.stderr)
    return None


def render(args) -> int:
    results, meta, config = report.load(os.path.join(args.render, "results.json"))
    modes = config["modes"]
    print(report.terminal(results, meta))
    paths = report.write(args.render, results, meta, config, modes)
    if not args.no_plot and write_plot(results, modes, meta, args.render):
        paths["plot"] = os.path.join(args.render, "results.png")
    print(f"\nwrote {', '.join(paths.values())}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.render:
        return render(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        chosen = select_workloads(args, device)
    except ValueError as exc:
        parser().error(str(exc))
    if not chosen:
        parser().error("no workload left after --filter/--shapes")
    if args.list:
        for w in chosen:
            print(f"{w.name:28s} {w.shape_str:>18s} {w.dtype:5s} {w.logits_bytes / 1e6:9.1f} MB  {w.options_str}")
        return 0

    modes = select_modes(args, device)
    use_compile = args.compile if args.compile is not None else not args.quick
    impls = select_impls(args, use_compile)
    config = build_config(args, device, modes)

    meta = environment.collect(device)
    meta["notes"] = run_notes(args, config, use_compile, meta)
    print(environment.describe(meta), file=sys.stderr)
    for note in meta["notes"]:
        print("note: " + note, file=sys.stderr)
    config_dict = {**vars(config), "modes": modes, "impls": [i.name for i in impls],
                   "compile": use_compile, "quick": args.quick}

    total = len(chosen) * len(impls) * len(modes)
    start = time.perf_counter()

    def save(done: List[runner.Result]) -> Dict[str, str]:
        # Called after every workload: a crash or Ctrl-C late in a long run keeps what was measured.
        meta["wall_time_s"] = round(time.perf_counter() - start, 1)
        meta["complete"] = len(done) == total
        return report.write(args.out, done, meta, config_dict, modes)

    results = runner.run(chosen, impls, config, runner.Progress(total), on_workload=save)
    paths = save(results)
    print()
    print(report.terminal(results, meta))

    if not args.no_plot:
        png = write_plot(results, modes, meta, args.out)
        if png:
            paths["plot"] = png
    print(f"\nwrote {', '.join(paths.values())} (run took {meta['wall_time_s']:.0f} s)")

    if args.strict and report.parity_failures(results):
        return 3
    return 0
