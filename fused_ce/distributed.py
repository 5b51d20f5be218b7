"""Cross-entropy over a vocabulary that is split across tensor-parallel ranks.

In a tensor-parallel language model the output projection is split by
vocabulary: with ``world_size`` ranks and ``V`` classes, rank ``r`` holds the
logits of the contiguous classes ``[r * Vs, (r + 1) * Vs)`` (``Vs = V /
world_size``) for every row, and the targets (global class ids) are
replicated on all ranks. :func:`vocab_parallel_cross_entropy` computes the
same loss as ``F.cross_entropy`` on the full ``(N, V)`` logits without ever
moving a logit between ranks.

Protocol (per call; ``N`` rows, everything exchanged is ``O(N)``):

0. Validation: one ``all_reduce(MAX)`` of a few integers (a flag for an
   out-of-range target, the shard width, the row count, a checksum of the
   targets and the options, each also negated so that MAX yields the minimum
   too). Every rank reads it back (the only host synchronisation) and, if
   anything is wrong or inconsistent on *any* rank, every rank raises the
   same error before the next collective, instead of some ranks raising and
   the rest hanging in a collective with mismatched sizes.
1. The log-sum-exp of each row's local classes, ``l``, by the fused
   forward operator (one read of the logits), and ``m = all_reduce(MAX)``
   of it.
2. One ``all_reduce(SUM)`` of a stacked ``(2 or 3, N)`` tensor:
   ``exp(l - m)``, the local classes' ``sum_j exp(x_j - m)``; the target
   logit (the rank that owns the target contributes it, the others 0);
   and, with label smoothing only, the row sum of the logits.
   Then ``lse = m + log(sum)`` and, per row,
   ``loss = (1 - eps) * (lse - x_t) + eps * (lse - rowsum / V)``,
   which is PyTorch's ``(1 - eps) * nll + eps * mean_c(-log p_c)``.
   Ignored rows contribute 0 and "mean" divides by the number of
   non-ignored rows (0 / 0 = NaN when all are ignored, like PyTorch).
   With ``z_loss`` each kept row adds ``z_loss * lse**2``; with ``softcap``
   the logits are first capped, ``softcap * tanh(x / softcap)``, on each
   rank (as by :func:`fused_ce.cross_entropy`).

The loss is identical on every rank (it is built only from all-reduced
statistics and the replicated targets). The backward needs no communication:
``d loss_i / d x_ij = g_i * (p_ij (1 + 2 z lse_i) - eps / V) - g_i * (1 - eps) * [j == t_i]``
with ``p_ij = exp(x_ij - lse_i)`` (times ``1 - (y_ij / softcap)**2`` for
capped logits ``y``), and everything in it is available locally; each rank
gets the gradient of its own slice. This assumes that the upstream gradient
of the loss is the same on every rank, which holds when every rank computes
the same objective from the replicated loss (the usual tensor-parallel
setup).

Memory: the autograd graph keeps the logits (already alive in the model), the
targets and the global and local ``lse`` (``N`` values each); the softmax
(and the softcap) is recomputed in the backward by the fused backward
operator, which also writes the target's term: one read of the logits and
one write of the gradient (with label smoothing, one more pass over each;
with label smoothing and the softcap together, torch operations). On the
CPU machine a 2048 x 32000 float32 step on one rank takes 1.6-1.9x a copy
of the logits, where torch operations took 17-28x
(benchmarks/results/cpu-2026-11-28-vocab-parallel/). Half-precision logits are computed in float32
(float64 stays float64) and the loss is returned in the logits' dtype, like
``F.cross_entropy``.

Works with any backend that supports all_reduce with MAX and SUM on the
logits' device (gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import ops
from .autograd import once_differentiable
from .functional import _check_llm_options

__all__ = ["vocab_parallel_cross_entropy"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# Modulus of the target checksum: keeps each term below 2**32 and the sum of up
# to 2**31 terms inside int64, so no overflow (whose behaviour could differ
# between devices) ever enters the comparison.
_CHECKSUM_MOD = 65521


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """Cross-entropy of vocabulary-parallel logits; same value on every rank.

    Args:
        logits: this rank's ``(..., Vs)`` slice of the ``(..., V)`` logits,
            ``V = Vs * world_size``; rank ``r`` owns classes
            ``[r * Vs, (r + 1) * Vs)``. Any floating dtype.
        target: global class ids, shape ``logits.shape[:-1]``, an integer
            dtype, identical on every rank of ``group``.
        group: the tensor-parallel process group (default: the world).
        ignore_index, reduction, label_smoothing: as in
            :func:`torch.nn.functional.cross_entropy`.
        z_loss, softcap: as in :func:`fused_ce.cross_entropy`.

    Returns:
        The loss in ``logits.dtype``: a scalar for "mean"/"sum", shape
        ``logits.shape[:-1]`` for "none". Backward yields the gradient of
        this rank's slice of the logits, with no communication.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be one of "
                         f"{list(_REDUCTIONS)}, got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], "
                         f"got {label_smoothing}")
    ignore_index = int(ignore_index)
    z_loss, softcap = _check_llm_options(z_loss, softcap, False, False, reduction)
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError("vocab_parallel_cross_entropy: logits and target must be tensors, got "
                        f"{type(logits).__name__} and {type(target).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_cross_entropy: logits must be floating point, got {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError("vocab_parallel_cross_entropy: target must hold integer class ids "
                        f"(int64), got {target.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError("vocab_parallel_cross_entropy: logits must be (..., Vs) with Vs >= 1 "
                         f"classes on this rank, got shape {list(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"vocab_parallel_cross_entropy: target shape {list(target.shape)} does not "
                         f"match the logits' leading shape {list(logits.shape[:-1])} "
                         f"(logits {list(logits.shape)})")
    if target.device != logits.device:
        raise ValueError(f"vocab_parallel_cross_entropy: logits are on {logits.device} but target "
                         f"is on {target.device}")

    rank, world_size = _rank_and_world_size(group)
    lead_shape = logits.shape[:-1]
    vocab_shard = logits.shape[-1]
    n = math.prod(lead_shape)
    x = logits.reshape(n, vocab_shard)  # a view whenever the layout allows it
    t = target.reshape(n).long()

    # The log-sum-exp of this rank's classes, by the fused forward operator
    # (one read of the logits). A row of nothing but -inf (this rank's part
    # of a padded vocabulary) has the log-sum-exp -inf, which the operators
    # give (torch.logsumexp's value), and its softmax is 0, which the
    # backward has to write itself (the operator's softmax of such a row is
    # NaN). Whether any rank has such a row, or a NaN, comes back with the
    # validation; a NaN lse is then replaced by the row maximum (still NaN
    # for a NaN logit).
    with torch.no_grad():  # (the Function below is the autograd of all this)
        local_lse = _local_lse(x, softcap)
        any_degenerate = _validate_across_ranks(x, t, rank, world_size, group, ignore_index, reduction,
                                                label_smoothing, z_loss, softcap, local_lse)
        if any_degenerate:  # (a NaN logit keeps its row's NaN)
            local_lse = torch.where(local_lse.isnan(), x.amax(dim=1).to(local_lse.dtype), local_lse)

    loss = _VocabParallelCrossEntropy.apply(x, t, local_lse, any_degenerate, group, rank, world_size,
                                            ignore_index, _REDUCTIONS[reduction], label_smoothing, z_loss, softcap)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    return loss


