"""``linear_cross_entropy``: the LM head and the loss in one, without the logits.

``linear_cross_entropy(input, linear_weight, target, ...)`` is
``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``
(the semantics of ``torch.nn.functional.linear_cross_entropy``), computed so
that the ``(N, V)`` logits never exist at once: the rows are processed in
chunks, and a chunk costs one ``(chunk, V)`` buffer.

Per chunk:

1. ``logits = linear(x_chunk, W, b)`` into the chunk buffer (input dtype);
2. ``fused_ce::cross_entropy_forward_with_grad_inplace`` with reduction
   "sum": the per-row losses, and the gradient of their sum written over the
   logits in the same buffer;
3. ``grad_x_chunk = grad_logits @ W``, ``grad_W += grad_logits^T @ x_chunk``,
   ``grad_b += grad_logits.sum(0)``, each only when that tensor needs a
   gradient; the gradients are accumulated in float32 for 16-bit inputs
   (float64 for float64), the first chunk's weight gradient being the
   accumulator itself (nothing is zero-filled and read back). On the CPU the
   GEMMs of 16-bit inputs run in float32 (a float32 staging buffer per
   chunk): CPU 16-bit GEMMs are mostly emulated and many times slower.

With reduction "mean" the gradients are scaled by ``1 / total_weight`` at the
end (the total over all chunks), with PyTorch's results in the degenerate
cases (see :func:`_mean_scale`), in the same pass that rounds them to the
parameters' dtypes. The gradients are computed in the forward and handed to
autograd by the backward, which only multiplies them by the upstream
gradient, in place and not at all when it is 1 (checked on the device on
CUDA; a second backward through the same graph recomputes them). So beyond
its GEMMs a 16-bit LM head's step reads its float32 V x H weight gradient
once per chunk after the first (the GEMM accumulates into it) and once to
round it. When all rows fit in one chunk (the default on CUDA up to 4096
rows) the kernel gives the gradient of the mean or the sum itself and the
GEMMs write the gradients in the parameters' dtype, as eager PyTorch's
backward does: no float32 accumulator at all. With reduction "none" the
upstream gradient is per row, so the
backward recomputes the chunks instead (the forward computes the losses
alone). Under autocast the GEMMs run in the autocast dtype and the loss is
float32, as for ``F.linear`` + ``F.cross_entropy``.

Without anything to differentiate (``torch.no_grad()``, or no tensor that
requires grad) no gradient work is done at all. Forms the chunked path does
not handle (K-dimensional ``linear_weight``, gradients for the class weight
or for probability targets, probability targets of another dtype than the
input, devices other than the input's, autocast with class weights or
probability targets) take the reference path
``fused_ce.cross_entropy(F.linear(...), ...)``, which materialises the logits
and gives PyTorch's results and errors. So do calls under torch.func
transforms or with forward-mode AD tangents, which the chunks' Function
cannot differentiate. Mixed dtypes of input, weight and bias outside
autocast raise F.linear's error first, as PyTorch does.

Under torch.compile the chunks are custom operators that the compiler keeps
whole (traced through, the loop would be unrolled into the graph): for the
mean and the sum ``fused_ce::linear_cross_entropy_chunks`` (the loss and the
gradients, which its backward multiplies by the upstream gradient), for
reduction "none" ``fused_ce::linear_cross_entropy_chunk_losses``, whose
backward recomputes the chunks (``..._chunk_gradients``).
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import accumulate_dtype, ops
from .autograd import has_tangent, needs_product, once_differentiable
from .dtensor import any_dtensor
from .functional import (_check_class_target, _check_llm_options, check_loss_options, cross_entropy,
                         functorch_active)

__all__ = ["linear_cross_entropy", "default_chunk_size"]


_NONE, _MEAN, _SUM = 0, 1, 2
_REDUCTIONS = {"none": _NONE, "mean": _MEAN, "sum": _SUM}
_HALF = (torch.float16, torch.bfloat16)

# Default chunk size (rows of the logits per chunk), see default_chunk_size().
_CHUNK_FRACTION = 16  # a chunk holds 1/16 of the logits ...
_CHUNK_MIN_BYTES = 32 << 20  # ... but its buffers at least 32 MiB (or all N rows) ...
_CHUNK_MAX_BYTES = 64 << 20  # ... and at most 64 MiB
_CUDA_MIN_CHUNK_ROWS = 4096  # on a GPU, at least 4096 rows (or all N): see default_chunk_size()


def default_chunk_size(num_rows: int, num_classes: int, bytes_per_logit: int = 4,
                       device_type: str = "cpu") -> int:
    """Rows per chunk when ``chunk_size`` is None.

    ``N / 16`` rows, clamped so that the chunk's buffers (``bytes_per_logit``
    bytes per logit: the itemsize, plus 4 where a float32 copy is staged) hold
    32 to 64 MiB, at most N rows, rounded down to a multiple of 8 rows.

    * 1/16 of the logits: the other memory of the call is ``N x H`` (gradient
      of the input) plus ``V x H`` (gradient of the weight), much smaller than
      ``N x V`` for an LM head, so the extra peak stays under 1/8 of the
      logits' size.
    * At most 64 MiB: past a few hundred rows a bigger chunk buys no speed,
      so a huge batch does not get huge chunks.
    * At least 32 MiB: every chunk runs three GEMMs against the whole
      ``V x H`` weight, and a GEMM library packs that weight anew for each of
      them; with few rows the packing, not the arithmetic, takes the time
      (on a 2-core AVX2 CPU a 32-row GEMM runs at a fifth of the speed of a
      512-row one). The floor only matters for logits under 512 MiB, where
      memory is not the concern; below 32 MiB of logits there is one chunk.

    * On CUDA, at least 4096 rows (or all N). Each chunk reads the ``V x H``
      weight once per GEMM (three times) and reads and writes the float32
      ``V x H`` gradient accumulator: about 14 bytes per weight element per
      chunk, against 6 c flops per weight element of GEMM work for c rows.
      At an H100's ~700 TFLOP/s (bf16) and ~3 TB/s that traffic costs about
      540 / c of the arithmetic: 256-row chunks (the CPU rule for a 128k
      vocabulary in bfloat16) made the Llama-3 head 3.5x slower than eager
      (``benchmarks/results/gpu-2026-11-26-h100``); 4096 rows keep it near
      an eighth, for a chunk buffer of up to half the logits of an 8192-row
      batch, still far from eager's three logit-sized tensors.

    Examples (float32): N=8192, V=32000 -> 512 rows (62.5 MiB, 1/16 of the
    logits); N=2048, V=32000 -> 256 rows; N=8192, V=128256 -> 128 rows; on
    CUDA, N=8192 -> 4096 rows whatever V.
    """
    if num_rows <= 0:
        return 1
    row_bytes = max(1, num_classes * bytes_per_logit)
    rows = -(-num_rows // _CHUNK_FRACTION)
    rows = min(max(rows, _CHUNK_MIN_BYTES // row_bytes), _CHUNK_MAX_BYTES // row_bytes)
    if device_type == "cuda":
        rows = max(rows, _CUDA_MIN_CHUNK_ROWS)
    if rows > 8:
        rows -= rows % 8
    return max(1, min(num_rows, rows))


# --------------------------------------------------------------------------- the operators


class _Options(NamedTuple):
    """The loss options the kernels take (softcap 0.0 for none)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float


