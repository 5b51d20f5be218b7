"""``fused_ce.cross_entropy`` on DTensors (``torch.distributed.tensor``).

The loss of DTensor logits and targets is the loss of their full tensors,
as for PyTorch's own ``F.cross_entropy`` on DTensors, computed rank by rank
on the local shards with the fused kernels; only O(1) or O(rows) values
cross ranks. Per mesh dimension, by the logits' placement:

* ``Shard`` of a batch dimension (0, or a spatial one): each rank computes
  the loss of its own rows; the targets take the matching placement (they
  are redistributed if they have another). A reduced loss is summed
  locally (the fused forward + backward, one read of the logits) and then
  across the mesh dimension; the mean divides by the total weight of all
  ranks' targets, so it is the full tensors' mean even where ranks hold
  different numbers of ignored targets.
* ``Shard`` of the class dimension (a vocabulary-parallel LM head, as with
  ``loss_parallel``): :func:`fused_ce.vocab_parallel_cross_entropy` over
  that mesh dimension's process group, without gathering a logit; the
  gradient keeps the logits' sharding. It takes class-index targets,
  ``ignore_index``, label smoothing, ``z_loss`` and the softcap, and classes
  that divide evenly among the ranks; otherwise (class weights, probability
  targets, an uneven split) the logits' classes are gathered first, as
  PyTorch does without ``loss_parallel``.
* ``Replicate`` (and ``Partial``, reduced first): every rank computes the
  same loss.
* A mesh dimension of one rank is taken as it is, whatever the placement:
  its local tensors are the full ones.

Results: ``reduction="none"`` gives a DTensor of the batch's shape, sharded
like the logits' batch dimensions; a reduced loss is a replicated 0-d
DTensor (PyTorch returns some as ``Partial``; the values are the same).
``return_lse`` and ``inplace_backward`` are not offered on DTensors.
"""

import math
import sys
from typing import Optional

import torch
from torch import Tensor

from ._vmap import total_weight_per_element
from .autograd import accumulate_dtype


