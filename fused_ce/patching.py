"""``patch_torch``: route PyTorch's own cross-entropy through the fused kernel.

After ``fused_ce.patch_torch()``, code that calls
``torch.nn.functional.cross_entropy`` through the module attribute, and every
``torch.nn.CrossEntropyLoss`` module, computes with
:func:`fused_ce.cross_entropy` whenever that gives the same result as PyTorch,
and with PyTorch's original function otherwise. Libraries that build their
loss from these (Hugging Face Transformers' ``ForCausalLMLoss`` calls
``nn.functional.cross_entropy(...)``) use the kernel without any change.

What is patched, and why only that
----------------------------------
Exactly one attribute: ``torch.nn.functional.cross_entropy``.

* ``torch.nn.CrossEntropyLoss.forward`` calls ``F.cross_entropy`` where ``F``
  is a global of ``torch.nn.modules.loss`` bound to the module object
  ``torch.nn.functional`` itself, and it looks the attribute up at every call.
  Replacing the attribute therefore covers ``F.cross_entropy(...)`` calls,
  modules constructed after the patch, modules constructed *before* it, and
  subclasses of ``nn.CrossEntropyLoss`` that reach ``super().forward``.
  (Should a future PyTorch bind ``torch.nn.modules.loss.F`` to a different
  namespace, that namespace's ``cross_entropy`` is patched as well.)
* The class ``torch.nn.CrossEntropyLoss`` (the same object as
  ``torch.nn.modules.loss.CrossEntropyLoss``) is deliberately *not* replaced:
  swapping in a subclass would make ``isinstance(old_module,
  torch.nn.CrossEntropyLoss)`` false while patched, would pickle new modules
  as a fused_ce class (unloadable without fused_ce), and classes defined while
  patched would inherit from fused_ce for good. Leaving it alone keeps
  ``type()``, ``isinstance``, ``repr``, pickling and ``state_dict`` exactly
  PyTorch's, before, during and after the patch.

``torch.compile`` traces through the patched function into the fused
operators (``patch_torch`` imports TorchDynamo first, so that it keeps
PyTorch's function, not the wrapper, in its table of opaque graph functions).

Not covered: references taken before the patch
(``from torch.nn.functional import cross_entropy``, ``loss_fn =
F.cross_entropy`` stored somewhere, default arguments), TorchScript code
compiled before the patch, calls to ``torch._C._nn.cross_entropy_loss`` or
``torch.ops.aten.cross_entropy_loss``, and ``F.nll_loss``/``log_softmax``
pairs. Conversely, a reference taken *while* patched keeps pointing at the
wrapper after ``undo()``, which then hands every call to the function it had
replaced.

Fallbacks (PyTorch's original function is called, unchanged)
------------------------------------------------------------
The choice is made per call by :func:`supported`, a cheap predicate on the
arguments (no data is read, no device is synchronised). It is false, and
PyTorch computes the loss (or raises its own error, exactly as unpatched), for:

* TorchScript (``torch.jit.script`` compiles PyTorch's function) and
  ``torch.jit.trace``;
* ``__torch_function__`` overrides and tensor subclasses: any argument that
  is not exactly a ``torch.Tensor`` or ``torch.nn.Parameter`` (DTensor,
  FakeTensor, MaskedTensor, ...), tensor-likes, and active
  ``__torch_function__`` modes (the mode then sees the call, as unpatched);
* ``torch.func`` transforms (vmap, grad, jacrev, ...) and forward-mode AD
  (a ``forward_ad.dual_level`` is open);
* devices other than cpu and cuda (meta, mps, xpu, ...), cuda when fused_ce
  was built without CUDA (:func:`fused_ce.built_with_cuda`), and arguments
  on different devices;
* non-strided layouts (sparse, nested tensors);
* input dtypes other than float16/bfloat16/float32/float64 (integer, bool,
  complex and float8 inputs: PyTorch raises its own error), inputs with zero
  classes, 0-d inputs;
* a ``weight`` that requires grad (PyTorch differentiates with respect to it),
  a weight of the wrong shape, dtype or device;
* class-index targets that are not int64 (PyTorch accepts uint8 on some of
  its code paths and rejects it on others), targets that PyTorch would
  reject (wrong dtype or shape, ``ignore_index`` with probability targets);
* dtype combinations where fused_ce's autocast handling would differ from
  PyTorch's (float64 tensors beside a half input under autocast, a half
  weight beside a float32 input under autocast);
* a ``label_smoothing`` that is not a real number in [0, 1] (PyTorch raises
  above 1 but silently accepts negative and NaN values: that behaviour is
  kept), an ``ignore_index`` that is not a Python int, an unknown
  ``reduction`` or invalid legacy ``size_average``/``reduce`` values.

Known differences that no predicate can see at call time: a second
(double) backward through the loss raises (the fused backward is
once-differentiable; PyTorch's is twice-differentiable), and out-of-range
class indices are reported by fused_ce's kernel (on the CPU the same
``IndexError`` as PyTorch's; on CUDA a device-side assertion, as in PyTorch,
with fused_ce's wording).

Thread safety
-------------
Patching mutates the global module ``torch.nn.functional``: it affects every
thread (and every library) in the process at once, not just the caller's
block; a ``with patch_torch():`` block in one thread also patches calls made
by other threads meanwhile. Patching and undoing are serialised by a lock
(so concurrent patches and undos keep the bookkeeping consistent), and a
call already running finishes with the function it started with; calls
racing with a patch or undo get either the fused or the original function,
which compute the same loss. Prefer patching once at start-up, before worker
threads are started, over patching per step.
"""

