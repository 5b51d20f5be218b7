"""Who is benchmarked: the implementations compared on every workload.

Each :class:`Impl` knows whether it can run here (``unavailable``: ``None``
or the reason, shown in the results instead of a time) and builds a loss
function ``fn(x, target) -> loss`` for one workload. Peers are imported
lazily and are never a hard dependency.

The copy of the logits is not a loss: it is the roofline every other time is
divided by, and the runner times it as ``out.copy_(x)`` into a preallocated
``out``.

LM-head workloads (``workload.hidden > 0``) give ``fn`` hidden states instead of
logits: the implementations that take them (``linear = True``) build their loss
with :meth:`Impl.build_linear`, the head's weight bound in; the others are
"n/a" there (and the LM-head-only ``torch_chunked`` on logits workloads).
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F

from .workloads import Workload

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FUSED, EAGER, COMPILE, COPY, LIGER, CCE = "fused_ce", "eager", "compile", "copy", "liger", "cut_ce"
FUSED_NO_CACHE = "fused_ce_nocache"
TORCH_CHUNKED = "torch_chunked"
_LOGITS_ONLY = "n/a (logits workloads only)"


@dataclass
class Impl:
    name: str
    description: str
    roofline: bool = False  # the copy of the logits: not a loss, no parity check
    linear: ClassVar[bool] = False  # also runs LM-head workloads (build_linear)

    def unavailable(self, device: str) -> Optional[str]:
        """None when this implementation can run on ``device``, else a short reason."""
        return None

    def unsupported(self, workload: Workload) -> Optional[str]:
        """None when this implementation supports the workload's options, else a short reason."""
        return _LOGITS_ONLY if workload.hidden and not self.linear else None

    def build(self, workload: Workload, weight: Optional[torch.Tensor]) -> LossFn:
        raise NotImplementedError

    def build_linear(self, workload: Workload, weight: Optional[torch.Tensor],
                     linear_weight: torch.Tensor) -> LossFn:
        """LM-head workloads: ``fn(hidden_states, target)`` with the head ``linear_weight`` bound in."""
        raise NotImplementedError

    def build_for(self, workload: Workload, inputs) -> LossFn:
        """The loss function of this workload from its :class:`~.workloads.Inputs`."""
        if workload.hidden:
            return self.build_linear(workload, inputs.weight, inputs.linear_weight)
        return self.build(workload, inputs.weight)


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, but also a broken native library
        return f"{type(exc).__name__}: {exc}"
    return None


def _torch_loss(workload: Workload, weight: Optional[torch.Tensor]) -> LossFn:
    """The workload's loss in plain PyTorch, what a user writes without fused_ce: F.cross_entropy,
    preceded by the softcap and followed by the z-loss when the workload has them (the in-place
    gradient has no PyTorch counterpart: the reference is the ordinary loss)."""
    kwargs = workload.loss_kwargs(weight)
    if not (workload.z_loss or workload.softcap):
        return lambda x, t: F.cross_entropy(x, t, **kwargs)
    cap, z = workload.softcap, workload.z_loss

    def loss(x, t):
        if cap:
            x = cap * torch.tanh(x / cap)
        out = F.cross_entropy(x, t, **kwargs)
        if z:
            # z * w_t * lse^2 per non-ignored element, reduced like the loss.
            lse = torch.logsumexp(x.float(), dim=1)
            valid = t != workload.ignore_index
            w = valid.float() if weight is None else weight.float()[t.clamp(0, x.shape[1] - 1)] * valid
            per = z * w * lse * lse
            if workload.reduction == "mean":
                per = per.sum() / w.sum()
            elif workload.reduction == "sum":
                per = per.sum()
            out = out + per.to(out.dtype)
        return out

    return loss