def _chunk_loss(logits: Tensor, target: Tensor, weight: Optional[Tensor], o: _Options) -> Tuple[Tensor, Tensor]:
    """Per-row losses (c, 1) and total weight of one (c, V, 1) chunk; the logits are only read."""
    loss, _lse, total_weight = ops.cross_entropy_forward(
        logits, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap)
    return loss, total_weight


def _chunk_loss_and_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                         o: _Options, reduction: int = _SUM) -> Tuple[Tensor, Tensor]:
    """Same, and the gradient of the sum (or, for a chunk of all the rows, the mean) of the
    chunk's losses overwrites ``logits``."""
    loss, _lse, total_weight = ops.cross_entropy_forward_with_grad_inplace(
        logits, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap, reduction)
    return loss, total_weight


# --------------------------------------------------------------------------- the chunk loop


def _linear_into(out: Tensor, x: Tensor, w: Tensor, b: Optional[Tensor]) -> None:
    """out = F.linear(x, w, b) for 2-D x (the same addmm / mm that F.linear runs)."""
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


# The forms of "float32 acc += 16-bit a @ b" and "float32 a @ b of 16-bit a, b" that failed:
# (device type, dtype of a, form).
_REFUSED_ACCUMULATIONS: set = set()
_aten_addmm = torch.ops.aten.addmm
_aten_mm = torch.ops.aten.mm


def _first_form_accepted(key_head: tuple, forms):
    """The result of the first of ``forms`` ((name, thunk) pairs) that the installed torch
    accepts for these operands, remembering refusals under ``key_head + (name,)``; None when
    every form is refused."""
    for name, form in forms:
        key = key_head + (name,)
        if key in _REFUSED_ACCUMULATIONS:
            continue
        try:
            return form()
        except torch.cuda.OutOfMemoryError:  # (defined in CPU-only builds too)
            raise
        except (RuntimeError, NotImplementedError, AttributeError):
            # Refused before computing (operands unchanged), or an older torch without the overload.
            _REFUSED_ACCUMULATIONS.add(key)
    return None


