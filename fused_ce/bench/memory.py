"""Peak memory of one timed step, over the baseline of its inputs.

CUDA: in process, ``torch.cuda.max_memory_allocated()`` during the step minus
``torch.cuda.memory_allocated()`` just before it.

CPU: there is no allocator counter, so each (implementation, workload, mode)
probe runs in a child process (``python -m fused_ce.bench.memory``) that
builds the inputs, runs the step once to warm up (compilation, thread pools,
lazy initialisation), runs the untimed prep, then resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), reads the resident set size
as the baseline, runs the step once and reports ``VmHWM - baseline``. The
child runs with a fixed glibc mmap threshold so that every large tensor is
its own mapping and freeing it really lowers the RSS: the peak then counts
the tensors alive at the worst moment, as the CUDA counter does. Where the
peak counter cannot be reset, the child skips the warm-up and uses
``ru_maxrss`` over the baseline instead (noted in the result).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
from typing import Optional

import torch

import fused_ce

from . import impls as impls_mod
from . import steps
from .workloads import Workload, make_inputs

_CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),  # fixed threshold: large blocks are mmapped and unmapped on free
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024),
}


@dataclasses.dataclass
class MemoryResult:
    peak_bytes: Optional[int] = None  # peak over the baseline
    method: str = ""
    error: Optional[str] = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- CUDA


def probe_cuda(prep: Optional[steps.Step], step: steps.Step, inputs) -> MemoryResult:
    """In-process probe on the current CUDA device, with the benchmark's own steps and buffer 0."""
    try:
        if prep:
            prep(0)
        step(0)  # warm-up
        if prep:
            prep(0)
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step(0)
        torch.cuda.synchronize()
        return MemoryResult(torch.cuda.max_memory_allocated() - baseline, "cuda max_memory_allocated")
    except Exception as exc:
        return MemoryResult(None, "cuda max_memory_allocated", f"{type(exc).__name__}: {exc}"[:200])
    finally:
        for x in inputs.logits:
            x.grad = None


# --------------------------------------------------------------------------- CPU (child process)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(request: dict) -> dict:
    torch.set_num_threads(request["threads"])
    workload = Workload(**{**request["workload"], "shape": tuple(request["workload"]["shape"])})
    impl = impls_mod.by_name()[request["impl"]]
    inputs = make_inputs(workload, "cpu", buffers=1, seed=request["seed"])
    fn = None if impl.roofline else impl.build_for(workload, inputs)
    prep, step = steps.make(fn, request["mode"], inputs, impl.roofline)

    can_reset = _reset_peak_rss()
    if can_reset:
        if prep:
            prep(0)
        step(0)  # warm-up: compilation, thread pools, lazy initialisation
    if prep:
        prep(0)
    gc.collect()
    # fused_ce keeps the gradient the warm-up freed for the next step (see
    # fused_ce.cache); resident before the baseline, it would hide the
    # gradient's memory from the measured step. The step has to count it.
    fused_ce.empty_cache()
    if can_reset:
        _reset_peak_rss()
        baseline = _status_kib("VmRSS")
        step(0)
        peak = _status_kib("VmHWM")
        method = "child VmHWM - VmRSS (peak reset after warm-up)"
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "child ru_maxrss delta (no warm-up: peak counter not resettable)"
    return {"peak_bytes": max(0, peak - baseline) * 1024, "method": method}


def probe_cpu(impl: impls_mod.Impl, workload: Workload, mode: str, *, seed: int = 0,
              timeout: float = 600.0) -> MemoryResult:
    """Run the probe in a fresh Python process; errors become a result, never an exception."""
    request = {"workload": dataclasses.asdict(workload), "impl": impl.name, "mode": mode,
               "seed": seed, "threads": torch.get_num_threads()}
    env = {**os.environ, **_CHILD_ENV}
    try:
        proc = subprocess.run([sys.executable, "-m", "fused_ce.bench.memory", json.dumps(request)],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return MemoryResult(None, "child process", f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return MemoryResult(None, "child process", last[:200])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return MemoryResult(result["peak_bytes"], result["method"])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