class FusedCE(Impl):
    linear = True

    def __init__(self):
        super().__init__(FUSED, "fused_ce.cross_entropy (this package); "
                                "fused_ce.linear_cross_entropy on LM-head workloads")

    def unavailable(self, device):
        error = _import_error("fused_ce")
        if error is None and not hasattr(importlib.import_module("fused_ce"), "cross_entropy"):
            error = "fused_ce has no cross_entropy"
        return f"not importable ({error})" if error else None

    def build(self, workload, weight):
        import fused_ce

        # The gradient cache as the environment sets it (on unless
        # FUSED_CE_GRADIENT_CACHE=0): FusedCENoCache turns it off globally.
        fused_ce.set_gradient_cache(os.environ.get("FUSED_CE_GRADIENT_CACHE", "1") != "0")
        kwargs = dict(workload.loss_kwargs(weight), **workload.llm_kwargs())
        return lambda x, t: fused_ce.cross_entropy(x, t, **kwargs)

    def build_linear(self, workload, weight, linear_weight):
        from fused_ce.linear import linear_cross_entropy

        kwargs = dict(workload.loss_kwargs(weight), z_loss=workload.z_loss, softcap=workload.softcap)
        return lambda x, t: linear_cross_entropy(x, linear_weight, t, **kwargs)


class FusedCENoCache(FusedCE):
    """fused_ce without its CPU gradient cache: every step's gradient is freshly
    mapped memory, whose first touch (page faults, the operating system's
    zeroing) the step pays, as with PyTorch's own CPU allocator."""

    linear = False  # the LM-head chunks write in place: no gradient buffer to cache

    def __init__(self):
        Impl.__init__(self, FUSED_NO_CACHE, "fused_ce.cross_entropy with the CPU gradient cache off "
                                            "(fused_ce.set_gradient_cache(False))")

    def unavailable(self, device):
        if device != "cpu":
            return "CPU only (CUDA gradients come from PyTorch's caching allocator)"
        return super().unavailable(device)

    def build(self, workload, weight):
        import fused_ce

        loss = super().build(workload, weight)
        fused_ce.set_gradient_cache(False)  # global; FusedCE.build turns it back on
        return loss


class Eager(Impl):
    linear = True

    def __init__(self):
        super().__init__(EAGER, "torch.nn.functional.cross_entropy (eager); "
                                "F.linear + F.cross_entropy on LM-head workloads")

    def build(self, workload, weight):
        return _torch_loss(workload, weight)

    def build_linear(self, workload, weight, linear_weight):
        loss = _torch_loss(workload, weight)
        return lambda x, t: loss(F.linear(x, linear_weight), t)


class Compiled(Impl):
    """torch.compile(F.cross_entropy): compiled afresh for each workload, compilation excluded from timing."""

    linear = True

    def __init__(self):
        super().__init__(COMPILE, "torch.compile(F.cross_entropy, dynamic=False); "
                                  "of F.linear + F.cross_entropy on LM-head workloads")

    def build(self, workload, weight):
        # Without a reset, dynamo's per-function recompile limit (8) would
        # silently send later workloads back to eager.
        torch._dynamo.reset()
        return torch.compile(_torch_loss(workload, weight), dynamic=False)

    def build_linear(self, workload, weight, linear_weight):
        torch._dynamo.reset()
        head_loss = _torch_loss(workload, weight)

        def loss(x, t):
            return head_loss(F.linear(x, linear_weight), t)

        return torch.compile(loss, dynamic=False)


class TorchChunked(Impl):
    """PyTorch's own chunked LM head + loss: F.linear_cross_entropy with LinearCrossEntropyOptions()."""

    linear = True

    def __init__(self):
        super().__init__(TORCH_CHUNKED, "F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()) "
                                        "(LM-head workloads only)")

    def unavailable(self, device):
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return f"not available in torch {torch.__version__}"
        return None

    def unsupported(self, workload):
        if not workload.hidden:
            return "n/a (LM-head workloads only)"
        if workload.label_smoothing:
            return "n/a (no label_smoothing: torch falls back to its reference path)"
        if workload.z_loss or workload.softcap:
            return "n/a (no z_loss or softcap in torch's F.linear_cross_entropy)"
        return None

    def build_linear(self, workload, weight, linear_weight):
        options = torch.nn.LinearCrossEntropyOptions()
        kwargs = dict(weight=weight, ignore_index=workload.ignore_index, reduction=workload.reduction)
        return lambda x, t: F.linear_cross_entropy(x, linear_weight, t, options=options, **kwargs)


class Copy(Impl):
    def __init__(self):
        super().__init__(COPY, "out.copy_(logits): the roofline (1 read + 1 write)", roofline=True)

    def build(self, workload, weight):
        raise TypeError("the copy roofline is timed by the runner, not built as a loss")


