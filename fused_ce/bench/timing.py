"""How time is measured: warm-up, many repetitions, robust statistics.

Each repetition has an untimed ``prep(i)`` (drop the previous gradient, or run
the forward pass when only the backward is timed) and a timed ``step(i)``,
where ``i`` selects the input buffer; buffers rotate so that consecutive
repetitions never find the logits in cache.

CPU: ``time.perf_counter`` around the step (CPU ops are synchronous).
CUDA: a pair of CUDA events around each step on the current stream, read
after one synchronisation at the end, so the host never stalls the GPU
between repetitions.

A reference step (the copy of the logits) can be timed *alongside*: one
repetition of it after each repetition of the step, on another buffer.
Both then sample the same seconds of a machine whose memory bandwidth
drifts (a shared VM's neighbours come and go), so their ratio is not
skewed by when each happened to be measured.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

Step = Callable[[int], object]
StepPair = Tuple[Optional[Step], Step]  # (untimed prep, timed step)


@dataclass
class Timing:
    """Per-repetition times of one measurement, in milliseconds."""

    samples_ms: List[float] = field(default_factory=list)
    warmup_ms: List[float] = field(default_factory=list)  # the first one includes compilation, if any
    alongside: Optional["Timing"] = None  # the reference step, timed in alternation with this one

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile, q in [0, 1]."""
        xs = sorted(self.samples_ms)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def p10(self) -> float:
        return self.quantile(0.10)

    @property
    def p90(self) -> float:
        return self.quantile(0.90)

    @property
    def minimum(self) -> float:
        return min(self.samples_ms)

    def summary(self) -> dict:
        return {
            "median_ms": self.median,
            "p10_ms": self.p10,
            "p90_ms": self.p90,
            "min_ms": self.minimum,
            "mean_ms": statistics.fmean(self.samples_ms),
            "reps": self.n,
            "warmup_ms": self.warmup_ms,
            "samples_ms": self.samples_ms,
            "alongside": self.alongside.summary() if self.alongside else None,
        }


class _CpuClock:
    def __init__(self):
        self._pending = []

    def time(self, step: Step, i: int) -> None:
        start = time.perf_counter()
        step(i)
        self._pending.append((time.perf_counter() - start) * 1e3)

    def collect(self) -> List[float]:
        out, self._pending = self._pending, []
        return out


class _CudaClock:
    def __init__(self):
        self._pending = []

    def time(self, step: Step, i: int) -> None:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step(i)
        end.record()
        self._pending.append((start, end))

    def collect(self) -> List[float]:
        torch.cuda.synchronize()
        out = [s.elapsed_time(e) for s, e in self._pending]
        self._pending = []
        return out


def measure(step: Step, prep: Optional[Step], *, buffers: int, device: str, warmup: int,
            repeat: int, max_time: float = 0.0, min_repeat: int = 5,
            alongside: Optional[StepPair] = None) -> Timing:
    """Time ``step`` over rotating buffers.

    ``warmup`` untimed-for-statistics repetitions come first (their times are
    kept apart: the first one includes any compilation). Then up to
    ``repeat`` timed repetitions; when ``max_time`` (seconds) is positive the
    count is cut so the measurement takes about that long, but never below
    ``min(min_repeat, repeat)``. With ``alongside`` (prep, step), that step
    runs after every repetition, on the buffer half the rotation away (so
    neither finds the other's data in cache), and its times come back as
    ``Timing.alongside``; ``max_time`` then covers both. Exceptions from
    either step propagate.
    """
    new_clock = _CudaClock if device == "cuda" else _CpuClock
    clock = new_clock()
    timing = Timing()
    reference = Timing() if alongside else None
    reference_clock = new_clock() if alongside else None
    counter = 0

    def one() -> None:
        nonlocal counter
        i = counter % buffers
        counter += 1
        if prep is not None:
            prep(i)
        clock.time(step, i)
        if alongside:
            reference_prep, reference_step = alongside
            j = (i + buffers // 2) % buffers
            if reference_prep is not None:
                reference_prep(j)
            reference_clock.time(reference_step, j)

    # Warm-up repetitions, synchronised one by one so that the first (compiling) one is visible.
    for _ in range(max(1, warmup)):
        one()
        timing.warmup_ms.extend(clock.collect())
        if reference:
            reference.warmup_ms.extend(reference_clock.collect())

    reps = repeat
    if max_time > 0:
        def steady(t: Timing) -> float:
            return min(t.warmup_ms[1:] or t.warmup_ms)

        per_rep_ms = steady(timing) + (steady(reference) if reference else 0.0)
        estimate_s = max(1e-6, per_rep_ms / 1e3)
        reps = max(min(min_repeat, repeat), min(repeat, int(max_time / estimate_s)))

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a repetition is noise, not cost
    try:
        for _ in range(reps):
            one()
        timing.samples_ms = clock.collect()
        if reference:
            reference.samples_ms = reference_clock.collect()
            timing.alongside = reference
    finally:
        if gc_was_enabled:
            gc.enable()
    return timing
