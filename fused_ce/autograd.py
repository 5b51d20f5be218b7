"""The autograd.Function over the registered operators.

It works on the canonical layout prepared by ``fused_ce.functional``: input
``(N, C, D)``, class-index target ``(N, D)`` int64 or probability target
``(N, C, D)``. It applies the reduction itself, so that the operators only
ever produce per-element results.

Two strategies for the gradient:

* On the CPU, when only the input needs a gradient and the loss is reduced,
  the forward already computes the gradient of the reduced loss (the
  ``forward_with_grad`` operator). The logits are then read once for forward
  and backward together, and the backward only scales the saved gradient by
  the upstream gradient (nothing at all when that is 1, as it is for a loss
  that is the end of the graph).
* Otherwise (CUDA, ``reduction="none"``, gradients for soft targets) the
  forward saves the per-element log-sum-exp and the backward operator
  recomputes the softmax from the logits. On CUDA this is the cheaper plan:
  checking the upstream gradient would need a host synchronisation.
"""

import torch

from ._ops import accumulate_dtype, ops

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def _reduce(loss: torch.Tensor, total_weight: torch.Tensor, reduction: int, dtype: torch.dtype):
    if reduction == REDUCTION_MEAN:
        out = loss.sum() / total_weight
    elif reduction == REDUCTION_SUM:
        out = loss.sum()
    else:
        out = loss
    return out.to(dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy on canonical arguments.

    ``apply(input, target, weight, ignore_index, label_smoothing, reduction)``
    with ``reduction`` 0 (none), 1 (mean) or 2 (sum). Use
    :func:`fused_ce.cross_entropy` unless you already have the canonical
    layout.
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, label_smoothing, reduction):
        input_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.gradient_in_forward = (
            input_grad
            and not target_grad
            and reduction != REDUCTION_NONE
            and input.device.type == "cpu"
        )
        if ctx.gradient_in_forward:
            loss, _lse, total_weight, grad_input = ops.cross_entropy_forward_with_grad(
                input, target, weight, ignore_index, label_smoothing, reduction)
            ctx.save_for_backward(grad_input)
        else:
            loss, lse, total_weight = ops.cross_entropy_forward(
                input, target, weight, ignore_index, label_smoothing)
            if input_grad or target_grad:
                ctx.save_for_backward(input, target, weight, lse, total_weight)
        return _reduce(loss, total_weight, reduction, input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.gradient_in_forward:
            (grad_input,) = ctx.saved_tensors
            return _scale_saved_gradient(grad_input, grad_output), None, None, None, None, None

        input, target, weight, lse, total_weight = ctx.saved_tensors
        n, _, d = input.shape
        acc = accumulate_dtype(input.dtype)
        grad_loss = grad_output.to(acc)
        if ctx.reduction == REDUCTION_MEAN:
            grad_loss = (grad_loss / total_weight).expand(n, d)
        elif ctx.reduction == REDUCTION_SUM:
            grad_loss = grad_loss.expand(n, d)
        input_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_input, grad_target = ops.cross_entropy_backward(
            grad_loss, input, target, weight, lse, ctx.ignore_index, ctx.label_smoothing,
            input_grad, target_grad)
        return (grad_input if input_grad else None, grad_target if target_grad else None,
                None, None, None, None)


def _scale_saved_gradient(grad_input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad_input * grad_output for a scalar grad_output, skipping the pass when it is 1.

    Reading the scalar is free on the CPU (no device synchronisation). Under
    torch.compile the value is unknown at trace time, so the product is
    always traced. The saved gradient is never modified in place: with
    ``retain_graph=True`` a second backward must see it unchanged.
    """
    if (not torch.compiler.is_compiling() and grad_output.device.type == "cpu"
            and grad_output.item() == 1.0):
        return grad_input
    return grad_input * grad_output