def _peer_unavailable(module: str, device: str) -> Optional[str]:
    if _import_error(module) is not None:
        return "not installed"
    if device != "cuda":
        return "n/a (GPU only)"
    return None


class Liger(Impl):
    """Liger-Kernel's Triton cross-entropy (GPU only) on logits, and its fused linear cross-entropy on
    LM-head workloads. 2-D only: K-dim logits are moved to (N*D, C) first."""

    linear = True

    def __init__(self):
        super().__init__(LIGER, "liger_kernel liger_cross_entropy; liger_fused_linear_cross_entropy on "
                                "LM-head workloads (Triton, GPU only)")
        self._fn = None

    def _load(self):
        if self._fn is None:
            try:
                from liger_kernel.transformers.functional import liger_cross_entropy as fn
            except ImportError:
                from liger_kernel.transformers import LigerCrossEntropyLoss

                def fn(input, target, **kw):
                    return LigerCrossEntropyLoss(**kw)(input, target)
            self._fn = fn
        return self._fn

    def unavailable(self, device):
        return _peer_unavailable("liger_kernel", device)

    def _accepts(self, name: str) -> bool:
        try:
            params = inspect.signature(self._load()).parameters
        except (TypeError, ValueError):
            return True
        return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())

    def unsupported(self, workload):
        if not workload.hidden:
            if workload.weighted and not self._accepts("weight"):
                return "n/a (no weight in this version)"
            if workload.label_smoothing and not self._accepts("label_smoothing"):
                return "n/a (no label_smoothing in this version)"
        if workload.z_loss or workload.inplace_backward:
            # Liger's z-loss (lse_square_scale) is not weighted and reduced as fused_ce's, and it has
            # no in-place gradient: a time would not compare like for like. Its softcap is the same
            # formula, which the parity check confirms.
            return "n/a (z_loss and in-place options not benchmarked)"
        return None

    def _options(self, workload):
        kwargs = dict(ignore_index=workload.ignore_index, reduction=workload.reduction)
        if workload.label_smoothing:
            kwargs["label_smoothing"] = workload.label_smoothing
        if workload.softcap:
            kwargs["softcap"] = workload.softcap
        return kwargs

    def build(self, workload, weight):
        fn = self._load()
        kwargs = self._options(workload)
        if weight is not None:
            kwargs["weight"] = weight

        def loss(x, t):
            if x.dim() > 2:  # what a user has to do: class axis last, flattened
                x, t = x.movedim(1, -1).reshape(-1, x.shape[1]), t.reshape(-1)
            out = fn(x, t, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return loss

    def build_linear(self, workload, weight, linear_weight):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        kwargs = dict(self._options(workload), ce_weight=weight)

        def loss(x, t):
            out = liger_fused_linear_cross_entropy(x, linear_weight, t, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return loss


class CutCrossEntropy(Impl):
    """Apple's Cut Cross-Entropy fuses the LM-head matmul: it takes embeddings and a classifier, not
    logits, so it runs the LM-head workloads only, with its defaults (gradient filtering included,
    which the parity column shows)."""

    linear = True

    def __init__(self):
        super().__init__(CCE, "cut_cross_entropy.linear_cross_entropy (Triton, GPU only; LM-head workloads)")

    def unavailable(self, device):
        return _peer_unavailable("cut_cross_entropy", device)

    def unsupported(self, workload):
        if not workload.hidden:
            return "n/a (takes embeddings + classifier, not logits)"
        if workload.weighted or workload.label_smoothing or workload.z_loss:
            return "n/a (no class weights, label smoothing or z_loss)"
        return None

    def build_linear(self, workload, weight, linear_weight):
        from cut_cross_entropy import linear_cross_entropy

        softcap = workload.softcap or None
        return lambda x, t: linear_cross_entropy(x, linear_weight, t, ignore_index=workload.ignore_index,
                                                 softcap=softcap, reduction=workload.reduction)


def all_impls() -> List[Impl]:
    return [FusedCE(), FusedCENoCache(), Eager(), Compiled(), TorchChunked(), Copy(), Liger(),
            CutCrossEntropy()]


def by_name() -> Dict[str, Impl]:
    return {impl.name: impl for impl in all_impls()}
