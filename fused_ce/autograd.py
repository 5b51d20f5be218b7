"""The autograd.Function over the registered operators.

It takes batched arguments as ``fused_ce.functional`` prepares them: input
``(N, C, d1, ..., dk)`` (k >= 0), class-index target ``(N, d1, ..., dk)``
int64 or probability target shaped like the input. The operators work on
the canonical ``(N, C, D)`` view, D = d1 * ... * dk; taking that view here,
inside the Function, rather than in front of it keeps a reshape node (and
its backward) out of every graph. The Function applies the reduction
itself, so that the operators only ever produce per-element results.

Strategies for the gradient:

* When only the input needs a gradient and the loss is reduced, on the CPU,
  the forward already computes the gradient of the reduced loss (the
  ``forward_with_grad`` operator) and saves it. The logits are then read
  once for forward and backward together, and the backward only multiplies
  the gradient by the upstream gradient, skipping that when it is 1 (a free
  read of a CPU scalar). ``fused_ce.cross_entropy`` sends this case, and its
  CUDA counterpart, to the C++ autograd node of csrc/autograd.h, which costs
  less per call; the Function takes it under torch.compile and when called
  directly.
* Otherwise (CUDA, ``reduction="none"``, gradients for soft targets, a
  differentiable lse output) the forward saves the per-element log-sum-exp
  and the backward operator recomputes the softmax from the logits
  (``fused_ce.cross_entropy`` sends ``reduction="none"`` with an input
  gradient alone to the C++ node of csrc/per_element_loss.h, which does the
  same for less per call). CUDA
  takes this path here because a traced backward would always multiply the
  gradient, a second pass over it, where the lse path writes it once.
* With ``inplace_backward`` the forward writes the gradient over the logits
  themselves (any device), and the backward scales it in place.

Second derivatives (``create_graph=True``): on the lse path the logits are
saved, so the backward also builds the loss from them with differentiable
torch operations (the same formulas, :func:`_differentiable_loss`) and hands
out the kernel's gradient carrying that loss's graph: the values are the
kernel's, their derivatives are PyTorch's. A gradient computed in the
forward has no such graph; differentiating it raises.

Calls that no Function here can differentiate, forward-mode AD and nested
torch.func transforms (``jvp``, ``jacfwd``, ``hessian``, ``grad`` of
``grad``), take :func:`composite_cross_entropy` instead: the operator's
forward values carrying the graph of :func:`_differentiable_loss`, so that
every transform differentiates PyTorch operations (at their speed and
memory).
"""

import functools
import math

import torch
from torch.autograd import forward_ad

from ._ops import accumulate_dtype, ops

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def _canonical_views(input, target):
    """The operators' (N, C, D) input and (N, D) or (N, C, D) target, D = d1 * ... * dk:
    views for dense inputs (contiguous, channels-last), since the kernels walk
    the class axis by its stride."""
    n, num_classes = input.shape[0], input.shape[1]
    d = math.prod(input.shape[2:])
    input3 = input.reshape(n, num_classes, d)
    return input3, target.reshape(input3.shape) if target.is_floating_point() else target.reshape(n, d)


def forward_ad_active() -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad.dual_level) is active."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def has_tangent(*tensors) -> bool:
    """Whether forward-mode AD is active and any of the tensors (None allowed)
    carries a tangent at its level."""
    return forward_ad_active() and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _batch_shape(input):
    """(N, d1, ..., dk): the shape of per-element results for an (N, C, d1, ..., dk) input."""
    return input.shape[:1] + input.shape[2:]


def _shape_outputs(loss, lse, total_weight, reduction, dtype, batch_shape):
    """The operator's per-element results as the Functions return them: the
    loss reduced in ``dtype`` by the ``reduce_loss`` operator, as the C++
    node does, so that every path gives the same bits (shaped like the batch
    for reduction "none"), and the lse shaped like the batch."""
    if reduction == REDUCTION_NONE:
        out = loss.reshape(batch_shape)
        return (out if out.dtype == dtype else out.to(dtype)), lse.reshape(batch_shape)
    return ops.reduce_loss(loss, total_weight, reduction, dtype), lse.reshape(batch_shape)


def _carrying_graph(value, graph):
    """``value``'s numbers with ``graph``'s derivatives: ``value.detach() +
    (graph - graph.detach())``. Detaching ``value`` also drops a forward-mode
    tangent it may carry; ``graph`` carries the derivatives."""
    return value.detach() + (graph - graph.detach())


