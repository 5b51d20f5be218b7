"""Which kernels a training step launches, and how long each runs on the device.

For steps bound by launches rather than bytes (65536 x 10 logits: a few MB, a
handful of kernels of a few microseconds each), the benchmark's time of a step
replayed from a CUDA graph is the sum of its kernels' times and the gaps between
them. This lists, per implementation, every kernel of a forward + backward
step with its mean device time (torch.profiler's CUDA activity), so that the
cost can be put on the right kernel before changing any:

    python benchmarks/step_kernels.py [--rows 65536] [--classes 10] [--dtype float32] [--steps 50]

Implementations: fused_ce, eager ``F.cross_entropy`` and, unless
``--no-compile``, ``torch.compile(F.cross_entropy)``. CUDA only.
"""

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fused_ce


def _kernel_times(loss_fn, x, target, steps):
    """[(kernel name, launches per step, mean microseconds per launch)] over ``steps`` steps,
    in the order of their first launch, after three warm-up steps."""

    def step():
        x.grad = None
        loss_fn(x, target).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals, counts, order = defaultdict(float), defaultdict(int), []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if event.name not in totals:
            order.append(event.name)
        totals[event.name] += event.device_time_total
        counts[event.name] += 1
    return [(name, counts[name] / steps, totals[name] / counts[name]) for name in order]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile(F.cross_entropy)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_kernels.py times CUDA kernels: no CUDA device here")

    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.rows, args.classes, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, args.classes, (args.rows,), device="cuda")
    impls = {"fused_ce": fused_ce.cross_entropy, "eager": F.cross_entropy}
    if not args.no_compile:
        impls["compile"] = torch.compile(F.cross_entropy)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  logits {args.rows} x {args.classes} "
          f"{args.dtype}, forward + backward, reduction='mean', {args.steps} steps")
    for label, loss_fn in impls.items():
        kernels = _kernel_times(loss_fn, x, target, args.steps)
        total = sum(per_step * us for _, per_step, us in kernels)
        print(f"\n{label}: {sum(per_step for _, per_step, _ in kernels):.0f} launches, "
              f"{total:.1f} us of kernels per step")
        for name, per_step, us in kernels:
            print(f"  {per_step:4.1f} x {us:7.2f} us  {name[:110]}")


if __name__ == "__main__":
    main()
