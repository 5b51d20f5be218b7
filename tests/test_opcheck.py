"""The registered operators torch.ops.fused_ce.*: torch.library.opcheck and direct value checks.

opcheck verifies schema correctness (no hidden mutation/aliasing), the fake (meta) kernels against
the real ones (shapes, dtypes, strides), that no autograd is hidden inside the backend kernels, and
that AOT dispatch with dynamic shapes works.  The value tests pin each operator's outputs to an
independent torch computation (the operator contract: csrc/ops.cpp and csrc/cross_entropy.h).
"""

import pytest
import torch
import torch.nn.functional as F

import fused_ce  # noqa: F401  (registers torch.ops.fused_ce)
from conftest import assert_close_ref, make_class_target, make_logits, make_prob_target, make_weight

OPS = ["cross_entropy_forward", "cross_entropy_forward_with_grad", "cross_entropy_forward_with_grad_inplace",
       "cross_entropy_backward"]
NO_Z_LOSS, NO_SOFTCAP = 0.0, 0.0


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _op(name):
    return getattr(torch.ops.fused_ce, name).default


# --------------------------------------------------------------------------
# Canonical (N, C, D) sample arguments with various strides.


def _input3(N, C, D, dtype, device, layout):
    if layout == "contiguous":
        return make_logits((N, C, D), dtype, device)
    if layout == "class_last":  # (N, D, C) buffer viewed as (N, C, D): class stride 1
        return make_logits((N, D, C), dtype, device).permute(0, 2, 1)
    if layout == "sliced":  # every second batch row and class
        return make_logits((2 * N, 2 * C, D), dtype, device)[::2, ::2]
    if layout == "expanded":  # batch stride 0
        return make_logits((1, C, D), dtype, device).expand(N, C, D)
    raise AssertionError(layout)


def _class_target(N, D, C, device, layout, ignore_index):
    t = make_class_target((N, D), C, device, ignore_index=ignore_index, ignore_frac=0.3)
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "expanded":
        t = t[:1].expand(N, D)
    return t


def _prob_target(N, C, D, dtype, device, layout):
    if layout == "transposed":
        return make_prob_target((N, D, C), dtype, device).permute(0, 2, 1)
    if layout == "expanded":
        return make_prob_target((1, C, D), dtype, device).expand(N, C, D)
    return make_prob_target((N, C, D), dtype, device)


SAMPLES = [
    # (id, N, C, D, dtype, input layout, target kind, target layout, weight, ignore_index, label_smoothing)
    ("cls-f32-contig", 4, 5, 3, torch.float32, "contiguous", "class", "contiguous", False, -100, 0.0),
    ("cls-f32-weight-ls", 4, 5, 3, torch.float32, "contiguous", "class", "contiguous", True, -100, 0.1),
    ("cls-f64-classlast-ignore2", 3, 70, 2, torch.float64, "class_last", "class", "transposed", True, 2, 0.2),
    ("cls-f32-rowkernel", 6, 130, 1, torch.float32, "contiguous", "class", "contiguous", True, -100, 0.05),
    ("cls-bf16-sliced", 3, 6, 4, torch.bfloat16, "sliced", "class", "expanded", True, -100, 0.0),
    ("cls-f16-expanded", 3, 7, 2, torch.float16, "expanded", "class", "contiguous", False, -100, 0.3),
    ("cls-f32-empty", 0, 5, 3, torch.float32, "contiguous", "class", "contiguous", False, -100, 0.0),
    ("prob-f32-contig", 4, 5, 3, torch.float32, "contiguous", "prob", "contiguous", False, -100, 0.0),
    ("prob-f64-weight-ls", 3, 6, 2, torch.float64, "contiguous", "prob", "transposed", True, -100, 0.2),
    ("prob-f32-classlast", 2, 80, 3, torch.float32, "class_last", "prob", "expanded", True, -100, 0.1),
    ("prob-bf16-sliced", 2, 4, 3, torch.bfloat16, "sliced", "prob", "contiguous", False, -100, 0.0),
]