_COMPUTED_IN_FORWARD = (
    "fused_ce.cross_entropy: this gradient was computed in the forward (inplace_backward=True, or the "
    "CPU path under torch.compile) and cannot be differentiated again")


def not_differentiable(gradient, message, depends_on=()):
    """``gradient`` behind a node that raises ``message`` if autograd differentiates through it.

    The node also has edges to the tensors in ``depends_on`` (with history), so that
    ``torch.autograd.grad`` with respect to them reaches it and raises; without any,
    only a ``.backward()`` through the gradient does (as with PyTorch's once_differentiable).
    """
    if gradient is None:
        return None
    depends_on = [t for t in depends_on if t is not None and t.requires_grad]
    outputs = torch._C._functions.DelayedError(message, 1 + len(depends_on))(
        gradient.detach().requires_grad_(), *depends_on)
    return outputs[0] if isinstance(outputs, tuple) else outputs


def once_differentiable(message):
    """Decorator for a backward whose gradients have no second derivative.

    Like ``torch.autograd.function.once_differentiable``, but with
    ``create_graph=True`` every gradient raises ``message`` when differentiated,
    also when the upstream gradients need no grad (``autograd.grad``'s default,
    a MAML inner step): there PyTorch's decorator hands out gradients without
    history, and the missing second-order term would go unnoticed.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            return tuple(not_differentiable(o, message) if isinstance(o, torch.Tensor) else o for o in outputs)
        return wrapper
    return decorate


class CrossEntropyFunction(torch.autograd.Function):
    """Fused cross-entropy on batched arguments.

    ``apply(input, target, weight, ignore_index, label_smoothing, reduction,
    z_loss=0.0, softcap=0.0, return_lse=False, inplace_backward=False)`` with
    input ``(N, C, d1, ..., dk)``, target ``(N, d1, ..., dk)`` int64 class
    indices or probabilities shaped like the input, ``reduction`` 0 (none),
    1 (mean) or 2 (sum) and ``softcap`` 0 for none. Returns the loss (shaped
    ``(N, d1, ..., dk)`` for reduction 0), or ``(loss, lse)`` with
    ``return_lse``; lse has that shape too, in the accumulate dtype, and is
    differentiable. Use :func:`fused_ce.cross_entropy` unless you already
    have such arguments: it also takes unbatched input and checks what this
    class trusts (for ``inplace_backward``: a contiguous input, a reduced
    loss, no target gradient, no ``return_lse``).
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, label_smoothing, reduction,
                z_loss=0.0, softcap=0.0, return_lse=False, inplace_backward=False):
        input_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.options = options
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)
        ctx.input_shape, ctx.target_shape = input.shape, target.shape
        input3, target3 = _canonical_views(input, target)
        ctx.inplace = inplace_backward and input_grad
        ctx.gradient_in_forward = ctx.inplace or (
            input_grad
            and not target_grad
            and not return_lse
            and reduction != REDUCTION_NONE
            and input.device.type == "cpu"
        )
        if ctx.inplace:
            if not input.is_contiguous():
                # A reshaped copy would receive the gradient instead of the logits.
                raise ValueError("CrossEntropyFunction: inplace_backward=True needs a contiguous input")
            loss, lse, total_weight = ops.cross_entropy_forward_with_grad_inplace(
                input3, target3, weight, *options, reduction)
            # The logits now hold their gradient. Bumping their version makes
            # autograd reject every other node that saved them; this node's
            # own save below records the new version.
            torch.autograd.graph.increment_version(input)
            ctx.save_for_backward(input)
            ctx.gradient_handed_out = False
        elif ctx.gradient_in_forward:
            loss, lse, total_weight, grad_input = ops.cross_entropy_forward_with_grad(
                input3, target3, weight, *options, reduction)
            ctx.save_for_backward(grad_input)
        else:
            loss, lse, total_weight = ops.cross_entropy_forward(input3, target3, weight, *options)
            if input_grad or target_grad:
                # input and target themselves too: saved inputs keep their
                # autograd history, which a second derivative follows.
                ctx.save_for_backward(input3, target3, weight, lse, total_weight, input, target)
        out, lse = _shape_outputs(loss, lse, total_weight, reduction, input.dtype, _batch_shape(input))
        return (out, lse) if return_lse else out

    @staticmethod
    def backward(ctx, grad_output, grad_lse=None):
        if torch.is_grad_enabled():  # create_graph=True
            return _backward_with_graph(ctx, grad_output, grad_lse)
        return _backward(ctx, grad_output, grad_lse)


