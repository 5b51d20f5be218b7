"""Are the timed implementations computing the same thing? One check per (implementation, workload).

The loss and the gradient of the logits are computed once on fresh copies of
the first input buffer and compared with eager ``F.cross_entropy`` (the
reference). Differences are maximum absolute differences; the verdict uses a
tolerance relative to the reference's magnitude, by dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .impls import LossFn

# Relative tolerances: float32 accumulates differently per implementation;
# 16-bit gradients differ by an ulp of the stored dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclass
class Outputs:
    loss: torch.Tensor
    grad: torch.Tensor


@dataclass
class Parity:
    loss_diff: float
    grad_diff: float
    ok: bool
    error: Optional[str] = None
    # False when eager's own loss is NaN or infinite where this implementation's
    # is finite: then there is no reference to compare with, and no verdict.
    reference_finite: bool = True

    def as_dict(self) -> dict:
        return {"loss_max_abs_diff": self.loss_diff, "grad_max_abs_diff": self.grad_diff,
                "ok": self.ok, "error": self.error, "reference_finite": self.reference_finite}

    def short(self) -> str:
        if self.error:
            return f"ERROR {self.error}"
        if not self.reference_finite:
            return "n/a: eager's loss is not finite"
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{verdict} {self.loss_diff:.1e}/{self.grad_diff:.1e}"


def outputs(fn: LossFn, x: torch.Tensor, target: torch.Tensor) -> Outputs:
    """Loss and gradient of ``fn`` on a private copy of ``x`` (some peers overwrite their input)."""
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward()
    return Outputs(loss.detach(), x.grad.detach())  # kept in the input's dtype: GPU logits can be 4 GB


_CHUNK = 1 << 24  # elements compared at a time, in float32


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start:start + _CHUNK].float()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, NaN when only one side is NaN (an all-ignored mean is NaN for everyone)."""
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    worst = torch.zeros((), device=a.device)
    for ca, cb in zip(_chunks(a), _chunks(b)):
        diff = (ca - cb).abs().masked_fill(torch.isnan(ca) & torch.isnan(cb), 0)
        worst = torch.maximum(worst, diff.max())  # maximum propagates NaN
    return float(worst)


def _scale(t: torch.Tensor) -> float:
    """Largest finite |t| (at least a tiny positive number), to make tolerances relative."""
    worst = torch.zeros((), device=t.device)
    for c in _chunks(t):
        worst = torch.maximum(worst, c.abs().masked_fill(~torch.isfinite(c), 0).max())
    return max(1e-30, float(worst))


def _all_finite(t: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(c).all()) for c in _chunks(t))


def compare(candidate: Outputs, reference: Outputs, dtype: torch.dtype) -> Parity:
    loss_diff = _max_abs(candidate.loss, reference.loss)
    grad_diff = _max_abs(candidate.grad, reference.grad)
    tol = TOLERANCE.get(dtype, 1e-4)
    ok = (loss_diff <= tol * max(1.0, _scale(reference.loss))
          and grad_diff <= tol * _scale(reference.grad))
    # The workloads' logits are finite, so a finite loss is expected; eager's
    # float16 mean over 2M pixels was NaN on an H100 where fused_ce and
    # torch.compile were finite (benchmarks/results/gpu-2026-11-26-h100).
    reference_finite = _all_finite(reference.loss) or not _all_finite(candidate.loss)
    return Parity(loss_diff, grad_diff, ok, reference_finite=reference_finite)