def _make_sample(sample, device):
    _, N, C, D, dtype, lay, kind, tlay, use_w, ignore, ls = sample
    x = _input3(N, C, D, dtype, device, lay)
    if kind == "class":
        t = _class_target(N, D, C, device, tlay, ignore)
    else:
        t = _prob_target(N, C, D, dtype, device, tlay)
    w = make_weight(C, dtype, device) if use_w else None
    return x, t, w, ignore, ls


def _ids(samples):
    return [s[0] for s in samples]


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_opcheck_forward(device, sample):
    x, t, w, ignore, ls = _make_sample(sample, device)
    torch.library.opcheck(_op("cross_entropy_forward"), (x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP))


# opcheck (schema / fake / AOT dispatch) is slow-ish: one reduction and one grad_output layout per
# sample, cycling through the options; the value tests below cover the full products.
GRAD_LAYOUTS = ["contiguous", "expanded_scalar", "transposed"]


@pytest.mark.parametrize("sample,reduction", [(s, 1 + i % 2) for i, s in enumerate(SAMPLES)],
                         ids=[f"{s[0]}-red{1 + i % 2}" for i, s in enumerate(SAMPLES)])
def test_opcheck_forward_with_grad(device, sample, reduction):
    x, t, w, ignore, ls = _make_sample(sample, device)
    torch.library.opcheck(_op("cross_entropy_forward_with_grad"), (x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP, reduction))


@pytest.mark.parametrize("sample,grad_layout", [(s, GRAD_LAYOUTS[i % 3]) for i, s in enumerate(SAMPLES)],
                         ids=[f"{s[0]}-{GRAD_LAYOUTS[i % 3]}" for i, s in enumerate(SAMPLES)])
def test_opcheck_backward(device, sample, grad_layout):
    x, t, w, ignore, ls = _make_sample(sample, device)
    N, C, D = x.shape
    acc = _acc(x.dtype)
    _, lse, _ = torch.ops.fused_ce.cross_entropy_forward(x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP)
    if grad_layout == "contiguous":
        g = torch.rand(N, D, dtype=acc, device=device)
    elif grad_layout == "expanded_scalar":
        g = torch.tensor(0.7, dtype=acc, device=device).expand(N, D)
    else:
        g = torch.rand(D, N, dtype=acc, device=device).t()
    soft = t.dtype.is_floating_point
    flag_sets = [(True, False)] + ([(True, True), (False, True)] if soft else [])
    for input_grad, target_grad in flag_sets:
        torch.library.opcheck(_op("cross_entropy_backward"),
                              (g, None, x, t, w, lse, ignore, ls, NO_Z_LOSS, NO_SOFTCAP, input_grad, target_grad))


