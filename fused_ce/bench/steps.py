"""The three measured modes, as (untimed prep, timed step) pairs over rotating buffers.

* ``forward``: the loss of logits that do not require grad (evaluation).
* ``backward``: ``loss.backward()`` alone; the forward runs untimed in prep.
  Implementations split work differently between the two passes (fused_ce
  computes the gradient of a reduced loss inside the forward), so compare
  ``fwd+bwd`` across implementations.
* ``fwd+bwd``: the headline, a training step's loss: a fresh autograd graph
  per repetition, ``loss = fn(x, t); loss.backward()``.
* ``graphed`` (CUDA only, not run unless asked for): the ``fwd+bwd`` step
  captured once per buffer in a CUDA graph and replayed, as
  ``torch.compile(mode="reduce-overhead")`` or a hand-captured training step
  runs it. A replay launches every kernel of the step at once, so the time
  is the GPU's alone: where a step's kernels take less time than the host
  needs to issue them (a few MB of logits), ``fwd+bwd`` times the host and
  this mode times the kernels. An implementation that synchronises with the
  host (reads a number off the device) cannot be captured; it fails.

Prep drops the gradients of every buffer, so that, as in a training loop,
one logits gradient at a time is alive. Keeping the gradients of all the
rotating buffers (up to 32 of them for small workloads) made the allocator
return memory to the system and fault it in again on every step, which
doubled the time of small workloads for every implementation alike.

The copy roofline does ``out.copy_(x)`` in every mode.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .workloads import Inputs

FORWARD, BACKWARD, FWD_BWD, GRAPHED = "forward", "backward", "fwd+bwd", "graphed"
MODES = (FORWARD, BACKWARD, FWD_BWD, GRAPHED)
DEFAULT_MODES = (FORWARD, BACKWARD, FWD_BWD)  # what runs unless --modes asks for others
CUDA_ONLY_MODES = (GRAPHED,)

Step = Callable[[int], object]


def traffic_factor(mode: str, roofline: bool) -> int:
    """Minimum memory traffic in logits-sized units: read once, plus write the gradient once."""
    if roofline:
        return 2
    return 1 if mode == FORWARD else 2


def set_requires_grad(inputs: Inputs, mode: str) -> None:
    for x in inputs.logits:
        x.grad = None
        x.requires_grad_(mode != FORWARD)


def loss_steps(fn, mode: str, inputs: Inputs) -> Tuple[Optional[Step], Step]:
    """prep and step for a loss function ``fn(x, target)`` (buffers prepared by :func:`set_requires_grad`)."""
    xs, ts = inputs.logits, inputs.targets

    if mode == FORWARD:
        def step(i):
            with torch.no_grad():
                return fn(xs[i], ts[i])
        return None, step

    def drop_gradients():
        for x in xs:
            x.grad = None

    if mode in (FWD_BWD, GRAPHED):
        def prep(i):
            drop_gradients()

        def step(i):
            fn(xs[i], ts[i]).backward()
        return (prep, step) if mode == FWD_BWD else captured(prep, step, len(xs))

    if mode == BACKWARD:
        pending = {}

        def prep(i):
            drop_gradients()
            pending[i] = fn(xs[i], ts[i])

        def step(i):
            pending.pop(i).backward()
        return prep, step

    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def copy_steps(inputs: Inputs, mode: str = FWD_BWD) -> Tuple[Optional[Step], Step]:
    """The copy of the logits in ``mode``: the same work in every mode, captured in ``graphed``."""
    xs, out = inputs.logits, inputs.out

    def step(i):
        with torch.no_grad():
            out.copy_(xs[i])
    return captured(None, step, len(xs)) if mode == GRAPHED else (None, step)


def captured(prep: Optional[Step], step: Step, buffers: int) -> Tuple[None, Step]:
    """``step(i)`` captured in one CUDA graph per buffer (each after ``prep(i)``); the step
    returned replays buffer i's graph.

    PyTorch's recipe for capturing a whole training step: a few runs on a side
    stream first (lazy initialisation, autograd's gradient accumulation,
    compilation, none of which may happen during a capture), then the
    captures. The graphs share one memory pool: they replay one at a time and
    in the order they were captured (the buffers rotate), as sharing needs.
    What the step returns and the gradients it leaves are the graphs' own
    memory, overwritten by every replay; the benchmark reads neither.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for i in range(buffers):
                if prep is not None:
                    prep(i)
                step(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs, pool = [], None
    for i in range(buffers):
        if prep is not None:
            prep(i)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step(i)
        pool = graph.pool()
        graphs.append(graph)
    return None, lambda i: graphs[i].replay()


def make(fn, mode: str, inputs: Inputs, roofline: bool = False) -> Tuple[Optional[Step], Step]:
    """prep and step of ``mode`` for a loss ``fn`` (or for the copy when ``roofline``), buffers made ready."""
    set_requires_grad(inputs, mode)
    return copy_steps(inputs, mode) if roofline else loss_steps(fn, mode, inputs)
