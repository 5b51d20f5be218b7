"""``cross_entropy``: PyTorch's argument handling in front of the fused kernel.

Everything user-facing happens here: legacy arguments, PyTorch-style errors,
dtype promotion for soft targets, autocast, and unbatched input (made a batch
of one). Batched arguments then go, as they are, either to the C++ autograd
nodes of the common cases (``_C.cross_entropy_loss``) or to the Python
``CrossEntropyFunction``; see ``_native_path``. Under a reverse-mode
torch.func transform they go to ``FunctorchCrossEntropyFunction``; with
forward-mode AD or nested transforms, to ``composite_cross_entropy``. All
take the operators' canonical ``(N, C, D)`` view themselves. A plain call
(``_plain_call``: the usual training or evaluation call, which no check can
fail) goes to the C++ nodes before any of this.
"""

import math
import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch._C._functorch import TransformType, get_unwrapped, is_functorch_wrapped_tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.nn import _reduction
from torch.overrides import has_torch_function

from . import _C
from .autograd import (REDUCTION_MEAN, REDUCTION_NONE, REDUCTION_SUM, CrossEntropyFunction,
                       FunctorchCrossEntropyFunction, composite_cross_entropy, forward_ad_active,
                       has_tangent)
from .dtensor import any_dtensor
from .dtensor import cross_entropy as dtensor_cross_entropy

_REDUCTIONS = {"none": REDUCTION_NONE, "mean": REDUCTION_MEAN, "sum": REDUCTION_SUM}

# Devices whose gradient from the forward is held until the backward and
# scaled there in place on the device (the scale_gradient_ operator, which
# skips the pass when the upstream gradient is 1 without a host
# synchronisation), rather than saved and scaled unless a free read of the
# upstream gradient shows 1. See csrc/autograd.h. A tuple,
# so that tests can run this strategy on the CPU too.
DEVICE_SCALED_GRADIENT = ("cuda",)

