"""vmap batching rules for the loss operators (``torch.library.register_vmap``).

Without them, ``torch.vmap`` (per-sample gradients: ``vmap(grad(loss))``)
runs an operator once per batch element and warns about it. Each operator
works on rows that are independent of one another, so a rule folds the
vmapped dimension into the operator's row dimension N, ``(B, N, C, D)`` ->
``(B * N, C, D)``, and calls the operator once. The one result that is not
per row, the forward's total weight (the mean's denominator), is computed
per batch element here, in float64 as the operators do. Class weights that
are themselves vmapped cannot be folded; those calls run one batch element
at a time, and so do the reductions of ``reduce_loss`` (one loss per
element, each over its own total weight).

Importing this module registers the rules, with torch 2.6 or newer: in torch
2.5 a rule under two nested vmaps fails an internal assertion of PyTorch's,
so there ``torch.vmap`` runs the operators with PyTorch's own fallback, one
batch element at a time, with its performance warning.
"""

import torch

from ._ops import ops


def _register_vmap(name):
    """``torch.library.register_vmap(name)`` from torch 2.6 on (see above)."""
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        return lambda rule: rule
    return torch.library.register_vmap(name)


def _batch_first(t, dim, batch_size):
    """``t`` with its vmapped dimension first, or expanded along a new first
    dimension when it has none (an argument shared by the batch)."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand((batch_size,) + t.shape)
    return t.movedim(dim, 0)


def _fold(t):
    """(B, N, ...) -> (B * N, ...)."""
    return None if t is None else t.reshape((-1,) + t.shape[2:])


def _unfold(t, batch_size, rows):
    """(B * N, ...) -> (B, N, ...), N = rows (explicit: B or N may be 0)."""
    return t.reshape((batch_size, rows) + t.shape[1:])


def _one_at_a_time(op, batch_size, in_dims, args):
    """The operator on each batch element in turn, results stacked along dim 0."""
    results = []
    for b in range(batch_size):
        element_args = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]
        results.append(op(*element_args))
    return tuple(torch.stack(r) for r in zip(*results))


def total_weight_per_element(target, weight, ignore_index, dtype):
    """The operator's total weight for each of the (B, N, D) or (B, N, C, D)
    targets: the number of positions for probabilities, else the sum of the
    counted targets' class weights (their count without weights). Also the
    DTensor mean's count of each rank's share (fused_ce/dtensor.py)."""
    batch_size = target.shape[0]
    if target.is_floating_point():
        positions = target.shape[1] * target.shape[3]
        return torch.full((batch_size,), float(positions), dtype=dtype, device=target.device)
    counted = target != ignore_index
    if weight is None:
        total = counted.flatten(1).sum(1, dtype=torch.float64)
    else:
        # Out-of-range targets have raised in the operator by now; ignored
        # ones may hold any value, so they index class 0 and count 0.
        class_weight = weight.to(torch.float64)[torch.where(counted, target, 0)]
        total = torch.where(counted, class_weight, 0).flatten(1).sum(1)
    return total.to(dtype)


@_register_vmap("fused_ce::cross_entropy_forward")
def _forward_rule(info, in_dims, input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    options = (ignore_index, label_smoothing, z_loss, softcap)
    batch_size = info.batch_size
    if in_dims[2] is not None:
        if batch_size > 0:
            return _one_at_a_time(ops.cross_entropy_forward, batch_size, in_dims,
                                  (input, target, weight) + options), (0, 0, 0)
        weight = None  # no element to weigh: the folded call gives the empty results' shapes
    input = _batch_first(input, in_dims[0], batch_size)
    target = _batch_first(target, in_dims[1], batch_size)
    rows = input.shape[1]
    loss, lse, _ = ops.cross_entropy_forward(_fold(input), _fold(target), weight, *options)
    total_weight = total_weight_per_element(target, weight, ignore_index, lse.dtype)
    return (_unfold(loss, batch_size, rows), _unfold(lse, batch_size, rows), total_weight), (0, 0, 0)


@_register_vmap("fused_ce::cross_entropy_backward")
def _backward_rule(info, in_dims, grad_loss, grad_lse, input, target, weight, lse, ignore_index,
                   label_smoothing, z_loss, softcap, input_grad, target_grad):
    options = (ignore_index, label_smoothing, z_loss, softcap, input_grad, target_grad)
    batch_size = info.batch_size
    tensors = (grad_loss, grad_lse, input, target, weight, lse)
    # An unwanted gradient is an empty placeholder, the same for every element.
    out_dims = (0 if input_grad else None, 0 if target_grad else None)
    if in_dims[4] is not None:
        if batch_size > 0:
            grad_input, grad_target = _one_at_a_time(ops.cross_entropy_backward, batch_size, in_dims,
                                                     tensors + options)
            return (grad_input if input_grad else grad_input[0],
                    grad_target if target_grad else grad_target[0]), out_dims
        weight = None  # as in the forward rule
    grad_loss, grad_lse, input, target, lse = (
        _batch_first(t, d, batch_size)
        for t, d in zip((grad_loss, grad_lse, input, target, lse), in_dims[:4] + in_dims[5:6]))
    rows = input.shape[1]
    grad_input, grad_target = ops.cross_entropy_backward(
        _fold(grad_loss), _fold(grad_lse), _fold(input), _fold(target), weight, _fold(lse), *options)
    return (_unfold(grad_input, batch_size, rows) if input_grad else grad_input,
            _unfold(grad_target, batch_size, rows) if target_grad else grad_target), out_dims


@_register_vmap("fused_ce::reduce_loss")
def _reduce_loss_rule(info, in_dims, loss, total_weight, reduction, dtype):
    batch_size = info.batch_size
    loss = _batch_first(loss, in_dims[0], batch_size)
    total_weight = _batch_first(total_weight, in_dims[1], batch_size)
    if batch_size == 0:
        return loss.new_empty((0,), dtype=dtype), 0
    return torch.stack([ops.reduce_loss(loss[b], total_weight[b], reduction, dtype) for b in range(batch_size)]), 0