def _rank_and_world_size(group):
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed, which this "
                           "PyTorch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy: the world size is not available because "
                           "the default process group is not initialized; call "
                           "torch.distributed.init_process_group(...) on every rank first")
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if world_size < 1 or rank < 0:
        raise RuntimeError("vocab_parallel_cross_entropy: this process is not a member of the "
                           "given process group")
    return rank, world_size


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate_across_ranks(x, t, rank, world_size, group, ignore_index, reduction, label_smoothing,
                           z_loss, softcap, local_lse) -> bool:
    """One small all_reduce(MAX) that makes every rank agree the call is valid;
    returns whether any rank's ``local_lse`` holds a NaN or -inf (a NaN logit, or a row
    of nothing but -inf).

    Out-of-range targets would otherwise silently contribute nothing (no rank
    owns them), and ranks disagreeing on the row count or shard width would
    deadlock or corrupt the next collectives. Each quantity ``q`` that must be
    equal on all ranks is sent as ``q`` and ``-q``: after MAX, ``max == min``
    iff all ranks agree.
    """
    n, vocab_shard = x.shape
    num_classes = vocab_shard * world_size
    device = x.device
    bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
    # Order-sensitive checksum of the targets: catches ranks that were fed
    # different batches (their losses would silently differ).
    pos = torch.arange(n, device=device) % _CHECKSUM_MOD + 1
    checksum = ((t % _CHECKSUM_MOD) * pos).sum()
    # name -> value that must be equal on every rank (the checksum, last, is
    # filled in on the device; it is checked last, so that a different row
    # count is reported as such)
    agreed = {
        "vocabulary shard size": vocab_shard,
        "number of rows": n,
        "ignore_index": ignore_index,
        "reduction": _REDUCTIONS[reduction],
        "label_smoothing (x 2**40)": round(label_smoothing * 2 ** 40),
        "z_loss (x 2**40)": round(z_loss * 2 ** 40),
        "softcap (x 2**20)": round(softcap * 2 ** 20),
        "compute dtype (1 = float64)": int(_compute_dtype(x.dtype) == torch.float64),
        "targets (checksum)": 0,
    }
    # One host-to-device copy for all the host-side values.
    values = torch.tensor(list(agreed.values()), dtype=torch.long).to(device)
    values[-1] = checksum
    local_bad = bad.any().long().reshape(1)
    degenerate = (local_lse.isnan() | (local_lse == -math.inf)).any()
    packet = torch.cat([local_bad, values, -values, degenerate.long().reshape(1)])
    dist.all_reduce(packet, op=dist.ReduceOp.MAX, group=group)
    result = packet.tolist()  # the one host synchronisation of the call
    k = len(agreed)
    if result[0]:
        if bool(local_bad):
            value = int(t[bad][0])
            raise IndexError(f"vocab_parallel_cross_entropy: target {value} is out of bounds: class "
                             f"ids must be in [0, {num_classes}) ({vocab_shard} classes per rank x "
                             f"{world_size} ranks) or equal ignore_index ({ignore_index})")
        raise IndexError("vocab_parallel_cross_entropy: a target is out of bounds on another rank "
                         f"(class ids must be in [0, {num_classes}) or equal ignore_index)")
    for i, name in enumerate(agreed):
        hi, lo = result[1 + i], -result[1 + k + i]
        if hi != lo:
            raise ValueError(f"vocab_parallel_cross_entropy: ranks disagree on the {name}: values "
                             f"range from {lo} to {hi} across the group (this rank, {rank}, has "
                             f"{int(values[i])}); every rank must pass the same rows, targets and "
                             "options, with equal vocabulary shards")
    return bool(result[-1])


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward with O(N) all-reduces; communication-free backward.

    ``apply(x, t, local_lse, any_degenerate, group, rank, world_size, ignore_index, reduction, eps,
    z_loss, softcap)`` on ``x`` ``(N, Vs)`` and int64 ``t`` ``(N,)`` (validated by the
    caller), with the log-sum-exp of each row's local classes and whether any rank had
    a NaN or -inf there (a NaN logit, a padded vocabulary's all -inf rows);
    ``reduction`` 0 none, 1 mean, 2 sum; ``softcap`` 0 for none.
    """

    @staticmethod
    def forward(ctx, x_in, t, local_lse, any_degenerate, group, rank, world_size, ignore_index, reduction, eps, z_loss,
                softcap):
        cdtype = _compute_dtype(x_in.dtype)
        n, vocab_shard = x_in.shape
        num_classes = vocab_shard * world_size
        valid = t != ignore_index
        local_t = t - rank * vocab_shard
        own = valid & (local_t >= 0) & (local_t < vocab_shard)
        # Clamped so that rows whose target lives elsewhere still index in range.
        idx = torch.where(own, local_t, 0).unsqueeze(1)

        # 1. The maximum over the ranks of the local log-sum-exp: every rank
        #    rescales its partial sum to that same reference, so the sums can
        #    simply be added and exp never overflows.
        row_max = local_lse.clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)

        # 2. Partial statistics, summed in one collective.
        sum_exp = torch.sub(local_lse, row_max).exp_()
        # torch.where, not a multiplication: a non-owned column may be +-inf.
        # Only the targets' logits are capped here (the operator capped the
        # rest); the row sum of label smoothing needs every capped logit.
        target_logit = torch.where(own, _capped(x_in.gather(1, idx).squeeze(1), softcap, cdtype).to(cdtype), 0.0)
        parts = [sum_exp, target_logit]
        if eps > 0:
            parts.append(_capped(x_in, softcap, cdtype).sum(dim=1, dtype=cdtype))
        stats = torch.stack(parts)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)

        lse = row_max + stats[0].log()
        per_row = lse - stats[1]
        if eps > 0:
            # Skipped entirely for eps == 0 so that -inf logits (masked
            # vocabulary padding) do not turn 0 * inf into NaN.
            per_row = (1.0 - eps) * per_row + eps * (lse - stats[2] / num_classes)
        if z_loss != 0:
            per_row = per_row + z_loss * lse * lse
        per_row = torch.where(valid, per_row, 0.0)

        if reduction == 0:
            loss = per_row
        elif reduction == 2:
            loss = per_row.sum()
        else:
            loss = per_row.sum() / valid.sum()  # all ignored: 0 / 0 = NaN, like PyTorch

        ctx.save_for_backward(x_in, t, lse, local_lse)  # the capped logits are recomputed
        ctx.rank, ctx.world_size, ctx.any_degenerate = rank, world_size, any_degenerate
        ctx.ignore_index, ctx.reduction, ctx.eps = ignore_index, reduction, eps
        ctx.z_loss, ctx.softcap = z_loss, softcap
        return loss.to(x_in.dtype)

    @staticmethod
    @once_differentiable("fused_ce.distributed.vocab_parallel_cross_entropy: the gradient has no second "
                         "derivative (double backward / create_graph=True)")
    def backward(ctx, grad_loss):
        x_in, t, lse, local_lse = ctx.saved_tensors
        eps, reduction, softcap = ctx.eps, ctx.reduction, ctx.softcap
        n, vocab_shard = x_in.shape
        num_classes = vocab_shard * ctx.world_size
        g = grad_loss.to(lse.dtype)

        valid = t != ctx.ignore_index
        if reduction == 0:
            coef = g.reshape(n)
        elif reduction == 2:
            coef = g.expand(n)
        else:
            coef = (g / valid.sum()).expand(n)
        # where, not a product: with everything ignored, coef is g / 0 = inf.
        coef = torch.where(valid, coef, 0.0)

        local_t = t - ctx.rank * vocab_shard
        own = valid & (local_t >= 0) & (local_t < vocab_shard)
        # d loss_i / d y_ij = coef_i ((1 + 2 z lse_i) p_ij - eps / V - (1 - eps) [j == t_i]).
        p_coef = coef * (1.0 + 2.0 * ctx.z_loss * torch.where(valid, lse, 0.0)) if ctx.z_loss != 0 else coef
        if eps > 0 and softcap != 0:
            # The smoothing term's chain rule needs every capped logit: in torch operations.
            idx = torch.where(own, local_t, 0).unsqueeze(1)
            hit = torch.where(own, coef * -(1.0 - eps), 0.0)
            return (_smoothed_capped_gradient(x_in, lse, valid, p_coef, coef * (eps / num_classes), idx, hit,
                                              softcap),) + (None,) * 11
        # The fused backward operator (one read of the logits, one write of
        # the gradient, the softcap's chain rule included) knows this rank's
        # softmax, p_local = exp(y - lse_local); the loss's is p_local r with
        # r = exp(lse_local - lse). For a row that it is told targets class
        # t_i with loss gradient a and lse gradient b it gives
        # (a + b) p_local - a [j == t_i]: with a = (1 - eps) coef on the rows
        # whose target this rank holds (the others given as ignored, a = 0)
        # and b = p_coef r - a, that is the gradient above but for the
        # smoothing term; rows with a = b = 0 are written as zeros unread.
        ratio = torch.where(valid, (local_lse - lse).exp(), 0.0)
        target_coef = torch.where(own, coef * (1.0 - eps), 0.0)
        op_target = torch.where(own, local_t, _IGNORED)
        grad = _fused_gradient(x_in, local_lse, op_target, target_coef, p_coef * ratio - target_coef, softcap)
        if ctx.any_degenerate:
            # A rank's part of a padded vocabulary, all -inf (lse_local =
            # -inf), is NaN from the operator, whose softmax of such a row
            # is; the loss's softmax is 0 there.
            grad.masked_fill_((local_lse == -math.inf).unsqueeze(1), 0.0)
        if eps > 0:
            grad.sub_((coef * (eps / num_classes)).unsqueeze(1).to(grad.dtype))
        return (grad,) + (None,) * 11


# The fused operators see this rank's rows as (N, Vs, 1) logits; rows whose
# target this rank does not hold (all of them for the forward, which only
# wants the log-sum-exp) are given this target, which the operators ignore.
_IGNORED = -1


def _local_lse(x: Tensor, softcap: float) -> Tensor:
    """The log-sum-exp of each row of this rank's (capped) logits, in the compute dtype."""
    n = x.shape[0]
    ignored = torch.full((n, 1), _IGNORED, dtype=torch.long, device=x.device)
    _, lse, _ = ops.cross_entropy_forward(x.unsqueeze(2), ignored, None, _IGNORED, 0.0, 0.0, softcap)
    return lse.reshape(n)


def _fused_gradient(x: Tensor, local_lse: Tensor, target: Tensor, grad_loss: Tensor, grad_lse: Tensor,
                    softcap: float) -> Tensor:
    """The backward operator's gradient for this rank's (N, Vs) logits with their
    local log-sum-exp, local class targets (or _IGNORED) and per-row loss and
    lse gradients, in the logits' dtype."""
    n = x.shape[0]
    grad, _ = ops.cross_entropy_backward(grad_loss.reshape(n, 1), grad_lse.reshape(n, 1), x.unsqueeze(2),
                                         target.reshape(n, 1), None, local_lse.reshape(n, 1), _IGNORED, 0.0, 0.0,
                                         softcap, True, False)
    return grad.reshape(x.shape)


def _smoothed_capped_gradient(x_in, lse, valid, p_coef, smoothing, idx, hit, softcap):
    """The gradient with both label smoothing and the softcap, in torch operations."""
    x = _capped(x_in, softcap, lse.dtype)
    # Ignored rows get lse = +inf, so exp(x - lse) is exactly 0 there.
    grad = torch.sub(x, torch.where(valid, lse, math.inf).unsqueeze(1)).exp_()
    grad.mul_(p_coef.unsqueeze(1)).sub_(smoothing.unsqueeze(1))
    grad.scatter_add_(1, idx, hit.unsqueeze(1))
    grad.mul_(1.0 - (x / softcap).square())
    return grad.to(x_in.dtype)


def _capped(x: Tensor, softcap: float, cdtype: torch.dtype) -> Tensor:
    """The logits the loss sees: x itself, or softcap * tanh(x / softcap) in the compute dtype."""
    if softcap == 0:
        return x
    return torch.tanh(x.to(cdtype) / softcap).mul_(softcap)
