"""Where the numbers come from: machine, software versions and the exact command line."""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Optional

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _load_average() -> Optional[float]:
    """1-minute load average: other processes competing for the cores make CPU timings noisy."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_warning(meta: dict) -> Optional[str]:
    m = meta["machine"]
    load, cores = m.get("load_average_at_start"), m.get("logical_cores") or 1
    if meta["device"] == "cpu" and load is not None and load > 0.5 * cores:
        return (f"the 1-minute load average is {load:.1f} on {cores} cores: other processes are using "
                f"the CPU, so timings will be noisy")
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fused_ce() -> dict:
    info = {"version": _version("fused_ce")}
    try:
        fused_ce = importlib.import_module("fused_ce")
        for name in ("cpu_capability", "built_with_cuda"):
            fn = getattr(fused_ce, name, None)
            if fn is not None:
                info[name] = fn()
        info["path"] = os.path.dirname(getattr(fused_ce, "__file__", None) or "")
        if info["version"] == "not installed":  # imported from a source tree on the path (PYTHONPATH)
            info["version"] = f"{getattr(fused_ce, '__version__', '?')} (not pip-installed)"
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _git_commit() -> Optional[str]:
    """The checkout's commit (read-only git queries), with '+dirty' when files differ; None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect(device: str) -> dict:
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
        "device": device,
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "memory_gb": _memory_total_gb(),
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_at_start": _load_average(),
        },
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_ce": _fused_ce(),
        "git_commit": _git_commit(),
        "peers": {name: _version(name) for name in ("liger-kernel", "cut-cross-entropy", "triton")},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["cuda"] = {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda,
            "device_count": torch.cuda.device_count(),
        }
    return meta


def describe(meta: dict) -> str:
    """One or two human lines for the top of a report."""
    m = meta["machine"]
    fused = meta["fused_ce"]
    fused_text = fused.get("error") or (
        f"fused_ce {fused['version']}"
        + (f" at {meta['git_commit']}" if meta.get("git_commit") else "")
        + f", cpu_capability={fused.get('cpu_capability', '?')}")
    line = (f"{meta['date']}  {m['cpu_model']} ({m['logical_cores']} cores, {m['torch_threads']} torch threads, "
            f"{m['platform']})  torch {meta['torch']}  {fused_text}")
    if "cuda" in meta:
        c = meta["cuda"]
        line += f"\nGPU {c['gpu']} (sm {c['capability']}, {c['memory_gb']} GB), CUDA {c['torch_cuda']}"
    return line