def any_dtensor(*tensors) -> bool:
    """Whether any argument is a DTensor. Free when torch.distributed.tensor
    was never imported (no DTensor can exist then)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def cross_entropy(input, target, weight, ignore_index: int, reduction: str, label_smoothing: float,
                  z_loss: float, softcap: Optional[float], return_lse: bool, inplace_backward: bool,
                  validate: bool):
    """The loss of DTensor arguments (checked options, as ``fused_ce.cross_entropy``
    passes them); see the module's docstring."""
    from torch.distributed.tensor import DTensor, Replicate

    from .distributed import vocab_parallel_cross_entropy
    from .functional import cross_entropy as local_cross_entropy

    if not isinstance(input, DTensor) or not isinstance(target, DTensor):
        kinds = ", ".join(f"{name} is a {type(t).__name__}"
                          for name, t in (("input", input), ("target", target), ("weight", weight)) if t is not None)
        raise RuntimeError(
            f"fused_ce.cross_entropy: got mixed torch.Tensor and DTensor arguments ({kinds}); make input "
            f"and target DTensors on the same device mesh (DTensor.from_local or distribute_tensor)")
    mesh = input.device_mesh
    if target.device_mesh != mesh:
        raise ValueError(f"fused_ce.cross_entropy: input and target are DTensors on different device "
                         f"meshes ({mesh} and {target.device_mesh})")
    if return_lse or inplace_backward:
        raise NotImplementedError("fused_ce.cross_entropy: return_lse and inplace_backward are not "
                                  "supported for DTensor arguments")
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    plan = _Plan(input, target, weight, mesh)
    if tuple(input.placements) != plan.input_placements:
        input = input.redistribute(mesh, plan.input_placements)
    if tuple(target.placements) != plan.target_placements:
        target = target.redistribute(mesh, plan.target_placements)
    x, t = input.to_local(), target.to_local()

    local_reduction = "none" if reduction == "none" else "sum"
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if plan.vocab_mesh_dim is not None:
        classes_last = x if plan.class_dim == x.dim() - 1 else x.movedim(plan.class_dim, -1)
        local = vocab_parallel_cross_entropy(classes_last, t, group=mesh.get_group(plan.vocab_mesh_dim),
                                             reduction=local_reduction, **options)
    else:
        local = local_cross_entropy(x, t, weight, reduction=local_reduction, validate=validate, **options)

    if reduction == "none":
        shape = plan.batch_shape
        return DTensor.from_local(local, mesh, plan.output_placements, run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    # Summed across ranks and divided in the accumulate type, rounded to the
    # logits' dtype once at the end (a rank's own sum is rounded already).
    replicated = tuple(Replicate() for _ in range(mesh.ndim))
    local = local.to(accumulate_dtype(x.dtype))
    total = DTensor.from_local(local, mesh, plan.sum_placements, run_check=False).redistribute(mesh, replicated)
    if reduction == "sum":
        return total.to(x.dtype)
    # The mean: over the total weight of every rank's targets. With none
    # counted (all ignored) PyTorch's mean is NaN and its gradient 0: the
    # sum is multiplied by 0 there and NaN added, rather than divided by 0
    # (whose gradient, inf times the zero gradient, would be NaN).
    local_weight = _local_total_weight(t, weight, ignore_index, plan, local.dtype)
    total_weight = DTensor.from_local(local_weight, mesh, plan.sum_placements,
                                      run_check=False).redistribute(mesh, replicated)
    counted = total_weight != 0
    return (total * torch.where(counted, 1 / total_weight, 0) + torch.where(counted, 0, math.nan)).to(x.dtype)


class _Plan:
    """Where the computation happens: the placements the logits and targets
    take, the mesh dimension (if any) whose ranks split the classes, and the
    placements of the results."""

    def __init__(self, input, target, weight, mesh):
        from torch.distributed.tensor import Partial, Replicate, Shard

        self.class_dim = 0 if input.dim() == 1 else 1
        probabilities = target.dim() == input.dim()
        self.batch_shape = tuple(input.shape[:self.class_dim]) + tuple(input.shape[self.class_dim + 1:])
        self.vocab_mesh_dim = None
        inputs, targets, outputs, sums = [], [], [], []
        for mesh_dim, placement in enumerate(input.placements):
            batch_sharded = isinstance(placement, Shard) and placement.dim % input.dim() != self.class_dim
            dim = placement.dim % input.dim() if isinstance(placement, Shard) else None
            batch_dim = None if dim is None else (dim if dim < self.class_dim else dim - 1)
            if mesh.size(mesh_dim) == 1:
                # One rank: whatever the placements, the local tensors are the full ones.
                inputs.append(placement)
                targets.append(target.placements[mesh_dim])
                outputs.append(Shard(batch_dim) if batch_sharded else Replicate())
                sums.append(Replicate())
                continue
            if batch_sharded:
                # A batch dimension: each rank's own rows.
                inputs.append(Shard(dim))
                targets.append(Shard(dim if probabilities else batch_dim))
                outputs.append(Shard(batch_dim))
                sums.append(Partial())
                continue
            if (isinstance(placement, Shard) and self.vocab_mesh_dim is None
                    and _vocab_parallel_applies(input, probabilities, weight, mesh.size(mesh_dim))):
                self.vocab_mesh_dim = mesh_dim
                inputs.append(placement)
            else:  # replicated, partial, or classes to gather
                inputs.append(Replicate())
            targets.append(Replicate())
            outputs.append(Replicate())
            sums.append(Replicate())
        self.input_placements, self.target_placements = tuple(inputs), tuple(targets)
        self.output_placements, self.sum_placements = tuple(outputs), tuple(sums)


def _vocab_parallel_applies(input, probabilities: bool, weight, ranks: int) -> bool:
    """Whether vocab_parallel_cross_entropy can take logits whose classes are split over ``ranks``."""
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    return not probabilities and weight is None and num_classes % ranks == 0


def _local_total_weight(target: Tensor, weight: Optional[Tensor], ignore_index: int, plan: _Plan,
                        dtype: torch.dtype) -> Tensor:
    """This rank's share of the mean's denominator in ``dtype``, counted as the
    operators count it (total_weight_per_element, on a batch of one in their
    canonical layout). The local loss has been computed first, so an
    out-of-range target has raised there."""
    if target.is_floating_point():  # (1, N, C, D)
        rows = target.shape[0] if plan.class_dim == 1 else 1
        canonical = target.reshape(1, rows, target.shape[plan.class_dim],
                                   math.prod(target.shape[plan.class_dim + 1:]))
    else:  # (1, N * D)
        canonical = target.reshape(1, -1)
    return total_weight_per_element(canonical, weight, ignore_index, dtype)[0]