class FunctorchCrossEntropyFunction(torch.autograd.Function):
    """The loss under torch.func transforms (grad, vjp, jacrev, vmap, ...).

    They need a forward without ctx and a ``setup_context``; the forward then
    cannot see which gradients will be wanted, so this Function always takes
    the lse path. ``apply(input, target, weight, ignore_index,
    label_smoothing, reduction, z_loss, softcap)`` returns ``(loss, lse,
    total_weight)``. Under vmap the operators run once per batch element
    (functorch's fallback for operators without a batching rule).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap):
        input3, target3 = _canonical_views(input, target)
        loss, lse, total_weight = ops.cross_entropy_forward(
            input3, target3, weight, ignore_index, label_smoothing, z_loss, softcap)
        return _shape_outputs(loss, lse, total_weight, reduction, input.dtype, _batch_shape(input)) + (total_weight,)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, label_smoothing, reduction, z_loss, softcap = inputs
        _, lse, total_weight = output
        ctx.mark_non_differentiable(total_weight)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(input, target, weight, lse, total_weight)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.reduction = reduction
        ctx.input_shape, ctx.target_shape = input.shape, target.shape

    @staticmethod
    def backward(ctx, grad_output, grad_lse, _grad_total_weight):
        if grad_output is None and grad_lse is None:
            return (None, None) + _NO_GRADS_FOR_OPTIONS[:6]
        input, target, weight, lse, total_weight = ctx.saved_tensors
        input3, target3 = _canonical_views(input, target)
        grads = _gradients_from_lse(ctx, input3, target3, weight, lse, total_weight, grad_output, grad_lse)
        return grads[:2] + _NO_GRADS_FOR_OPTIONS[:6]


_NO_GRADS_FOR_OPTIONS = (None,) * 8


def _backward(ctx, grad_output, grad_lse):
    """The gradients for (input, target) and the options, as plain tensors."""
    if grad_output is None and grad_lse is None:  # no output was used
        return (None, None) + _NO_GRADS_FOR_OPTIONS
    if ctx.inplace:
        # A view, not the logits' own tensor: autograd copies a gradient
        # that is the very tensor it accumulates into (a leaf's x.grad).
        gradient = _hand_out_inplace_gradient(ctx, grad_output)
        return (gradient.view(ctx.input_shape), None) + _NO_GRADS_FOR_OPTIONS
    if ctx.gradient_in_forward:
        (grad_input,) = ctx.saved_tensors
        grad_input = _scale_saved_gradient(grad_input, grad_output)
        return (grad_input.reshape(ctx.input_shape), None) + _NO_GRADS_FOR_OPTIONS

    input, target, weight, lse, total_weight = ctx.saved_tensors[:5]
    return _gradients_from_lse(ctx, input, target, weight, lse, total_weight, grad_output, grad_lse)


def _gradients_from_lse(ctx, input, target, weight, lse, total_weight, grad_output, grad_lse):
    """The lse path's backward operator, for the canonical (N, C, D) input and target."""
    n, _, d = input.shape
    lse = lse.reshape(n, d)
    acc = accumulate_dtype(input.dtype)
    if grad_output is None:  # only lse was used
        grad_loss = torch.zeros((), dtype=acc, device=input.device).expand(n, d)
    else:
        grad_loss = grad_output.to(acc)
        if ctx.reduction == REDUCTION_MEAN:
            grad_loss = (grad_loss / total_weight).expand(n, d)
        elif ctx.reduction == REDUCTION_SUM:
            grad_loss = grad_loss.expand(n, d)
        else:
            grad_loss = grad_loss.reshape(n, d)
    if grad_lse is not None:
        grad_lse = grad_lse.to(acc).reshape(n, d)
    input_grad, target_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_target = _backward_operator(
        grad_loss, grad_lse, input, target, weight, lse, *ctx.options, input_grad, target_grad)
    return (grad_input.reshape(ctx.input_shape) if input_grad else None,
            grad_target.reshape(ctx.target_shape) if target_grad else None) + _NO_GRADS_FOR_OPTIONS


