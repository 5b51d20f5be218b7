"""Runs the comparison: for each workload, parity first, then every implementation in every mode.

The result of one (workload, mode, implementation) is a :class:`Result`;
derived figures (bandwidth, ratio to the copy, speedup over eager) are
filled in once all implementations of a (workload, mode) are done.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from . import memory, parity, steps
from .impls import COPY, EAGER, Eager, Impl
from .timing import measure
from .workloads import Workload, buffer_count, make_inputs


@dataclass
class Config:
    device: str = "cpu"
    modes: Sequence[str] = steps.DEFAULT_MODES
    warmup: int = 3
    repeat: int = 20
    max_time: float = 5.0  # seconds per measurement; 0 = always `repeat` repetitions
    memory: bool = True
    seed: int = 0
    # Time the copy in alternation with every implementation, for its ratio to the copy (timing.measure).
    copy_alongside: bool = True


@dataclass
class Result:
    workload: Workload
    mode: str
    impl: str
    status: str = "ok"  # "ok", or why there is no time: "not installed", "failed: ...", ...
    timing: Optional[dict] = None
    buffers: int = 0
    memory: Optional[dict] = None
    parity: Optional[dict] = None
    # derived
    gbps: Optional[float] = None
    ratio_to_copy: Optional[float] = None
    speedup_vs_eager: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing["median_ms"] if self.timing else None

    @property
    def peak_bytes(self) -> Optional[int]:
        return self.memory.get("peak_bytes") if self.memory else None

    def as_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "workload"}
        w = self.workload
        d["workload"] = {**dataclasses.asdict(w), "shape": list(w.shape), "logits_bytes": w.logits_bytes,
                         "options": w.options_str}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        """Inverse of :meth:`as_dict` (to re-render a saved results.json)."""
        names = {f.name for f in dataclasses.fields(Workload)}
        w = {k: v for k, v in d["workload"].items() if k in names}
        workload = Workload(**{**w, "shape": tuple(w["shape"])})
        fields = {f.name for f in dataclasses.fields(cls)} - {"workload"}
        return cls(workload=workload, **{k: v for k, v in d.items() if k in fields})


class Progress:
    """One line per event on stderr, with elapsed time."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:7.1f}s {self.done:>3}/{self.total}] {message}", file=self.stream, flush=True)

    def step(self, message: str) -> None:
        self.done += 1
        self.log(message)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _derive(results: List[Result]) -> None:
    """Fill bandwidth, ratio to copy and speedup over eager for one (workload, mode)."""
    by_impl = {r.impl: r for r in results if r.ok}
    copy, eager = by_impl.get(COPY), by_impl.get(EAGER)
    for r in by_impl.values():
        seconds = r.median_ms / 1e3
        traffic = steps.traffic_factor(r.mode, r.impl == COPY) * r.workload.logits_bytes
        # LM-head workloads are GEMM-bound, logits traffic is not their measure
        r.gbps = traffic / seconds / 1e9 if seconds > 0 and not r.workload.hidden else None
        # Against the copy timed in alternation with r where there is one (the same
        # seconds of the machine), else against the copy's own measurement.
        copy_ms = (r.timing.get("alongside") or {}).get("median_ms") or (copy.median_ms if copy else None)
        if copy_ms:
            r.ratio_to_copy = r.median_ms / copy_ms
        if eager and r.median_ms > 0 and r.impl != COPY:
            r.speedup_vs_eager = eager.median_ms / r.median_ms


def run(workloads: Sequence[Workload], impls: Sequence[Impl], config: Config,
        progress: Optional[Progress] = None,
        on_workload: Optional[Callable[[List[Result]], None]] = None) -> List[Result]:
    """All workloads in turn; ``on_workload(results_so_far)`` after each (to save partial results)."""
    progress = progress or Progress(len(workloads) * len(impls) * len(config.modes))
    results: List[Result] = []
    for workload in workloads:
        try:
            results.extend(run_workload(workload, impls, config, progress))
        except Exception as exc:  # e.g. out of memory creating the inputs: record it, go on
            status = f"failed: {_short_error(exc)}"
            progress.log(f"{workload.name}: {status}")
            results.extend(Result(workload, mode, impl.name, status=status)
                           for mode in config.modes for impl in impls)
        finally:
            if config.device == "cuda":
                torch.cuda.empty_cache()
        if on_workload is not None:
            on_workload(results)
    return results


