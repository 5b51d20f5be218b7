"""How time is measured: warm-up, many repetitions, robust statistics.

Each repetition has an untimed ``prep(i)`` (drop the previous gradient, or run
the forward pass when only the backward is timed) and a timed ``step(i)``,
where ``i`` selects the input buffer; buffers rotate so that consecutive
repetitions never find the logits in cache.

CPU: ``time.perf_counter`` around the step (CPU ops are synchronous).
CUDA: a pair of CUDA events around each step on the current stream, read
after one synchronisation at the end, so the host never stalls the GPU
between repetitions.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

Step = Callable[[int], object]


@dataclass
class Timing:
    """Per-repetition times of one measurement, in milliseconds."""

    samples_ms: List[float] = field(default_factory=list)
    warmup_ms: List[float] = field(default_factory=list)  # the first one includes compilation, if any

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
            repeat: int, max_time: float = 0.0, min_repeat: int = 5) -> Timing:
    """Time ``step`` over rotating buffers.

    ``warmup`` untimed-for-statistics repetitions come first (their times are
    kept apart: the first one includes any compilation). Then up to
    ``repeat`` timed repetitions; when ``max_time`` (seconds) is positive the
    count is cut so the measurement takes about that long, but never below
    ``min(min_repeat, repeat)``. Exceptions from the step propagate.
    """
    clock = _CudaClock() if device == "cuda" else _CpuClock()
    timing = Timing()
    counter = 0

    def one(clk) -> None:
        nonlocal counter
        i = counter % buffers
        counter += 1
        if prep is not None:
            prep(i)
        clk.time(step, i)

    # Warm-up repetitions, synchronised one by one so that the first (compiling) one is visible.
    for _ in range(max(1, warmup)):
        one(clock)
        timing.warmup_ms.extend(clock.collect())

    reps = repeat
    if max_time > 0:
        steady = timing.warmup_ms[1:] or timing.warmup_ms
        estimate_s = max(1e-6, min(steady) / 1e3)
        reps = max(min(min_repeat, repeat), min(repeat, int(max_time / estimate_s)))

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a repetition is noise, not cost
    try:
        for _ in range(reps):
            one(clock)
        timing.samples_ms = clock.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return timing