# c10's names for dtypes, which PyTorch's own error messages use.
_DTYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    validate: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Drop-in replacement for :func:`torch.nn.functional.cross_entropy`.

    Same arguments, same results and gradients, computed by one fused
    log-softmax + NLL kernel. ``input`` is ``(C)``, ``(N, C)`` or
    ``(N, C, d1, ..., dk)``; ``target`` holds class indices (int64 or uint8,
    the input's shape without the class axis) or class probabilities (the
    input's shape, floating point).

    Keyword-only options for large-vocabulary training (all off by default):

    * ``z_loss``: adds ``z_loss * lse**2`` per element (PaLM's auxiliary
      loss), where ``lse`` is the log-sum-exp of the element's logits. With
      class-index targets the term carries the target's class weight and is
      0 for ignored elements, so it is reduced exactly like the main loss.
    * ``softcap``: the logits pass through ``softcap * tanh(x / softcap)``
      inside the kernel (Gemma 2's logit soft-capping).
    * ``return_lse``: also return the per-element log-sum-exp (shaped like
      the ``reduction="none"`` loss, float32; float64 for float64 input),
      differentiable.
    * ``inplace_backward``: the gradient is computed in the forward and
      written over the logits, so forward + backward needs O(N) memory
      beyond them. The logits are unusable afterwards: their version
      counter is bumped, and autograd raises its usual in-place error if
      another part of the graph saved them. Needs a reduced loss, no
      ``return_lse`` and no target gradient; does nothing when the logits
      do not require grad.
    * ``validate``: check class-index targets on the host before the kernel
      runs, raising PyTorch's ``IndexError`` ("Target 12 is out of bounds.")
      for one that is neither ``ignore_index`` nor in ``[0, C)``. The CPU
      operators check anyway (there it repeats their check); on CUDA an
      out-of-range target otherwise triggers a device-side assertion, as in
      PyTorch, after which the CUDA context is unusable. The check synchronises with the device, so it is off by
      default (and it cannot be captured in a CUDA graph).

    DTensor input and target (``torch.distributed.tensor``) give the loss of
    their full tensors, computed shard by shard; see :mod:`fused_ce.dtensor`.
    """
    plain = _plain_call(input, target, weight, size_average, reduce, ignore_index, reduction,
                        label_smoothing, z_loss, softcap, return_lse or inplace_backward or validate)
    if plain is not None:
        return _C.cross_entropy_loss(input, target, weight, ignore_index, label_smoothing, z_loss,
                                     0.0 if softcap is None else softcap, *plain)
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    reduction, ignore_index, label_smoothing = check_loss_options(
        weight, ignore_index, reduction, label_smoothing, tensors=(("input", input), ("target", target)))
    z_loss, softcap = _check_llm_options(z_loss, softcap, return_lse, inplace_backward, reduction)
    if any_dtensor(input, target, weight):
        return dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                     None if softcap == 0.0 else softcap, return_lse, inplace_backward,
                                     validate)
    # Like PyTorch, a target with the input's shape holds class probabilities;
    # any other shape holds class indices (the dims first: the cheaper test).
    probability_target = target.dim() == input.dim() and target.shape == input.shape
    if input.dim() == 0:
        # PyTorch's exception types, whatever the logits' dtype: a 0-d integer
        # target is taken for class probabilities and refused as such;
        # anything else fails when the class dimension is looked up.
        if probability_target and not target.is_floating_point():
            raise _target_not_probabilities(target)
        raise IndexError("cross_entropy(): input must have at least one dimension (the classes), "
                         "got a 0-d tensor")
    # PyTorch finds integer logits in its log_softmax: after the checks of the
    # class probabilities' path (below), before those of the class indices'.
    # Empty logits skip that kernel: then the class indices' checks come
    # first, and nll_loss's kernel refuses the dtype (below); class
    # probabilities make them floating point.
    if not input.is_floating_point() and not probability_target and input.numel() > 0:
        raise _logits_not_implemented(input)
    device = input.device
    if target.device != device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found input on "
                           f"{device} and target on {target.device}")

    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device.type):
        # cross_entropy is on autocast's float32 list: PyTorch computes it in
        # float32 under autocast, and so do we.
        input = input.float()
        if weight is not None:
            weight = weight.float()
        if target.is_floating_point():
            target = target.float()

    unbatched = input.dim() == 1
    num_classes = input.shape[0] if unbatched else input.shape[1]

    if probability_target:
        if not target.is_floating_point():
            raise _target_not_probabilities(target)
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        # PyTorch's soft-target formula promotes logits, probabilities and
        # weight to a common dtype (float32 logits + float64 targets -> float64).
        weight = _check_weight(weight, input, num_classes, check_dtype=False)
        if not input.is_floating_point() and input.numel() > 0:
            raise _logits_not_implemented(input)  # (empty integer logits are promoted, as in PyTorch)
        common = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            common = torch.promote_types(common, weight.dtype)
            weight = weight.to(common)
        input, target = input.to(common), target.to(common)
    else:
        if (weight is not None and weight.dim() != 1 and input.dim() >= 3 and label_smoothing == 0.0
                and weight.numel() == num_classes):
            # PyTorch's K-dimensional path (nll_loss2d) checks only the weight's
            # element count: a (1, C) weight works there, so it works here.
            weight = weight.reshape(num_classes)
        _check_class_target(input, target, unbatched)
        # (The weight's dtype against empty integer logits: their dtype is the fault, below.)
        weight = _check_weight(weight, input, num_classes, check_dtype=input.is_floating_point())
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect "
                               "to argument 'weight'. This input cannot have requires_grad True.")
        if not input.is_floating_point():
            raise _logits_not_implemented(input)  # empty integer logits (see above)
        if target.dtype != torch.int64:
            target = target.long()
        if validate:
            _check_targets_in_range(target, num_classes, ignore_index)

    if num_classes == 0:
        return _zero_class_loss(input, target, weight, ignore_index, reduction, label_smoothing,
                                z_loss, softcap, return_lse)

    if unbatched:
        # A batch of one; CrossEntropyFunction takes the (N, C, D) view itself.
        input = input.unsqueeze(0)
        target = target.unsqueeze(0) if probability_target else target.reshape(1)

    if not torch.is_grad_enabled():
        # Inside autograd.Function.forward, needs_input_grad still reflects
        # requires_grad under no_grad: detaching keeps the kernels from
        # computing (or, in place, writing) a gradient nobody can use.
        input, target = input.detach(), target.detach()
    if inplace_backward and target.requires_grad:
        raise ValueError("cross_entropy(): inplace_backward=True cannot give a gradient for the "
                         "target (target.requires_grad is True)")
    if inplace_backward and input.requires_grad and not input.is_contiguous():
        # The kernel overwrites a contiguous buffer: here a copy, so the
        # caller's logits stay intact (and so does the memory saving's cost).
        input = input.contiguous()

    reduction_code = _REDUCTIONS[reduction]
    # Under torch.func transforms and forward-mode AD the gradient cannot be
    # written over logits that a transform wraps: inplace_backward only saves
    # memory elsewhere and is ignored here.
    in_transform = functorch_active()
    # PyTorch's loss of probability targets is differentiable with respect to
    # the class weights (that of class indices is not: the kernels refuse
    # it). The kernels give no weight gradient, so such a call is built from
    # torch operations, which do (inplace_backward does not apply).
    weight_gradient = (probability_target and weight is not None and weight.requires_grad
                       and torch.is_grad_enabled())
    if in_transform or weight_gradient or has_tangent(input, target, weight):
        arguments = (input, target, weight, ignore_index, label_smoothing, reduction_code, z_loss, softcap)
        if in_transform and not weight_gradient and not _functorch_needs_composite(input, target, weight):
            # A single reverse-mode transform (grad, vjp, jacrev; under vmap or
            # not) needs a Function with setup_context.
            loss, lse, _ = FunctorchCrossEntropyFunction.apply(*arguments)
        else:
            loss, lse = composite_cross_entropy(*arguments)
        result = (loss, lse) if return_lse else loss
    elif _native_path(input, target, weight, return_lse, inplace_backward):
        result = _C.cross_entropy_loss(input, target, weight, ignore_index, label_smoothing,
                                       z_loss, softcap, reduction_code,
                                       device.type in DEVICE_SCALED_GRADIENT)
    else:
        result = CrossEntropyFunction.apply(input, target, weight, ignore_index, label_smoothing,
                                            reduction_code, z_loss, softcap, bool(return_lse),
                                            bool(inplace_backward))
    if not unbatched:
        return result
    # reduction="none" gives a batch of one: the unbatched loss is its element.
    if return_lse:
        loss, lse = result
        return (loss.squeeze(0) if reduction == "none" else loss), lse.squeeze(0)
    return result.squeeze(0) if reduction == "none" else result


# What the plain-call test below (and _native_path) asks of the interpreter, bound once.
_PLAIN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_is_compiling = torch.compiler.is_compiling


def _plain_call(input, target, weight, size_average, reduce, ignore_index, reduction,
                label_smoothing, z_loss, softcap, other_options) -> Optional[Tuple[int, bool]]:
    """The C++ node's last two arguments (the reduction's code and whether
    the gradient is scaled on the device) when the call is a plain one,
    which every check and routing decision of ``cross_entropy`` would pass
    unchanged to that node; else None, and ``cross_entropy`` makes them all.

    A plain call: ``(N, C)`` logits of a floating dtype (16-bit ones outside
    autocast) with ``C > 0``, an int64 ``(N,)`` target on their device, no
    weight or a contiguous ``(C,)`` one of their dtype and device that does
    not require grad; ``ignore_index`` an int, ``label_smoothing`` a float
    in [0, 1], ``z_loss`` a finite float >= 0, ``softcap`` None or a finite
    float > 0, no legacy argument and none of ``return_lse``,
    ``inplace_backward``, ``validate`` (``other_options``); plain
    ``torch.Tensor`` arguments, and no torch function mode, torch.func
    transform, forward-mode AD or torch.compile tracing.
    None of the checks can fail for such a call, so skipping them changes
    no result and saves about a quarter of a small forward's host time
    (``benchmarks/per_call_cost.py``). Type and value tests only, no tensor
    operation.
    """
    if (_is_compiling() or size_average is not None or reduce is not None or other_options
            or type(input) is not Tensor or type(target) is not Tensor or type(reduction) is not str
            or type(ignore_index) is not int
            or type(label_smoothing) is not float or not 0.0 <= label_smoothing <= 1.0
            or type(z_loss) is not float or not 0.0 <= z_loss < math.inf
            or (softcap is not None and not (type(softcap) is float and 0.0 < softcap < math.inf))):
        return None
    reduction_code = _REDUCTIONS.get(reduction)
    dtype = input.dtype
    if (reduction_code is None or input.dim() != 2 or target.dim() != 1 or target.dtype is not torch.int64
            or dtype not in _PLAIN_DTYPES):
        return None
    batch, num_classes = input.shape
    device = input.device
    if num_classes == 0 or target.shape[0] != batch or target.device != device:
        return None
    if weight is not None and not (type(weight) is Tensor and weight.dim() == 1 and weight.shape[0] == num_classes
                                   and weight.dtype is dtype and weight.device == device
                                   and not weight.requires_grad and weight.is_contiguous()):
        return None
    if dtype in _HALF_DTYPES and torch.is_autocast_enabled(device.type):
        return None
    # The full path's routing last: outside transforms and forward-mode AD,
    # the node's own conditions.
    if (functorch_active() or forward_ad_active()
            or not _native_path(input, target, weight, False, False)):
        return None
    return reduction_code, device.type in DEVICE_SCALED_GRADIENT


def _logits_not_implemented(input: Tensor) -> Exception:
    """PyTorch's error for logits that are not floating point: a NotImplementedError,
    or a RuntimeError with the older torch releases that raised those for a dtype a
    kernel lacks (2.5 does; asked of torch itself, once, on this error path)."""
    global _missing_dtype_error
    if _missing_dtype_error is None:
        try:
            torch.log_softmax(torch.zeros(1, dtype=torch.int64), 0)
            _missing_dtype_error = NotImplementedError  # (accepted: unreachable)
        except Exception as error:  # noqa: BLE001 - the type is the answer
            _missing_dtype_error = type(error)
    return _missing_dtype_error(f'"cross_entropy" not implemented for \'{_dtype_name(input.dtype)}\'')


_missing_dtype_error: Optional[type] = None


def _target_not_probabilities(target: Tensor) -> RuntimeError:
    """PyTorch's error for a target of the input's shape (class probabilities) that is not
    floating point."""
    return RuntimeError(f"Expected floating point type for target with class probabilities, got "
                        f"{_dtype_name(target.dtype)}")


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is active: the check
    autograd.Function.apply itself makes (it also traces cleanly under
    torch.compile, unlike peeking at the interpreter stack)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and bool(active())


def _functorch_needs_composite(*tensors: Optional[Tensor]) -> bool:
    """Whether the active torch.func transforms ask for derivatives that the
    Functions cannot give, so that the loss takes composite_cross_entropy:
    forward mode (jvp, jacfwd, hessian), two nested reverse-mode transforms
    (grad of grad), or a tensor under the transforms that requires grad
    outside them (torch.autograd over torch.func.grad)."""
    kinds = [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]
    if TransformType.Jvp in kinds or kinds.count(TransformType.Grad) > 1:
        return True
    for t in tensors:
        while t is not None and is_functorch_wrapped_tensor(t):
            t = get_unwrapped(t)
        if t is not None and t.requires_grad:
            return True
    return False


def _native_path(input: Tensor, target: Tensor, weight: Optional[Tensor], return_lse: bool,
                 inplace_backward: bool) -> bool:
    """Whether the call can take the C++ autograd nodes (``_C.cross_entropy_loss``,
    csrc/autograd.h) rather than the Python ``CrossEntropyFunction``.

    The nodes cover what a training step or an evaluation needs: the loss
    alone, and a gradient only for the input, of a reduced loss or per
    element. On the CPU machine they save 14-19 microseconds of a 4 x 10
    training step, half of it (benchmarks/results/cpu-2026-11-27-per-element/).
    The Python Function takes everything else: target gradients,
    ``return_lse``, ``inplace_backward``, torch.compile
    (which traces Python Functions, not C++ nodes) and tensors that
    override ``__torch_function__``. Only asked outside torch.func
    transforms and for inputs without forward-AD tangents (the node would
    drop them), which ``cross_entropy`` routes first.
    """
    if return_lse or inplace_backward or _is_compiling():
        return False
    if torch.is_grad_enabled() and target.requires_grad:
        return False
    tensors = (input, target) if weight is None else (input, target, weight)
    return not has_torch_function(tensors)


def check_loss_options(weight, ignore_index, reduction, label_smoothing,
                       tensors: Tuple[Tuple[str, object], ...] = ()) -> Tuple[str, int, float]:
    """The options shared with ``nn.CrossEntropyLoss``, checked as PyTorch
    does and in its order: the reduction first (``"elementwise_mean"`` is a
    deprecated "mean", with PyTorch's warning; F.cross_entropy converts it
    before the call), then the argument types in the order of the
    ``aten::cross_entropy_loss`` arguments (a ``TypeError`` with the message
    of its argument parser): ``tensors`` (the (name, value) pairs of its
    leading tensor arguments, input and target), weight, ignore_index,
    label_smoothing; then label smoothing in [0, 1]. Returns the reduction,
    ``ignore_index`` as an int and ``label_smoothing`` as a float."""
    if reduction == "elementwise_mean":
        _reduction.get_enum(reduction)  # the warning
        reduction = "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    for position, (name, value) in enumerate(tensors, 1):
        if not isinstance(value, Tensor):
            raise TypeError(_argument_type_message(name, position, "Tensor", value))
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(_argument_type_message("weight", 3, "Tensor", weight))
    ignore_index = _int_argument(ignore_index, "ignore_index", 5)
    label_smoothing = _float_argument(label_smoothing, "label_smoothing", 6)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return reduction, ignore_index, label_smoothing


def _type_name(value) -> str:
    """A type as PyTorch's argument errors name it: "float", "Tensor", "numpy.float64"."""
    cls = type(value)
    if cls.__module__ == "builtins" or cls.__module__.startswith("torch"):
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def _argument_type_message(name: str, position: int, expected: str, value) -> str:
    # PyTorch's words: its parser checks the arguments of aten::cross_entropy_loss.
    return (f"cross_entropy_loss(): argument '{name}' (position {position}) must be {expected}, "
            f"not {_type_name(value)}")


def _int_argument(value, name: str, position: int) -> int:
    """An int argument as PyTorch's argument parser takes it: anything with
    ``__index__`` (Python and NumPy integers, one-element integer tensors)
    but bool."""
    if type(value) is int:  # the usual case, first
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(_argument_type_message(name, position, "int", value))


def _float_argument(value, name: str, position: int) -> float:
    """A float argument as PyTorch's argument parser takes it: real numbers
    (bool, NumPy scalars and one-element tensors included), not strings nor
    a tensor that requires grad."""
    if type(value) is float:  # the usual case, first
        return value
    if not isinstance(value, (str, bytes)) and not (isinstance(value, Tensor) and value.requires_grad):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise TypeError(_argument_type_message(name, position, "float", value))


def _check_llm_options(z_loss, softcap, return_lse: bool, inplace_backward: bool,
                       reduction: str) -> Tuple[float, float]:
    """Validates the keyword-only options; returns z_loss and the kernel's
    softcap (0.0 for none)."""
    z_loss = float(z_loss)
    # Chained comparisons rather than math.isfinite, which torch.compile
    # cannot trace; NaN fails them too.
    if not 0.0 <= z_loss < math.inf:
        raise ValueError(f"cross_entropy(): z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is None:
        softcap = 0.0
    else:
        softcap = float(softcap)
        if not 0.0 < softcap < math.inf:
            raise ValueError(f"cross_entropy(): softcap must be None or a finite number > 0, "
                             f"got {softcap}")
    if inplace_backward:
        if reduction == "none":
            raise ValueError("cross_entropy(): inplace_backward=True needs reduction='mean' or "
                             "'sum' (the gradient is computed in the forward for an upstream "
                             "gradient of 1 and scaled by the scalar one in the backward)")
        if return_lse:
            raise ValueError("cross_entropy(): inplace_backward=True cannot be combined with "
                             "return_lse=True (the gradient would have to wait for the lse's)")
    return z_loss, softcap


def _zero_class_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                     reduction: str, label_smoothing: float, z_loss: float, softcap: float,
                     return_lse: bool) -> Tensor:
    """An input with no classes: nothing for a kernel to compute. PyTorch
    defines the results by its formulas (per element 0, or NaN with label
    smoothing; a NaN mean; its IndexError for a target that is not
    ignored), so its own CPU operator gives them, exactly; the argument
    checks above are done. Its CUDA kernels are not used: for a (0,) input
    their mean is not the formula's NaN (which every fused_ce kernel gives
    for an all-ignored mean), and they report a bad target as a device-side
    assertion. Nothing is computed, so the copies are of empty tensors and
    of the target (one synchronisation, in a call with no classes only).
    The fused-only options have no value without a class."""
    if z_loss != 0.0 or softcap != 0.0 or return_lse:
        raise ValueError("cross_entropy(): z_loss, softcap and return_lse need at least one class, "
                         f"got input of shape {list(input.shape)}")
    on_cpu = [None if t is None else t.cpu() for t in (input, target, weight)]
    loss = torch._C._nn.cross_entropy_loss(*on_cpu, _reduction.get_enum(reduction), ignore_index,
                                           label_smoothing)
    return loss.to(input.device)


def _check_targets_in_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """validate=True: PyTorch's CPU error for the first class target that is neither
    ignore_index nor in [0, C), checked where the targets live (one synchronisation)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise IndexError(f"Target {value} is out of bounds.")


def _check_weight(weight: Optional[Tensor], input: Tensor, num_classes: int,
                  check_dtype: bool) -> Optional[Tensor]:
    """The class weights checked as PyTorch does: C of them, on the input's
    device; with ``check_dtype`` (class-index targets) of the input's dtype,
    else (class probabilities, where PyTorch multiplies and promotes) of any
    real dtype, integers and bool included."""
    if weight is None:
        return None
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes "
                           f"or no classes but got weight tensor of shape: {list(weight.shape)}")
    if weight.is_complex() or (check_dtype and weight.dtype != input.dtype):
        raise RuntimeError(f"expected scalar type {_dtype_name(input.dtype)} but found "
                           f"{_dtype_name(weight.dtype)}")
    if weight.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found input on "
                           f"{input.device} and weight on {weight.device}")
    return weight.contiguous()


def _check_class_target(input: Tensor, target: Tensor, unbatched: bool) -> None:
    """A class-index target checked in PyTorch's order, which decides which of
    its messages a wrong target gets: the shape (a float target of the wrong
    shape is a shape error; of an (N, C, H, W) input's target only the batch
    and the dimensions), then the dtype and the size of the 1-D target of a
    (C,) input or the spatial size of an (N, C, H, W) input's target, in the
    order of the installed torch."""
    _check_class_target_shape(input, target, unbatched)
    wrong_size = unbatched and target.dim() == 1 and target.shape[0] != 1
    wrong_spatial_size = input.dim() == 4 and target.shape[1:] != input.shape[2:]
    if (wrong_size or wrong_spatial_size) and not _torch_checks_target_dtype_first():
        _raise_target_size(input, target, wrong_size)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}")
    if wrong_size or wrong_spatial_size:
        _raise_target_size(input, target, wrong_size)


def _raise_target_size(input: Tensor, target: Tensor, unbatched_size: bool) -> None:
    """The size error of an unbatched input's 1-D target, or of an (N, C, H, W)
    input's (N, H', W') target (PyTorch's nll_loss2d, in its words; torch
    before 2.11 words the first as nll_loss does, see _torch_checks_target_dtype_first)."""
    if unbatched_size and _unbatched_size_as_mismatch:
        raise RuntimeError(f"size mismatch (got input: {list(input.shape)}, target: {list(target.shape)})")
    if unbatched_size:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}")


_target_dtype_first: Optional[bool] = None
_unbatched_size_as_mismatch = False


def _torch_checks_target_dtype_first() -> bool:
    """Whether the installed torch reports a wrong target dtype before a
    wrong target size (of an unbatched input's 1-D target, or of an (N, C,
    H, W) input's target): torch 2.13 checks the dtype first; torch 2.11
    only finds it in the kernel, after every size check (and words it
    "expected scalar type Long but found Int"), and so does torch 2.4-2.5,
    whose nll_loss refuses every 1-D target of an unbatched input, (1,)
    included, as a "size mismatch" (_unbatched_size_as_mismatch). Asked of torch
    itself, once, and only on these error paths: a float (2,) target for a
    (3,) input has both faults."""
    global _target_dtype_first, _unbatched_size_as_mismatch
    if _target_dtype_first is None:
        try:
            torch._C._nn.cross_entropy_loss(torch.zeros(3), torch.zeros(2), None, 1, -100, 0.0)
            _target_dtype_first = True  # (accepted: unreachable; keep the newer order)
        except Exception as error:  # noqa: BLE001 - any of torch's messages answers the question
            message = str(error)
            _target_dtype_first = "must have size 1" not in message and "size mismatch" not in message
            _unbatched_size_as_mismatch = "size mismatch" in message
    return _target_dtype_first


def _check_class_target_shape(input: Tensor, target: Tensor, unbatched: bool) -> None:
    """PyTorch's shape rules (and messages) for class-index targets."""
    if input.dim() == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]:
        return  # the common (N, C) case, decided in a fraction of the general check's time
    if unbatched:
        # (The size of a 1-D target: _check_class_target, in the installed torch's order.)
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        return
    batch = target.shape[0] if target.dim() > 0 else 0
    if batch != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({batch}).")
    if input.dim() == 2 and target.dim() == 0 and (target.dtype in (torch.int64, torch.uint8)
                                                   or not _torch_checks_target_dtype_first()):
        # (Only with a batch of 0, which the size check above lets through; a
        # target of another dtype is refused for that first where torch checks
        # the dtype first.)
        raise IndexError("Dimension specified as 0 but tensor has no dimensions")
    if input.dim() == 2 and target.dim() != 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input.dim() == 4:  # nll_loss2d: the target's dimensions here, its size in _check_class_target
        if target.dim() != 3:
            raise RuntimeError("only batches of spatial targets supported (3D tensors) but got targets of "
                               f"dimension: {target.dim()}")
        return
    expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