def _wide_matmul(a: Tensor, b: Tensor, dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """a @ b in ``dtype`` (into ``out`` when given): for 16-bit a and b a float32 GEMM output
    (aten::mm.dtype, which came with addmm.dtype) where the installed torch has one, else the
    16-bit product widened. For the first chunk's weight gradient (no zero-filled accumulator
    to read and add to) and the input gradient's rows (rounded once, at the end, rather than
    also per chunk)."""
    if a.dtype == dtype:
        return torch.mm(a, b, out=out)
    if out is None:
        form = ("mm new tensor", lambda: _aten_mm.dtype(a, b, dtype))
    else:
        form = ("mm into", lambda: _aten_mm.dtype_out(a, b, dtype, out=out))
    product = _first_form_accepted((a.device.type, a.dtype), (form,))
    if product is not None:
        return product
    return torch.mm(a, b).to(dtype) if out is None else out.copy_(torch.mm(a, b))


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc + a @ b with acc wider than a and b (16-bit GEMM, float32 accumulator); returns the sum.

    On CUDA, in place where the installed torch allows (aten::addmm.dtype_out with out=acc:
    newer versions take a float32 ``self`` for 16-bit matrices); else a GEMM that returns the
    float32 sum as a new tensor (aten::addmm.dtype: a second accumulator, the size of the
    weight in float32, for the time of the call); else a 16-bit product rounded before the sum.
    """
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    result = _first_form_accepted((acc.device.type, a.dtype), (
        ("in place", lambda: _aten_addmm.dtype_out(acc, a, b, acc.dtype, out=acc)),
        ("new tensor", lambda: _aten_addmm.dtype(acc, a, b, acc.dtype)),
    ))
    return result if result is not None else acc.add_(torch.mm(a, b))


def _staged(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the GEMMs run in float32 on a staging copy: 16-bit inputs on the CPU, which has
    no fast 16-bit GEMM on most machines (often 5-50x slower than float32). Only the logits
    handed to the kernel are rounded to the input dtype, as a 16-bit GEMM (float32
    accumulation) would."""
    return dtype in _HALF and device.type == "cpu"


def _run_chunks(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                options: _Options, chunk: int, *, need_x: bool = False,
                need_w: bool = False, need_b: bool = False, per_row: bool = False,
                row_grad: Optional[Tensor] = None, one_chunk_of: Optional[int] = None):
    """The loop over row chunks of x (N, H), with w (V, H), b (V,), target (N,) int64 or (N, V).

    Returns ``(loss, total_weight, grad_x, grad_w, grad_b)``: ``loss`` the per-row losses (N,)
    when ``per_row``, else their sum (0-d), in the accumulate dtype; the gradients (None where not
    needed) are those of the *sum* of the per-row losses, each row's term multiplied by
    ``row_grad`` when given, in the accumulate dtype. With ``one_chunk_of`` _MEAN or _SUM (all
    rows in one chunk: see :func:`_reduced_loss_and_gradients`), they are those of that
    reduction, in the input dtype.
    """
    n, h = x.shape
    v = w.shape[0]
    dtype, device = x.dtype, x.device
    acc = accumulate_dtype(dtype)
    want_grad = need_x or need_w or need_b
    staged = _staged(dtype, device)
    mm_dtype = acc if staged else dtype
    # The chunks' sum accumulates in the wider dtype; the reduced gradients of a single chunk
    # are the GEMMs' outputs (in the input dtype where the GEMMs run in it).
    grad_dtype = acc if one_chunk_of is None or staged else dtype
    kernel_reduction = _SUM if one_chunk_of is None else one_chunk_of
    w_mm = w.to(mm_dtype)
    b_mm = None if b is None else b.to(mm_dtype)

    rows = min(chunk, n)
    buf = torch.empty((rows, v), dtype=dtype, device=device)  # the chunk's logits, then their gradient
    buf_mm = torch.empty((rows, v), dtype=mm_dtype, device=device) if staged else None
    loss = torch.empty(n, dtype=acc, device=device) if per_row else torch.zeros((), dtype=acc, device=device)
    total_weight = torch.zeros((), dtype=acc, device=device)
    grad_x = torch.empty((n, h), dtype=grad_dtype, device=device) if need_x else None
    grad_w = None  # the first chunk's product, then the sum (zeros without rows)
    grad_b = torch.zeros(v, dtype=grad_dtype, device=device) if need_b else None

    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c = stop - start
        x_mm = x[start:stop].to(mm_dtype)
        logits = buf[:c]
        if staged:
            _linear_into(buf_mm[:c], x_mm, w_mm, b_mm)
            logits.copy_(buf_mm[:c])
        else:
            _linear_into(logits, x_mm, w_mm, b_mm)
        t = target[start:stop]
        t = t.unsqueeze(-1)  # (c, 1) class indices or (c, V, 1) probabilities
        logits3 = logits.view(c, v, 1)
        if not want_grad:
            chunk_loss, chunk_weight = _chunk_loss(logits3, t, weight, options)
        else:
            chunk_loss, chunk_weight = _chunk_loss_and_grad(logits3, t, weight, options, kernel_reduction)
            grad = logits  # now d(sum, or mean, of the chunk's losses) / d(logits)
            if staged:
                grad = buf_mm[:c].copy_(logits)
            if row_grad is not None:
                grad.mul_(row_grad[start:stop].to(grad.dtype).unsqueeze(1))
            if need_x:
                _wide_matmul(grad, w_mm, grad_dtype, out=grad_x[start:stop])
            if need_w:
                grad_w = (_wide_matmul(grad.t(), x_mm, grad_dtype) if grad_w is None
                          else _add_matmul(grad_w, grad.t(), x_mm))
            if need_b:
                grad_b.add_(grad.sum(0, dtype=acc))
        if per_row:
            loss[start:stop] = chunk_loss.view(c)
        else:
            loss.add_(chunk_loss.sum())
        total_weight.add_(chunk_weight)
    if need_w and grad_w is None:
        grad_w = torch.zeros((v, h), dtype=grad_dtype, device=device)
    return loss, total_weight, grad_x, grad_w, grad_b


def _mean_scale(total_weight: Tensor, valid: Optional[Tensor], n: int) -> Tensor:
    """The factor turning gradients of the sum into gradients of the mean, PyTorch's way.

    ``1 / total_weight`` normally. When the total weight is 0 PyTorch's mean is NaN and its
    gradient is 0 when no element counts (all ignored, or no rows), and NaN when some element
    counts with class weight 0 (0 * (1/0) in nll_loss's backward). No host synchronisation.
    """
    if valid is not None:
        some = valid.any()
    else:
        # A fill on the device, not a copy from the host (which a CUDA graph could not capture).
        some = torch.full((), n > 0, dtype=torch.bool, device=total_weight.device)
    nan = torch.full_like(total_weight, math.nan)
    return torch.where(total_weight != 0, 1 / total_weight,
                       torch.where(some, nan, torch.zeros_like(total_weight)))


def _finish(loss, total_weight, grad_x, grad_w, grad_b, reduction, valid, x, w, b, loss_dtype,
            grads_reduced: bool = False):
    """Reduce the loss, scale the gradients for "mean" (unless ``grads_reduced``: the kernel
    gave them for the mean), cast everything to its dtype."""
    scale = row_scale = None
    if reduction == _MEAN:
        loss = torch.where(total_weight != 0, loss / total_weight, torch.full_like(loss, math.nan))
        if not grads_reduced and any(g is not None for g in (grad_x, grad_w, grad_b)):
            scale = row_scale = _mean_scale(total_weight, valid, x.shape[0])
            if valid is not None:  # ignored rows keep a zero gradient whatever the scale
                row_scale = torch.where(valid, scale, torch.zeros_like(scale)).unsqueeze(1)
    return (loss.to(loss_dtype), _scaled_cast(grad_x, row_scale, x), _scaled_cast(grad_w, scale, w),
            _scaled_cast(grad_b, scale, b))


def _scaled_cast(grad: Optional[Tensor], scale: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    """``(grad * scale).to(like.dtype)`` (``scale`` None: 1) in one pass over ``grad``: in place
    when the dtypes agree, else the product, computed in grad's dtype, rounded as it is
    written. For a 16-bit LM head's weight gradient (V x H float32) a separate scaling would
    read and write the accumulator once more."""
    if grad is None:
        return None
    if scale is None:
        return _cast(grad, like)
    if grad.dtype == like.dtype:
        return grad.mul_(scale)
    return torch.mul(grad, scale, out=torch.empty_like(grad, dtype=like.dtype))


def _cast(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


def _valid_rows(target: Tensor, ignore_index: int) -> Optional[Tensor]:
    return None if target.dim() == 2 else target != ignore_index


def _scale_by(grad: Optional[Tensor], grad_output: Tensor) -> Optional[Tensor]:
    """grad times the scalar upstream gradient: in place, by the scale_gradient_ operator,
    which skips the pass when it is 1 (read for free on the CPU, on the device on CUDA: the
    usual ``loss.backward()`` then costs no pass over the V x H weight gradient); out of
    place where the upstream gradient is batched or carries a tangent (see autograd.needs_product),
    and in a traced backward (compiled autograd), where neither test can run."""
    if grad is None:
        return None
    if torch.compiler.is_compiling() or needs_product(grad_output):
        return grad * grad_output.to(grad.device)
    ops.scale_gradient_(grad, grad_output.to(grad.device))
    return grad


class _LinearCrossEntropy(torch.autograd.Function):
    """The chunked path on canonical arguments: x (N, H), w (V, H), b (V,) or None, target (N,)
    int64 or (N, V) probabilities of x's dtype.

    "mean" and "sum": the forward computes the gradients and keeps them on the context (not
    as saved tensors); the first backward hands them over, scaled by the upstream gradient in
    place, and drops its own reference, so that autograd can take them as the ``.grad``
    without copying them. A further backward through the same graph (``retain_graph=True``,
    gradcheck's reentrancy check) recomputes them from the saved inputs.

    "none": the upstream gradient is per row, so the backward recomputes the chunks, each
    chunk's gradient rows multiplied by their upstream gradient.
    """

    @staticmethod
    def forward(ctx, x, w, b, target, weight, options, reduction, chunk, loss_dtype):
        ctx.reduction = reduction
        ctx.options, ctx.chunk = options, chunk
        ctx.save_for_backward(x, w, b, target, weight)  # only read by a recomputation
        ctx.grads = None
        if reduction == _NONE:
            loss, *_ = _run_chunks(x, w, b, target, weight, options, chunk, per_row=True)
            return loss.to(loss_dtype)
        out, *grads = _reduced_loss_and_gradients(x, w, b, target, weight, options, chunk, reduction,
                                                  ctx.needs_input_grad[:3], loss_dtype)
        ctx.grads = tuple(grads)
        return out

    @staticmethod
    @once_differentiable("fused_ce.linear_cross_entropy: the gradients have no second derivative "
                         "(double backward / create_graph=True); use cross_entropy(F.linear(...)) for that")
    def backward(ctx, grad_output):
        nones = (None,) * 6
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            return tuple(_scale_by(g, grad_output) for g in grads) + nones

        with torch.autocast(grad_output.device.type, enabled=False):  # recompute as in the forward
            return _recompute(ctx, grad_output) + nones


def _recompute(ctx, grad_output):
    """The gradients of a backward that did not get them from the forward."""
    x, w, b, target, weight = ctx.saved_tensors
    options, chunk = ctx.options, ctx.chunk
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.reduction == _NONE:
        return _row_weighted_gradients(x, w, b, target, weight, options, chunk, grad_output,
                                       (need_x, need_w, need_b))
    _, *grads = _reduced_loss_and_gradients(x, w, b, target, weight, options, chunk, ctx.reduction,
                                            (need_x, need_w, need_b), grad_output.dtype)
    return tuple(_scale_by(g, grad_output) for g in grads)


def _row_weighted_gradients(x, w, b, target, weight, options, chunk, row_grad, needed):
    """The gradients of x, w and b (None where not ``needed``) of the per-row losses weighted
    by ``row_grad``, recomputed chunk by chunk, in their dtypes: reduction "none"'s backward."""
    need_x, need_w, need_b = needed
    _, _, gx, gw, gb = _run_chunks(x, w, b, target, weight, options, chunk, need_x=need_x, need_w=need_w,
                                   need_b=need_b, row_grad=row_grad.reshape(-1))
    return _cast(gx, x), _cast(gw, w), _cast(gb, b)


def _reduced_loss_and_gradients(x, w, b, target, weight, options, chunk, reduction, needed, loss_dtype):
    """The mean or sum of the losses and the gradients of x, w and b (None where not
    ``needed``) in their dtypes.

    Over several chunks the gradients of the sum are accumulated in float32 for 16-bit inputs
    and scaled for the mean at the end. When all rows fit in one chunk the kernel gives the
    gradient of the mean or the sum itself, and the GEMMs write the gradients in the
    parameters' dtype, as eager PyTorch's backward does: no wider accumulator to write, read
    and round (for a 16-bit LM head's V x H weight gradient, two passes over it in float32).
    """
    need_x, need_w, need_b = needed
    one_chunk = x.shape[0] <= chunk
    loss, total_weight, gx, gw, gb = _run_chunks(
        x, w, b, target, weight, options, chunk, need_x=need_x, need_w=need_w, need_b=need_b,
        one_chunk_of=reduction if one_chunk else None)
    return _finish(loss, total_weight, gx, gw, gb, reduction, _valid_rows(target, options.ignore_index),
                   x, w, b, loss_dtype, grads_reduced=one_chunk)


# --------------------------------------------------------------------------- under torch.compile


@torch.library.custom_op("fused_ce::linear_cross_entropy_chunks", mutates_args=())
def _chunks_op(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
               ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, reduction: int,
               chunk: int, need_x: bool, need_w: bool, need_b: bool,
               loss_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The mean or sum of the chunked losses and the gradients of x, w and b (empty where not
    needed), as one operator that torch.compile keeps whole: traced through, the chunk loop
    would be unrolled, or (as before this operator) the logits materialised."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    loss, *grads = _reduced_loss_and_gradients(x, w, b, target, weight, options, chunk, reduction,
                                               (need_x, need_w, need_b), loss_dtype)
    return (loss, *_or_empty(x, grads))


def _or_empty(x: Tensor, grads) -> Tuple[Tensor, ...]:
    """The operators' gradients: an empty tensor where one was not needed (an operator cannot
    return None)."""
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_chunks_op.register_fake
def _chunks_op_fake(x, w, b, target, weight, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk,
                    need_x, need_w, need_b, loss_dtype):
    return (x.new_empty((), dtype=loss_dtype), *_fake_gradients(x, (need_x, x), (need_w, w), (need_b, b)))


def _chunks_op_setup_context(ctx, inputs, output):
    ctx.needed = inputs[11:14]
    ctx.save_for_backward(*output[1:])


def _chunks_op_backward(ctx, grad_loss, *_unused_gradients_of_gradients):
    scaled = (g * grad_loss if needed else None for g, needed in zip(ctx.saved_tensors, ctx.needed))
    return (*scaled, *(None,) * 12)


_chunks_op.register_autograd(_chunks_op_backward, setup_context=_chunks_op_setup_context)


@torch.library.custom_op("fused_ce::linear_cross_entropy_chunk_losses", mutates_args=())
def _losses_op(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
               ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk: int,
               loss_dtype: torch.dtype) -> Tensor:
    """The per-row losses (reduction "none") of the chunks, for torch.compile; their backward
    (the operator below) recomputes the chunks with the per-row upstream gradients."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    loss, *_ = _run_chunks(x, w, b, target, weight, options, chunk, per_row=True)
    return loss.to(loss_dtype)


@_losses_op.register_fake
def _losses_op_fake(x, w, b, target, weight, ignore_index, label_smoothing, z_loss, softcap, chunk, loss_dtype):
    return x.new_empty(x.shape[:1], dtype=loss_dtype)


@torch.library.custom_op("fused_ce::linear_cross_entropy_chunk_gradients", mutates_args=())
def _row_gradients_op(x: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                      ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, chunk: int,
                      row_grad: Tensor, need_x: bool, need_w: bool,
                      need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of x, w and b (empty where not needed) of the per-row losses weighted by
    ``row_grad``, recomputed chunk by chunk, in their dtypes."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    return _or_empty(x, _row_weighted_gradients(x, w, b, target, weight, options, chunk, row_grad,
                                                 (need_x, need_w, need_b)))


@_row_gradients_op.register_fake
def _row_gradients_op_fake(x, w, b, target, weight, ignore_index, label_smoothing, z_loss, softcap, chunk,
                           row_grad, need_x, need_w, need_b):
    return _fake_gradients(x, (need_x, x), (need_w, w), (need_b, b))


def _fake_gradients(x, *needed_and_like):
    return tuple(torch.empty_like(like) if needed and like is not None else x.new_empty(0)
                 for needed, like in needed_and_like)


def _losses_op_setup_context(ctx, inputs, output):
    x, w, b, target, weight, *options, chunk, _loss_dtype = inputs
    ctx.save_for_backward(x, w, b, target, weight)
    ctx.options, ctx.chunk = options, chunk
    ctx.needed = (x.requires_grad, w.requires_grad, b is not None and b.requires_grad)


def _losses_op_backward(ctx, grad_losses):
    x, w, b, target, weight = ctx.saved_tensors
    grads = _row_gradients_op(x, w, b, target, weight, *ctx.options, ctx.chunk, grad_losses, *ctx.needed)
    return (*(g if needed else None for g, needed in zip(grads, ctx.needed)), *(None,) * 8)


_losses_op.register_autograd(_losses_op_backward, setup_context=_losses_op_setup_context)


def _compiled_chunks(x, w, b, target, weight, options, reduction, chunk, loss_dtype):
    """linear_cross_entropy under torch.compile: for the mean and the sum the operator that
    returns the gradients with the loss, whose backward multiplies them by the upstream
    gradient (one pass over them even for an upstream gradient of 1, which the Function of
    eager mode skips; Inductor writes the product over the saved gradients, which AOTAutograd
    donates to the backward: no second V x H tensor, checked in its output code with torch
    2.13 on the CPU); for the per-row losses the operator whose backward recomputes the
    chunks."""
    if reduction == _NONE:
        return _losses_op(x, w, b, target, weight, *options, chunk, loss_dtype)
    loss, *_ = _chunks_op(x, w, b, target, weight, *options, reduction, chunk, x.requires_grad,
                          w.requires_grad, b is not None and b.requires_grad, loss_dtype)
    return loss


# --------------------------------------------------------------------------- argument handling


def _check_shapes(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor]) -> None:
    """torch.nn.functional.linear_cross_entropy's checks, with its messages."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(
            f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")


def _reference(input, linear_weight, target, linear_bias, weight, reduction, options: _Options):
    """F.linear + fused_ce.cross_entropy, shaped like torch's reference path (K-dim weights included)."""
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if out_features:
        linear_weight = linear_weight.reshape(math.prod(out_features, start=num_classes), input.shape[-1])
        if linear_bias is not None:
            linear_bias = linear_bias.reshape(math.prod(out_features, start=num_classes))
    logits = F.linear(input, linear_weight, linear_bias)
    logits = logits.reshape((*input.shape[:-1], num_classes, *out_features))
    return cross_entropy(logits, target, weight=weight, ignore_index=options.ignore_index, reduction=reduction,
                         label_smoothing=options.label_smoothing, z_loss=options.z_loss,
                         softcap=options.softcap or None)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    Same results and gradients (for ``input``, ``linear_weight`` and ``linear_bias``) as
    ``torch.nn.functional.linear_cross_entropy`` / its reference path
    ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``, computed in
    row chunks so that the ``(N, V)`` logits never exist at once: extra memory is one chunk of
    logits plus the gradients of ``input`` and ``linear_weight``.

    Args:
        input: ``(H)`` or ``(N, H)`` hidden states (like torch, no other shapes).
        linear_weight: ``(V, H)``; ``(V, d1, ..., dK, H)`` (K-dimensional loss) is accepted and
            computed by the reference path.
        target: class indices ``()`` / ``(N,)`` (int64 or uint8), or class probabilities with
            the logits' shape ``(V)`` / ``(N, V)``.
        linear_bias: ``(V,)`` (``(V, d1, ..., dK)`` for a K-dimensional weight).
        weight: per-class rescaling weight ``(V,)``.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        ignore_index: class index whose targets are ignored (class-index targets only); the
            default ``None`` means -100, as in torch. With probability targets any value given
            (-100 included) raises, as in torch.
        label_smoothing: in [0, 1].
        z_loss, softcap: fused_ce's options for large vocabularies, as in
            :func:`fused_ce.cross_entropy` (not in torch): PaLM's ``z_loss * lse**2`` per row
            and Gemma 2's ``softcap * tanh(logits / softcap)`` on the head's logits.
        chunk_size: rows of the logits per chunk; None picks :func:`default_chunk_size`
            (1/16 of the logits, clamped to 32-64 MiB of chunk buffers).

    For ``"mean"`` and ``"sum"`` the gradients are computed during the forward when anything
    requires grad (the forward then costs about as much as a forward + backward of the unfused
    pair, and the backward almost nothing); a second backward through the same graph
    (``retain_graph=True``) recomputes them. ``"none"`` recomputes the chunks in the backward.
    Under ``torch.compile`` the chunks are traced as custom operators, so a compiled step keeps
    them too.
    """
    if not isinstance(input, Tensor) or not isinstance(linear_weight, Tensor) or not isinstance(target, Tensor):
        raise TypeError("linear_cross_entropy(): input, linear_weight and target must be tensors")
    if any_dtensor(input, linear_weight, linear_bias, target, weight):
        raise NotImplementedError(
            "linear_cross_entropy(): DTensor arguments are not supported; compute the logits (a DTensor) "
            "and pass them to fused_ce.cross_entropy, which takes DTensors, or call this on the local "
            "tensors (DTensor.to_local())")
    _check_shapes(input, linear_weight, linear_bias)
    explicit_ignore_index = ignore_index is not None  # the default None means -100, as in torch
    reduction, ignore_index, label_smoothing = check_loss_options(
        weight, -100 if ignore_index is None else ignore_index, reduction, label_smoothing)
    z_loss, softcap = _check_llm_options(z_loss, softcap, False, False, reduction)
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    num_classes = linear_weight.shape[0]
    logits_shape = (*input.shape[:-1], num_classes, *linear_weight.shape[1:-1])
    if len({t.dtype for t in (input, linear_weight, linear_bias) if t is not None}) > 1 and \
            not torch.is_autocast_enabled(input.device.type):
        # PyTorch computes the logits first, so a dtype mismatch in their
        # product is its first error: the same product over no rows raises it,
        # in F.linear's words.
        F.linear(input[:0] if input.dim() == 2 else input, linear_weight.reshape(-1, linear_weight.shape[-1]),
                 None if linear_bias is None else linear_bias.reshape(-1))
    probs = tuple(target.shape) == logits_shape
    if probs and explicit_ignore_index:  # torch's message
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    if not probs:
        # The target against the logits' shape, before the class weight: for
        # (N, H) or (H) input the input's batch is the logits' (no tensor made);
        # K-dimensional logits are described by a meta tensor (no memory).
        logits_like = input if linear_weight.dim() == 2 else torch.empty(logits_shape, device="meta")
        _check_class_target(logits_like, target, unbatched=input.dim() == 1)
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != num_classes):
        raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes "
                           f"or no classes but got weight tensor of shape: {list(weight.shape)}")

    args = (input, linear_weight, target, linear_bias, weight, reduction, options)
    device = input.device
    grad_mode = torch.is_grad_enabled()
    tensors = [t for t in (input, linear_weight, linear_bias) if t is not None]
    loss_dtype = input.dtype
    if torch.is_autocast_enabled(device.type) and all(t.is_floating_point() for t in tensors):
        # What F.linear + cross_entropy do under autocast: the GEMMs in the autocast dtype,
        # the loss in float32. Class weights and probability targets would be rounded to the
        # autocast dtype on the chunked path: the reference handles them.
        if probs or weight is not None:
            return _reference(*args)
        low = torch.get_autocast_dtype(device.type)
        input, linear_weight, linear_bias = (
            None if t is None else (t.to(low) if t.dtype != torch.float64 else t)
            for t in (input, linear_weight, linear_bias))
        tensors = [t for t in (input, linear_weight, linear_bias) if t is not None]
        loss_dtype = torch.float32 if input.dtype in _HALF else input.dtype
        with torch.autocast(device.type, enabled=False):
            return _chunked_or_reference(input, linear_weight, target, linear_bias, weight, reduction,
                                         options, chunk_size, probs, loss_dtype, tensors, grad_mode)
    return _chunked_or_reference(input, linear_weight, target, linear_bias, weight, reduction, options,
                                 chunk_size, probs, loss_dtype, tensors, grad_mode)


def _chunked_or_reference(input, linear_weight, target, linear_bias, weight, reduction, options,
                          chunk_size, probs, loss_dtype, tensors, grad_mode):
    args = (input, linear_weight, target, linear_bias, weight, reduction, options)
    device, dtype = input.device, input.dtype
    supported = (
        linear_weight.dim() == 2
        and linear_weight.shape[0] > 0  # no classes: PyTorch's results, from the reference
        and dtype.is_floating_point
        and all(t.dtype == dtype and t.device == device for t in tensors)
        and target.device == device
        and (weight is None or (weight.device == device and weight.dtype == dtype
                                and not (grad_mode and weight.requires_grad)))
        and (not probs or (target.dtype == dtype and not (grad_mode and target.requires_grad)))
        # torch.func transforms and forward-mode AD: the reference's
        # cross_entropy differentiates under them; the chunks' Function
        # cannot (and without grad it would drop the tangents).
        and not functorch_active()
        and not has_tangent(*tensors, target, weight)
    )
    if not supported:
        return _reference(*args)

    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    n = x.shape[0]
    v = linear_weight.shape[0]
    if probs:
        t = target.unsqueeze(0) if unbatched else target
    else:
        t = target.reshape(1) if unbatched else target
        t = t.to(torch.int64).contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if chunk_size is None:
        staged = _staged(dtype, device)
        chunk_size = default_chunk_size(n, v, dtype.itemsize + (4 if staged else 0), device.type)
    red = _REDUCTIONS[reduction]

    if grad_mode and torch.compiler.is_compiling():
        loss = _compiled_chunks(x, linear_weight, linear_bias, t, weight, options, red, chunk_size, loss_dtype)
    elif grad_mode and any(t_.requires_grad for t_ in tensors):
        loss = _LinearCrossEntropy.apply(x, linear_weight, linear_bias, t, weight, options, red, chunk_size,
                                         loss_dtype)
    else:  # nothing to differentiate: the losses alone
        loss, total_weight, *_ = _run_chunks(x.detach(), linear_weight.detach(),
                                             None if linear_bias is None else linear_bias.detach(),
                                             t, weight, options, chunk_size, per_row=red == _NONE)
        loss, *_ = _finish(loss, total_weight, None, None, None, red, None, x, linear_weight, linear_bias,
                           loss_dtype)
    if unbatched and red == _NONE:
        loss = loss.reshape(())
    return loss
