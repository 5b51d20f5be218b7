"""The fixed cost of one call: forward, backward and a training step on tiny logits.

With 4 x 10 logits the kernels take well under a microsecond, so what is
measured is everything around them: argument checks, autograd nodes, the
dispatcher, allocation. It bounds how small a batch can be before fused_ce
stops paying off, and on a GPU it is what the host spends per step. Each
path is timed inside one training-step loop (x.grad dropped, loss, backward);
its forward and backward calls are reported apart, and the wall time per
step, best of several rounds:

    python benchmarks/per_call_cost.py [--device cuda] [--rows 4] [--classes 10] [--reduction none]

With ``--reduction none`` each path's per-element loss is multiplied by a
fixed random mask and summed before the backward (a masked language-model
step); the forward column then includes that product and sum, the same for
every path.

Paths: eager ``F.cross_entropy``; ``fused_ce.cross_entropy`` (a plain
call: straight to a C++ autograd node); the same with every argument check
run first (the plain-call shortcut switched off, as for any other call, so
the two lines give what the shortcut saves, measured in one process);
``CrossEntropyFunction.apply`` (the Python autograd.Function that the
remaining cases take).
"""

import argparse
import contextlib
import platform
import time

import torch
import torch.nn.functional as F

import fused_ce
from fused_ce import functional


@contextlib.contextmanager
def _every_check():
    """cross_entropy without its plain-call shortcut: every call runs the argument checks."""
    shortcut = functional._plain_call
    functional._plain_call = lambda *args: None
    try:
        yield
    finally:
        functional._plain_call = shortcut


def _step_times(loss_fn, x, target, steps):
    """Mean microseconds per training step over ``steps`` steps: the host's time in the
    forward call and in the backward call, and the wall time of the whole round.

    On a GPU the calls return once their kernels are queued, so forward and backward are the
    host's cost, and the wall time (synchronised once, at the end) is what a training loop
    sees: the larger of the host's and the GPU's time per step.
    """
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    forward = backward = 0
    clock = time.perf_counter_ns
    sync()
    round_start = clock()
    for _ in range(steps):
        x.grad = None
        start = clock()
        loss = loss_fn(x, target)
        middle = clock()
        loss.backward()
        forward += middle - start
        backward += clock() - middle
    sync()
    wall = clock() - round_start
    return forward / steps / 1e3, backward / steps / 1e3, wall / steps / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"])
    parser.add_argument("--steps", type=int, default=5000, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="the best round is reported")
    args = parser.parse_args()

    x = torch.randn(args.rows, args.classes, device=args.device, requires_grad=True)
    target = torch.randint(0, args.classes, (args.rows,), device=args.device)
    reduction = args.reduction
    code = {"none": 0, "mean": 1, "sum": 2}[reduction]
    mask = torch.rand(args.rows, device=args.device)

    def step_loss(loss_fn):
        """The loss a step backpropagates: per-element losses masked and summed."""
        if reduction != "none":
            return lambda a, b: loss_fn(a, b, reduction=reduction)
        return lambda a, b: (loss_fn(a, b, reduction=reduction) * mask).sum()

    def function_apply(a, b, reduction):
        return fused_ce.CrossEntropyFunction.apply(a, b, None, -100, 0.0, code)

    # name: (loss function, the context it is timed in)
    paths = {
        "eager F.cross_entropy": (step_loss(F.cross_entropy), contextlib.nullcontext()),
        "fused_ce.cross_entropy": (step_loss(fused_ce.cross_entropy), contextlib.nullcontext()),
        "  with every check": (step_loss(fused_ce.cross_entropy), _every_check()),
        "CrossEntropyFunction.apply": (step_loss(function_apply), contextlib.nullcontext()),
    }
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, logits {args.rows}x{args.classes} fp32, "
          f"reduction {reduction}{' (masked sum)' if reduction == 'none' else ''}")
    print(f"{'path':28s} {'forward us':>10s} {'backward us':>11s} {'step us':>8s} {'wall us':>8s}")
    for name, (loss_fn, context) in paths.items():
        with context:
            _step_times(loss_fn, x, target, 200)  # warm-up
            rounds = [_step_times(loss_fn, x, target, args.steps) for _ in range(args.rounds)]
        forward, backward, wall = min(rounds, key=lambda r: r[2])
        print(f"{name:28s} {forward:10.1f} {backward:11.1f} {forward + backward:8.1f} {wall:8.1f}")


if __name__ == "__main__":
    main()