def _backward_operator(grad_loss, grad_lse, *operands):
    """``ops.cross_entropy_backward``, also when the upstream gradients carry
    forward-mode tangents (forward-over-reverse with respect to them, as
    gradgradcheck's ``check_fwd_over_rev`` does): the operator is linear in
    ``(grad_loss, grad_lse)``, so the tangent of its result is the operator
    applied to theirs. (Tangents on the logits or targets send the forward
    to ``composite_cross_entropy`` instead.)"""
    if not has_tangent(grad_loss, grad_lse):
        return ops.cross_entropy_backward(grad_loss, grad_lse, *operands)
    duals = [None if g is None else forward_ad.unpack_dual(g) for g in (grad_loss, grad_lse)]
    primal = [None if d is None else d.primal for d in duals]
    tangents = [None if d is None else d.tangent for d in duals]
    if tangents[0] is None:
        tangents[0] = torch.zeros_like(primal[0])
    grads = ops.cross_entropy_backward(*primal, *operands)
    grad_tangents = ops.cross_entropy_backward(*tangents, *operands)
    # An unwanted gradient is an empty placeholder, without a tangent.
    return tuple(g if g.numel() == 0 else forward_ad.make_dual(g, t) for g, t in zip(grads, grad_tangents))


def _backward_with_graph(ctx, grad_output, grad_lse):
    """create_graph=True: the kernel's gradients, carrying the graph of the same
    gradients computed by differentiable torch operations from the saved
    logits (``g + (h - h.detach())``: the value of g, the derivatives of h)."""
    with torch.no_grad():
        grads = _backward(ctx, grad_output, grad_lse)
    if ctx.inplace or ctx.gradient_in_forward:
        # In place, the logits are saved (and hold the gradient): the refusal is
        # reachable from them.
        depends_on = ctx.saved_tensors if ctx.inplace else ()
        return tuple(not_differentiable(g, _COMPUTED_IN_FORWARD, depends_on) for g in grads)
    if grads[0] is None and grads[1] is None:
        return grads
    _, _, weight, _, total_weight, input, target = ctx.saved_tensors
    loss, lse = _differentiable_loss(input, target, weight, ctx.options, ctx.reduction, total_weight)
    outputs, upstream = [], []
    for output, grad in ((loss, grad_output), (lse, grad_lse)):
        if grad is not None:
            outputs.append(output.reshape(grad.shape))
            upstream.append(grad.to(output.dtype))
    wrt = [t for t, needed in zip((input, target), ctx.needs_input_grad[:2]) if needed]
    graphs = iter(torch.autograd.grad(outputs, wrt, upstream, create_graph=True, allow_unused=True))
    result = []
    for g, needed in zip(grads[:2], ctx.needs_input_grad[:2]):
        h = next(graphs) if needed else None
        # (g's own forward-mode tangent, from the upstream gradient, see
        # _backward_operator, is dropped: h's graph carries it already.)
        result.append(g if h is None else _carrying_graph(g, h))
    return tuple(result) + _NO_GRADS_FOR_OPTIONS


def _differentiable_loss(input, target, weight, options, reduction, total_weight):
    """The loss (reduced like the Function's) and lse of the operators, from
    torch operations that autograd differentiates twice; in the accumulate
    dtype. The formulas of csrc/cuda/ce_loss.cuh: per element,
    ``(1 - eps) w_t (lse - y_t) + eps/C sum_c w_c (lse - y_c) + z w_t lse^2``
    (0 when ignored), or ``sum_c w_c q'_c (lse - y_c) + z lse^2`` for
    probabilities, with ``y = softcap * tanh(x / softcap)``."""
    ignore_index, eps, z_loss, softcap = options
    num_classes = input.shape[1]
    acc = accumulate_dtype(input.dtype)
    input3, target3 = _canonical_views(input, target)
    y = input3.to(acc)
    if softcap:
        y = softcap * torch.tanh(y / softcap)
    lse = torch.logsumexp(y, 1)
    minus_log_p = lse.unsqueeze(1) - y
    weight_acc = None if weight is None else weight.to(acc)
    w = None if weight is None else weight_acc.view(1, num_classes, 1)
    if target.is_floating_point():
        q = target3.to(acc)
        if eps:
            q = q * (1 - eps) + eps / num_classes
        loss = ((q if w is None else q * w) * minus_log_p).sum(1) + z_loss * lse.square()
    else:
        counted = target3 != ignore_index
        t = torch.where(counted, target3, 0)
        w_t = torch.ones_like(lse) if w is None else weight_acc[t]
        w_t = torch.where(counted, w_t, 0)
        loss = (1 - eps) * w_t * minus_log_p.gather(1, t.unsqueeze(1)).squeeze(1) + z_loss * w_t * lse.square()
        if eps:
            smoothing = (minus_log_p if w is None else minus_log_p * w).sum(1) * (eps / num_classes)
            loss = loss + torch.where(counted, smoothing, 0)
        loss = torch.where(counted, loss, 0)
    if reduction == REDUCTION_MEAN and not (target.is_floating_point() and loss.numel() == 0):
        loss = loss.sum() / total_weight
    elif reduction == REDUCTION_MEAN:
        # An empty batch of probabilities: PyTorch's mean is NaN, a constant
        # (its tangent is 0); the operator gives the NaN value.
        loss = loss.sum()
    elif reduction == REDUCTION_SUM:
        loss = loss.sum()
    return loss, lse