def run_workload(workload: Workload, impls: Sequence[Impl], config: Config,
                 progress: Progress) -> List[Result]:
    device = config.device
    n_buffers = buffer_count(workload, device)
    progress.log(f"{workload.name}: logits {workload.shape_str} {workload.dtype} "
                 f"({workload.logits_bytes / 1e6:.1f} MB), {n_buffers} buffers, options {workload.options_str}")
    inputs = make_inputs(workload, device, n_buffers, seed=config.seed)
    # Every parity check reads the first buffer. With inplace_backward, timing fused_ce
    # overwrites the buffers with gradients, so the checks get a copy kept aside.
    parity_x = inputs.logits[0].detach().clone() if workload.inplace_backward else inputs.logits[0]
    parity_t = inputs.targets[0]
    # The parity reference is always eager, whether or not eager is among the timed implementations.
    try:
        reference = parity.outputs(Eager().build_for(workload, inputs), parity_x, parity_t)
    except Exception as exc:
        reference = None
        progress.log(f"{workload.name}: no parity reference, eager failed: {_short_error(exc)}")

    # The copy runs beside every implementation where the copy itself runs (not on LM-head workloads).
    copy_alongside = config.copy_alongside and any(
        i.roofline and not (i.unavailable(device) or i.unsupported(workload)) for i in impls)
    results = {mode: [] for mode in config.modes}
    for impl in impls:  # impl-major: peers that overwrite their input (Liger) come last
        reason = impl.unavailable(device) or impl.unsupported(workload)
        if reason:
            for mode in config.modes:
                results[mode].append(Result(workload, mode, impl.name, status=reason))
                progress.step(f"{workload.name} {mode} {impl.name}: {reason}")
            continue

        fn, check, build_error = None, None, None
        if not impl.roofline:
            try:
                fn = impl.build_for(workload, inputs)
                if reference is not None:
                    check = _check_parity(fn, parity_x, parity_t, reference, workload)
            except Exception as exc:
                build_error = f"failed: {_short_error(exc)}"

        measured = {}  # the copy's measurement, launched and captured (see below)
        for mode in config.modes:
            result = Result(workload, mode, impl.name, buffers=n_buffers,
                            parity=check.as_dict() if check else None)
            results[mode].append(result)
            if build_error:
                result.status = build_error
                progress.step(f"{workload.name} {mode} {impl.name}: {build_error}")
                continue
            graphed = mode == steps.GRAPHED
            if impl.roofline and graphed in measured:
                # The copy does the same work in every mode: one measurement serves them all,
                # one launched and one replayed from CUDA graphs.
                same = measured[graphed]
                result.status, result.timing, result.memory = same.status, same.timing, same.memory
            else:
                _time_one(result, impl, fn, inputs, config, copy_alongside=copy_alongside)
                # A captured step's memory is its graph's pool, set aside at the capture.
                if result.ok and config.memory and not graphed:
                    result.memory = _memory_one(impl, fn, workload, inputs, mode, config).as_dict()
                measured[graphed] = result
            progress.step(_describe(result))

    del inputs
    flat = []
    for mode in config.modes:
        _derive(results[mode])
        flat.extend(results[mode])
    return flat


def _check_parity(fn, x, target, reference, workload) -> parity.Parity:
    try:
        got = parity.outputs(fn, x, target)
        return parity.compare(got, reference, workload.torch_dtype)
    except Exception as exc:
        return parity.Parity(float("nan"), float("nan"), False, _short_error(exc))


def _time_one(result: Result, impl: Impl, fn, inputs, config: Config, copy_alongside: bool = False) -> None:
    try:
        prep, step = steps.make(fn, result.mode, inputs, impl.roofline)
        alongside = steps.copy_steps(inputs, result.mode) if copy_alongside and not impl.roofline else None
        timing = measure(step, prep, buffers=len(inputs), device=config.device, warmup=config.warmup,
                         repeat=config.repeat, max_time=config.max_time, alongside=alongside)
        result.timing = timing.summary()
    except Exception as exc:
        result.status = f"failed: {_short_error(exc)}"
    finally:
        for x in inputs.logits:
            x.grad = None


def _memory_one(impl: Impl, fn, workload: Workload, inputs, mode: str, config: Config) -> memory.MemoryResult:
    if config.device == "cuda":
        prep, step = steps.make(fn, mode, inputs, impl.roofline)
        return memory.probe_cuda(prep, step, inputs)
    return memory.probe_cpu(impl, workload, mode, seed=config.seed)


def _describe(r: Result) -> str:
    head = f"{r.workload.name} {r.mode} {r.impl}"
    if not r.ok:
        return f"{head}: {r.status}"
    t = r.timing
    text = f"{head}: {t['median_ms']:.3f} ms (p10 {t['p10_ms']:.3f}, p90 {t['p90_ms']:.3f}, {t['reps']} reps)"
    if r.memory and r.memory.get("peak_bytes") is not None:
        text += f", peak +{r.memory['peak_bytes'] / 1e6:.1f} MB"
    if r.parity and not r.parity["ok"]:
        text += "  PARITY MISMATCH"
    return text