import math
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional
import torch.nn.modules.loss
from torch import Tensor
from torch.nn import _reduction

from . import functional as _functional
from ._ops import built_with_cuda
from .autograd import forward_ad_active

__all__ = ["PatchHandle", "patch_torch", "supported", "unsupported_reason"]

_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_HALF_DTYPES = frozenset((torch.float16, torch.bfloat16))
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
_REDUCTIONS = frozenset(("none", "mean", "sum"))
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1

_BUILT_WITH_CUDA: Optional[bool] = None
_LOCK = threading.RLock()


def _cuda_kernels() -> bool:
    global _BUILT_WITH_CUDA
    if _BUILT_WITH_CUDA is None:
        _BUILT_WITH_CUDA = bool(built_with_cuda())
    return _BUILT_WITH_CUDA


def unsupported_reason(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: Any = -100,
    reduce: Any = None,
    reduction: Any = "mean",
    label_smoothing: Any = 0.0,
) -> Optional[str]:
    """Why the patched ``cross_entropy`` would fall back to PyTorch for these
    arguments, or ``None`` when it uses the fused kernel.

    Takes exactly the arguments of :func:`torch.nn.functional.cross_entropy`.
    It only looks at types, dtypes, devices, shapes and flags, never at data.
    """
    # --- execution context ---------------------------------------------
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return "TorchScript scripting or tracing"
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        return "input and target are not both tensors"
    if weight is not None and not isinstance(weight, Tensor):
        return "weight is not a tensor"
    if torch.overrides.has_torch_function_variadic(input, target, weight):
        return "__torch_function__ override or mode"
    if (type(input) not in _PLAIN_TENSOR_TYPES or type(target) not in _PLAIN_TENSOR_TYPES
            or (weight is not None and type(weight) not in _PLAIN_TENSOR_TYPES)):
        return "tensor subclass"
    if _functional.functorch_active():
        return "inside a torch.func transform"
    if forward_ad_active():
        return "forward-mode AD"

    # --- scalar arguments ------------------------------------------------
    if size_average is not None or reduce is not None:
        try:
            reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=False)
        except Exception:  # whatever PyTorch makes of odd legacy values, let it say so
            return "invalid legacy size_average/reduce"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        return "unknown reduction"
    if (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
            or not _INT64_MIN <= ignore_index <= _INT64_MAX):
        return "ignore_index is not a Python int"
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        return "label_smoothing is not a real number"
    label_smoothing = float(label_smoothing)
    if math.isnan(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        return "label_smoothing outside [0, 1]"

    # --- devices and layouts ---------------------------------------------
    device = input.device
    if device.type == "cuda":
        if not _cuda_kernels():
            return "fused_ce was built without CUDA"
    elif device.type != "cpu":
        return f"device type {device.type!r}"
    if target.device != device or (weight is not None and weight.device != device):
        return "arguments on different devices"
    if (input.layout != torch.strided or target.layout != torch.strided
            or (weight is not None and weight.layout != torch.strided)
            or input.is_nested or target.is_nested):
        return "non-strided layout"

    # --- dtypes and shapes -----------------------------------------------
    if input.dtype not in _FLOAT_DTYPES:
        return f"input dtype {input.dtype}"
    if input.dim() == 0:
        return "0-d input"
    unbatched = input.dim() == 1
    num_classes = input.shape[0] if unbatched else input.shape[1]
    if num_classes == 0:
        return "no classes"

    # fused_ce under autocast casts a half input and everything beside it to
    # float32; PyTorch's autocast casts each half/float32 tensor to float32
    # and leaves float64 alone. Where the two disagree, fall back.
    autocast = torch.is_autocast_enabled(device.type)
    casts = autocast and input.dtype in _HALF_DTYPES

    probability_target = target.shape == input.shape
    if probability_target:
        if target.dtype not in _FLOAT_DTYPES:
            return "probability target dtype"
        if ignore_index >= 0:
            return "ignore_index with probability targets"
        if casts and target.dtype == torch.float64:
            return "float64 target beside a half input under autocast"
    else:
        if target.dtype != torch.int64:
            # PyTorch also takes uint8 class indices, but only on some of its
            # code paths (not with (N, C, d1, ...) inputs, nor with weight,
            # label smoothing and mean together): it keeps that to itself.
            return f"class-index target dtype {target.dtype}"
        expected = () if unbatched else (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected and not (unbatched and tuple(target.shape) == (1,)):
            return "target shape"

    if weight is not None:
        if weight.requires_grad:
            return "weight requires grad"
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            return "weight shape"
        if weight.dtype not in _FLOAT_DTYPES:
            return f"weight dtype {weight.dtype}"
        if casts:
            if weight.dtype == torch.float64:
                return "float64 weight beside a half input under autocast"
        elif not probability_target and weight.dtype != input.dtype:
            return "weight dtype differs from input dtype"
    return None


def supported(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: Any = None,
    ignore_index: Any = -100,
    reduce: Any = None,
    reduction: Any = "mean",
    label_smoothing: Any = 0.0,
) -> bool:
    """Whether the patched ``cross_entropy`` computes these arguments with the
    fused kernel (``True``) or hands them to PyTorch's original function.

    Same arguments as :func:`torch.nn.functional.cross_entropy`. See the
    module documentation (and :func:`unsupported_reason`) for the fallbacks.
    """
    return unsupported_reason(input, target, weight, size_average, ignore_index, reduce,
                              reduction, label_smoothing) is None


class _State:
    """Per-patch state the wrapper reads at every call."""

    __slots__ = ("active", "previous")

    def __init__(self, previous: Callable[..., Tensor]):
        self.active = True
        self.previous = previous


def _make_wrapper(previous: Callable[..., Tensor], state: _State) -> Callable[..., Tensor]:
    # The body is written for TorchScript too: while scripting, the
    # ``is_scripting`` branch is dropped at compile time and the compiled
    # function is PyTorch's own (reached through ``previous``).
    def cross_entropy(
        input: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> Tensor:
        if not torch.jit.is_scripting():
            if state.active and unsupported_reason(input, target, weight, size_average, ignore_index,
                                                   reduce, reduction, label_smoothing) is None:
                return _functional.cross_entropy(
                    input, target, weight=weight, size_average=size_average,
                    ignore_index=ignore_index, reduce=reduce, reduction=reduction,
                    label_smoothing=label_smoothing)
        return previous(input, target, weight, size_average, ignore_index, reduce, reduction,
                        label_smoothing)

    cross_entropy.__doc__ = (
        "torch.nn.functional.cross_entropy, patched by fused_ce.patch_torch(): computed by the "
        "fused kernel when fused_ce.patching.supported(...) is true for the arguments, by the "
        "function it replaced otherwise.\n\n" + (getattr(previous, "__doc__", None) or ""))
    cross_entropy._fused_ce_patch_state = state  # type: ignore[attr-defined]
    return cross_entropy


def _patch_state(fn: Any) -> Optional[_State]:
    return getattr(fn, "_fused_ce_patch_state", None)


def _first_live(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Skip fused_ce wrappers that were undone while something sat on top of them."""
    state = _patch_state(fn)
    while state is not None and not state.active:
        fn = state.previous
        state = _patch_state(fn)
    return fn


def _namespaces() -> List[Any]:
    """The namespaces through which PyTorch reaches ``cross_entropy``, each once."""
    found: List[Any] = []
    for ns in (torch.nn.functional, getattr(torch.nn.modules.loss, "F", None)):
        if ns is not None and hasattr(ns, "cross_entropy") and not any(ns is f for f in found):
            found.append(ns)
    return found


class PatchHandle:
    """Undoes one :func:`patch_torch` call; also a context manager.

    ``undo()`` (alias ``remove()``) is idempotent. It restores exactly what
    the patch replaced. Undoing patches out of order is safe: an undone patch
    that something else was installed on top of turns into a pass-through,
    and is skipped when the patch on top of it is undone, so that once every
    patch is undone the original functions are back in place.
    """

    def __init__(self, saved: List[Tuple[Any, str, Callable[..., Tensor], _State]]):
        self._saved = saved

    @property
    def active(self) -> bool:
        """Whether this patch is still in effect (not undone)."""
        return any(state.active for *_, state in self._saved)

    def undo(self) -> None:
        with _LOCK:
            for namespace, name, wrapper, state in self._saved:
                if not state.active:
                    continue
                state.active = False
                if getattr(namespace, name, None) is wrapper:
                    setattr(namespace, name, _first_live(state.previous))
                # else something replaced our wrapper after us: leave that in
                # place; our wrapper now just calls what it replaced.

    remove = undo

    def __enter__(self) -> "PatchHandle":
        if not self.active:
            raise RuntimeError("this fused_ce patch was already undone; call fused_ce.patch_torch() "
                               "again to patch")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"<fused_ce.patching.PatchHandle {'active' if self.active else 'undone'}>"


def _prime_dynamo() -> None:
    """Let torch.compile see the original function before it is replaced.

    TorchDynamo lists ``torch.nn.functional.cross_entropy`` among the
    functions it puts into graphs opaquely, resolving the name to an object
    once, when it is imported. Were that to happen while patched, the wrapper
    would land in compiled graphs as an opaque call that AOTAutograd then
    traces with fake tensors, which makes it fall back to PyTorch every time.
    Importing it first keeps the original in that table, so that compiled
    code traces through the wrapper into the fused operators.
    """
    try:
        from torch._dynamo import trace_rules

        trace_rules.get_torch_obj_rule_map()
    except Exception:  # no or a different TorchDynamo: compiled code just falls back
        pass


def patch_torch() -> PatchHandle:
    """Make ``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss``
    use the fused kernel.

    Returns a :class:`PatchHandle`: call ``handle.undo()`` (or ``remove()``)
    to restore what was there before, or use it as a context manager::

        with fused_ce.patch_torch():
            loss = model(**batch).loss     # Transformers' loss uses fused_ce

    The patch takes effect when ``patch_torch()`` is called (not at
    ``__enter__``). Patches nest: each one wraps what it finds and its undo
    puts that back. Every call still falls back to PyTorch's original function
    where fused_ce cannot reproduce it (see :func:`supported` and this
    module's documentation for the list and for what is covered). The patch
    is global to the process (see "Thread safety" in the module docs).
    """
    _prime_dynamo()
    with _LOCK:
        saved = []
        for namespace in _namespaces():
            previous = namespace.cross_entropy
            state = _State(previous)
            wrapper = _make_wrapper(previous, state)
            namespace.cross_entropy = wrapper
            saved.append((namespace, "cross_entropy", wrapper, state))
        return PatchHandle(saved)