@torch.library.impl("fused_ce::differentiable_loss", "CompositeImplicitAutograd")
def _differentiable_per_element_loss(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    """The ``differentiable_loss`` operator (csrc/ops.cpp): the C++ node of
    ``reduction="none"`` differentiates this for ``create_graph=True``, so
    that both paths build second derivatives from the same formulas."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    return _differentiable_loss(input, target, weight, options, REDUCTION_NONE, None)[0]


def composite_cross_entropy(input, target, weight, ignore_index, label_smoothing, reduction,
                            z_loss, softcap):
    """``(loss, lse)`` for forward-mode AD and nested torch.func transforms,
    which the Functions cannot differentiate. Arguments as for
    ``FunctorchCrossEntropyFunction``.

    The operator computes the values from detached tensors (so they are
    exactly the fused path's, with its target checks and total weight); they
    carry the graph of the same loss in torch operations (``k + (h -
    h.detach())``: the value of k, the derivatives of h), which any
    transform, at any order, differentiates. As in PyTorch, the loss of
    class-index targets has no derivative for the class weights (a tangent
    on them is dropped; the mean's total weight is a constant here), that
    of probability targets has."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    detached_weight = None if weight is None else weight.detach()
    input3, target3 = _canonical_views(input.detach(), target.detach())
    loss, lse, total_weight = ops.cross_entropy_forward(input3, target3, detached_weight, *options)
    graph_weight = weight if target.is_floating_point() else detached_weight
    graph_loss, graph_lse = _differentiable_loss(input, target, graph_weight, options, reduction, total_weight)
    loss, lse = _shape_outputs(loss, lse, total_weight, reduction, graph_loss.dtype, _batch_shape(input))
    loss = _carrying_graph(loss, graph_loss.reshape(loss.shape)).to(input.dtype)
    return loss, _carrying_graph(lse, graph_lse.reshape(lse.shape))


def _hand_out_inplace_gradient(ctx, grad_output):
    """The gradient that the in-place forward wrote over the logits, scaled
    in place by the upstream gradient. It exists once: a second backward
    through the same graph (retain_graph=True) would find it already scaled
    and handed to the logits' producer, so it is refused."""
    if ctx.gradient_handed_out:
        raise RuntimeError(
            "fused_ce.cross_entropy(inplace_backward=True): the gradient was written over the "
            "logits and has already been used by a previous backward; backpropagating twice "
            "(retain_graph=True) is not supported with inplace_backward=True")
    (gradient,) = ctx.saved_tensors  # raises if the logits were modified after the forward
    ctx.gradient_handed_out = True
    if torch.compiler.is_compiling():
        gradient.mul_(grad_output.to(gradient.dtype))
    elif needs_product(grad_output):
        return gradient * grad_output
    else:
        # Skips the pass when the upstream gradient is 1, on the device for CUDA.
        ops.scale_gradient_(gradient, grad_output)
    return gradient


def _scale_saved_gradient(grad_input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad_input * grad_output for a scalar grad_output, skipping the pass when it is 1.

    Reading the scalar is free on the CPU (no device synchronisation). Under
    torch.compile the value is unknown at trace time, so the product is
    always traced. The saved gradient is never modified in place: with
    ``retain_graph=True`` a second backward must see it unchanged.
    """
    if (not torch.compiler.is_compiling() and grad_output.device.type == "cpu"
            and not needs_product(grad_output) and grad_output.item() == 1.0):
        return grad_input
    return grad_input * grad_output


def needs_product(grad_output: torch.Tensor) -> bool:
    """Whether the scalar upstream gradient is more than one plain number, so
    that the product must be formed (out of place, with differentiable ops):
    one value per element of a vmap (``torch.autograd.grad(...,
    is_grads_batched=True)`` and gradcheck's ``check_batched_grad``, which
    batch with autograd's own key; ``torch.func.vmap`` around a backward),
    which can neither be read on the host nor applied in place; or a
    forward-mode tangent, which skipping a product by 1 would drop."""
    functorch = torch._C._functorch
    return (functorch.is_legacy_batchedtensor(grad_output) or functorch.is_batchedtensor(grad_output)
            or has_tangent(grad_output))