def test_opcheck_with_requires_grad_inputs(device):
    # No autograd.Function may hide inside the backend kernels: with inputs that require grad the raw
    # operators' outputs must not silently require grad (opcheck's test_autograd_registration).
    x = make_logits((4, 6, 2), torch.float32, device).requires_grad_()
    t = make_class_target((4, 2), 6, device)
    torch.library.opcheck(_op("cross_entropy_forward"), (x, t, None, -100, 0.1, NO_Z_LOSS, NO_SOFTCAP),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    tp = make_prob_target((4, 6, 2), torch.float32, device).requires_grad_()
    torch.library.opcheck(_op("cross_entropy_forward"), (x, tp, None, -100, 0.0, NO_Z_LOSS, NO_SOFTCAP),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_all_ops_registered_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in OPS:
        assert hasattr(torch.ops.fused_ce, name), f"torch.ops.fused_ce.{name} missing"
    with FakeTensorMode():
        x = torch.empty(5, 7, 3)
        t = torch.empty(5, 3, dtype=torch.long)
        loss, lse, tw = torch.ops.fused_ce.cross_entropy_forward(x, t, None, -100, 0.0, 0.0, 0.0)
        assert loss.shape == (5, 3) and lse.shape == (5, 3) and tw.shape == ()
        assert loss.dtype == lse.dtype == tw.dtype == torch.float32
        out = torch.ops.fused_ce.cross_entropy_forward_with_grad(x.bfloat16(), t, None, -100, 0.0, 0.0, 0.0, 1)
        assert out[3].shape == (5, 7, 3) and out[3].dtype == torch.bfloat16 and out[0].dtype == torch.float32
        gi, gt = torch.ops.fused_ce.cross_entropy_backward(torch.empty(5, 3), None, x, t, None, torch.empty(5, 3),
                                                           -100, 0.0, 0.0, 0.0, True, False)
        assert gi.shape == (5, 7, 3) and gi.is_contiguous() and gt.numel() == 0
        xt = torch.empty(5, 3, 7).permute(0, 2, 1)  # class stride 1: grad keeps that layout
        gi, _ = torch.ops.fused_ce.cross_entropy_backward(torch.empty(5, 3), None, xt, t, None, torch.empty(5, 3),
                                                          -100, 0.0, 0.0, 0.0, True, False)
        assert gi.stride() == torch.empty_like(xt).stride()
        gi, gt = torch.ops.fused_ce.cross_entropy_backward(torch.empty(5, 3, dtype=torch.float64), None, x.double(),
                                                           x.double(), None, torch.empty(5, 3, dtype=torch.float64),
                                                           -100, 0.0, 0.0, 0.0, False, True)
        assert gi.numel() == 0 and gt.shape == (5, 7, 3) and gt.dtype == torch.float64


# --------------------------------------------------------------------------
# Operator semantics against independent torch computations.


def _ref_per_element(x, t, w, ignore, ls):
    """Per-element loss (N, D), lse (N, D) and total weight in float64 via torch."""
    x64 = x.detach().cpu().double()
    w64 = None if w is None else w.cpu().double()
    if t.dtype.is_floating_point:
        loss = F.cross_entropy(x64, t.cpu().double(), weight=w64, reduction="none", label_smoothing=ls)
        total = float(x.shape[0] * x.shape[2])
    else:
        loss = F.cross_entropy(x64, t.cpu(), weight=w64, reduction="none", ignore_index=ignore, label_smoothing=ls)
        valid = t.cpu() != ignore
        wt = torch.ones(x.shape[1], dtype=torch.float64) if w64 is None else w64
        total = wt[t.cpu().clamp(0, x.shape[1] - 1)][valid].sum().item()
    lse = torch.logsumexp(x64, dim=1)
    return loss, lse, total


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_forward_op_values(device, sample):
    x, t, w, ignore, ls = _make_sample(sample, device)
    acc = _acc(x.dtype)
    loss, lse, tw = torch.ops.fused_ce.cross_entropy_forward(x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP)
    N, C, D = x.shape
    assert loss.shape == (N, D) and lse.shape == (N, D) and tw.shape == ()
    assert loss.dtype == lse.dtype == tw.dtype == acc
    ref_loss, ref_lse, ref_tw = _ref_per_element(x, t, w, ignore, ls)
    tol_dtype = acc  # outputs are in the accumulate type
    assert_close_ref(loss, ref_loss, tol_dtype, what="per-element loss")
    assert_close_ref(lse, ref_lse, tol_dtype, what="lse")
    assert_close_ref(tw, torch.tensor(ref_tw, dtype=torch.float64), tol_dtype, what="total_weight")
    if not t.dtype.is_floating_point:
        ignored = (t == ignore)
        assert (loss[ignored] == 0).all(), "ignored elements must have loss exactly 0"


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_forward_with_grad_op_values(device, sample, reduction):
    x, t, w, ignore, ls = _make_sample(sample, device)
    acc = _acc(x.dtype)
    loss, lse, tw, gi = torch.ops.fused_ce.cross_entropy_forward_with_grad(x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP, reduction)
    N, C, D = x.shape
    assert gi.shape == (N, C, D) and gi.dtype == x.dtype
    assert loss.dtype == lse.dtype == tw.dtype == acc
    ref_loss, ref_lse, ref_tw = _ref_per_element(x, t, w, ignore, ls)
    assert_close_ref(loss, ref_loss, acc, what="per-element loss")
    assert_close_ref(lse, ref_lse, acc, what="lse")
    assert_close_ref(tw, torch.tensor(ref_tw, dtype=torch.float64), acc, what="total_weight")
    # gradient of the reduced loss for grad_output = 1
    x64 = x.detach().cpu().double().requires_grad_()
    tt = t.cpu().double() if t.dtype.is_floating_point else t.cpu()
    kw = dict(weight=None if w is None else w.cpu().double(), label_smoothing=ls,
              reduction="mean" if reduction == 1 else "sum")
    if not t.dtype.is_floating_point:
        kw["ignore_index"] = ignore
    F.cross_entropy(x64, tt, **kw).backward()
    ref_g = x64.grad
    if reduction == 1 and ref_tw == 0:
        ref_g = torch.zeros_like(ref_g)  # spec: all-ignored mean -> zero gradient (torch 2.13)
    assert_close_ref(gi, ref_g, x.dtype, what="grad_input of the reduced loss")
    expected_strides = torch.empty_like(x).stride()
    assert gi.stride() == expected_strides, (
        f"spec: grad_input laid out like torch.empty_like(input) {expected_strides}; got {gi.stride()}")


@pytest.mark.parametrize("grad_layout", ["contiguous", "expanded_scalar", "transposed"])
@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_backward_op_values(device, sample, grad_layout):
    x, t, w, ignore, ls = _make_sample(sample, device)
    N, C, D = x.shape
    acc = _acc(x.dtype)
    _, lse, _ = torch.ops.fused_ce.cross_entropy_forward(x, t, w, ignore, ls, NO_Z_LOSS, NO_SOFTCAP)
    if grad_layout == "contiguous":
        g = torch.rand(N, D, dtype=acc, device=device) - 0.3
    elif grad_layout == "expanded_scalar":
        g = torch.tensor(1.3, dtype=acc, device=device).expand(N, D)
    else:
        g = torch.rand(D, N, dtype=acc, device=device).t()
    soft = t.dtype.is_floating_point
    x64 = x.detach().cpu().double().requires_grad_()
    if soft:
        t64 = t.detach().cpu().double().requires_grad_()
        ref = F.cross_entropy(x64, t64, weight=None if w is None else w.cpu().double(), reduction="none",
                              label_smoothing=ls)
        ref_gi, ref_gt = torch.autograd.grad(ref, (x64, t64), g.cpu().double())
    else:
        ref = F.cross_entropy(x64, t.cpu(), weight=None if w is None else w.cpu().double(), reduction="none",
                              ignore_index=ignore, label_smoothing=ls)
        (ref_gi,) = torch.autograd.grad(ref, (x64,), g.cpu().double())
    flag_sets = [(True, False), (False, False)] + ([(True, True), (False, True)] if soft else [])
    for input_grad, target_grad in flag_sets:
        gi, gt = torch.ops.fused_ce.cross_entropy_backward(g, None, x, t, w, lse, ignore, ls, NO_Z_LOSS, NO_SOFTCAP, input_grad,
                                                           target_grad)
        if input_grad:
            assert gi.shape == (N, C, D) and gi.dtype == x.dtype
            assert_close_ref(gi, ref_gi, x.dtype, what=f"backward grad_input ({grad_layout})")
            expected_strides = torch.empty_like(x).stride()
            assert gi.stride() == expected_strides, (
                f"spec: grad_input laid out like torch.empty_like(input) {expected_strides}; got {gi.stride()}")
        else:
            assert gi.numel() == 0, "grad_input must be an empty tensor when input_grad is False"
        if target_grad:
            assert gt.shape == (N, C, D) and gt.dtype == t.dtype
            assert_close_ref(gt, ref_gt, t.dtype, what=f"backward grad_target ({grad_layout})")
            expected_strides = torch.empty_like(t).stride()
            assert gt.stride() == expected_strides, (
                f"spec: grad_target laid out like torch.empty_like(target) {expected_strides}; got {gt.stride()}")
        else:
            assert gt.numel() == 0, "grad_target must be an empty tensor when target_grad is False"
