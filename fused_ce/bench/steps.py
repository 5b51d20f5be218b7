"""The three measured modes, as (untimed prep, timed step) pairs over rotating buffers.

* ``forward``: the loss of logits that do not require grad (evaluation).
* ``backward``: ``loss.backward()`` alone; the forward runs untimed in prep.
  Implementations split work differently between the two passes (fused_ce
  computes the gradient of a reduced loss inside the forward), so compare
  ``fwd+bwd`` across implementations.
* ``fwd+bwd``: the headline, a training step's loss: a fresh autograd graph
  per repetition, ``loss = fn(x, t); loss.backward()``.

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

FORWARD, BACKWARD, FWD_BWD = "forward", "backward", "fwd+bwd"
MODES = (FORWARD, BACKWARD, FWD_BWD)

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

    if mode == FWD_BWD:
        def prep(i):
            drop_gradients()

        def step(i):
            fn(xs[i], ts[i]).backward()
        return prep, step

    if mode == BACKWARD:
        pending = {}

        def prep(i):
            drop_gradients()
            pending[i] = fn(xs[i], ts[i])

        def step(i):
            pending.pop(i).backward()
        return prep, step

    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def copy_steps(inputs: Inputs) -> Tuple[Optional[Step], Step]:
    xs, out = inputs.logits, inputs.out

    def step(i):
        with torch.no_grad():
            out.copy_(xs[i])
    return None, step


def make(fn, mode: str, inputs: Inputs, roofline: bool = False) -> Tuple[Optional[Step], Step]:
    """prep and step of ``mode`` for a loss ``fn`` (or for the copy when ``roofline``), buffers made ready."""
    set_requires_grad(inputs, mode)
    return copy_steps(inputs) if roofline else loss_steps(fn, mode, inputs)
