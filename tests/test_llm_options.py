"""The keyword-only LLM options of fused_ce.cross_entropy: z_loss, softcap, return_lse.

Every numerical check compares against a PyTorch reference (``ref_llm`` in conftest.py),
evaluated in float64 on CPU copies of the very same (already rounded) inputs:

    y    = softcap * tanh(x / softcap)             (softcap given)
    base = F.cross_entropy(y, t, weight, reduction="none", ignore_index, label_smoothing)
    lse  = torch.logsumexp(y, class_dim)
    loss_i = base_i + z_loss * w_i * lse_i ** 2    (w_i = weight[t_i], 0 when ignored; 1 for soft targets)
    mean = sum(loss_i) / sum(w_i)                  (N * d1 * ... * dk for probability targets)

Also: gradcheck, opcheck of the operators with the new arguments, the module form, argument
errors and torch.compile.  (inplace_backward has its own file: test_inplace_backward.py.)
"""

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from conftest import (
    assert_close_ref,
    dtype_id,
    make_class_target,
    make_logits,
    make_prob_target,
    make_weight,
    ref_llm,
    softcap_ref,
)

import fused_ce  # an ImportError must fail the module, not skip it


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_floor(x, t, w, reduction, ignore_index=-100):
    """Natural magnitude of one gradient entry (used as the absolute-tolerance floor)."""
    if reduction != "mean":
        return 1e-3
    if t.dtype.is_floating_point:
        C = x.shape[0] if x.dim() == 1 else x.shape[1]
        total = x.numel() / C
    else:
        valid = t.cpu() != ignore_index
        if w is None:
            total = float(valid.sum())
        else:
            total = float(w.cpu().double()[t.cpu().clamp(0, w.numel() - 1)][valid].sum())
    return 1e-3 if total == 0 else min(1e-3, 1.0 / total)


def check_llm(x, t, w=None, *, view=None, target_grad=None, lse_weight=0.3, rtol=None, atol_scale=None,
              lse_tol_dtype=None, what="", **opts):
    """Loss, lse and gradients of fused_ce.cross_entropy(**opts) against ref_llm in float64.

    ``x`` / ``t`` are the leaves, ``view`` maps the leaf to the (e.g. non-contiguous) tensor passed.
    The objective backpropagated is  sum(loss * g) (+ lse_weight * sum(lse * g_lse) with return_lse),
    with random upstream gradients g / g_lse, so both outputs' gradients are exercised.
    """
    view = view or (lambda a: a)
    soft = t.dtype.is_floating_point
    if target_grad is None:
        target_grad = soft
    reduction = opts.get("reduction", "mean")
    return_lse = opts.get("return_lse", False)
    dtype = x.dtype
    x_before, t_before = x.detach().clone(), t.detach().clone()

    # fused
    xl = x.detach().clone().requires_grad_()
    tl = t.detach().clone().requires_grad_(target_grad) if soft else t
    out = fused_ce.cross_entropy(view(xl), tl, w, **opts)
    loss, lse = out if return_lse else (out, None)

    # reference, float64 on CPU, same rounded inputs
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    t64 = t.detach().to("cpu", torch.float64).requires_grad_(target_grad) if soft else t.detach().cpu()
    w64 = None if w is None else w.detach().to("cpu", torch.float64)
    ref_opts = {k: v for k, v in opts.items() if k not in ("return_lse", "inplace_backward")}
    ref_loss, ref_lse = ref_llm(view(x64), t64, w64, **ref_opts)

    # forward values, dtype, shape, device
    assert loss.dtype == dtype, f"{what}: loss dtype {loss.dtype} for {dtype} input"
    assert loss.device.type == torch.device(x.device).type
    assert tuple(loss.shape) == tuple(ref_loss.shape), f"{what}: loss shape {tuple(loss.shape)}"
    assert_close_ref(loss, ref_loss, dtype, what=f"{what}: loss", rtol=rtol, atol_scale=atol_scale, floor=1.0)
    if return_lse:
        assert lse.dtype == _acc(dtype), f"{what}: lse dtype {lse.dtype} for {dtype} input"
        assert tuple(lse.shape) == tuple(ref_lse.shape), (
            f"{what}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}")
        assert lse.requires_grad
        assert_close_ref(lse, ref_lse, lse_tol_dtype or dtype, what=f"{what}: lse", floor=1.0)

    # gradients
    g = (torch.rand(ref_loss.shape, dtype=torch.float64) * 2 - 0.5) if reduction == "none" \
        else torch.tensor(0.5 + 2 * torch.rand(()).item(), dtype=torch.float64)
    obj = (loss * g.to(loss.device, loss.dtype)).sum()
    ref_obj = (ref_loss * g).sum()
    if return_lse:
        g_lse = torch.rand(ref_lse.shape, dtype=torch.float64) - 0.5
        obj = obj + lse_weight * (lse * g_lse.to(lse.device, lse.dtype)).sum()
        ref_obj = ref_obj + lse_weight * (ref_lse * g_lse).sum()
    leaves = [xl] + ([tl] if soft and target_grad else [])
    ref_leaves = [x64] + ([t64] if soft and target_grad else [])
    grads = torch.autograd.grad(obj, leaves)
    ref_grads = torch.autograd.grad(ref_obj, ref_leaves)
    floor = _grad_floor(view(x64), t64, w64, reduction, opts.get("ignore_index", -100))
    gi = grads[0]
    assert gi.dtype == dtype and gi.shape == x.shape, f"{what}: grad_input {gi.dtype} {tuple(gi.shape)}"
    assert_close_ref(gi, ref_grads[0], dtype, what=f"{what}: grad_input", rtol=rtol, atol_scale=atol_scale,
                     floor=floor)
    if soft and target_grad:
        gt = grads[1]
        assert gt.dtype == t.dtype and gt.shape == t.shape
        assert_close_ref(gt, ref_grads[1], dtype, what=f"{what}: grad_target", rtol=rtol, atol_scale=atol_scale,
                         floor=floor * 10)
    # nothing was modified in place
    assert torch.equal(x.detach().nan_to_num(1.5), x_before.nan_to_num(1.5)), f"{what}: input modified"
    assert torch.equal(t.detach(), t_before), f"{what}: target modified"
    return loss, lse, grads


# --------------------------------------------------------------------------
# 0. The reference itself: with the options off it is F.cross_entropy.


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_reference_reduces_to_torch(kind, reduction):
    x = make_logits((9, 7, 2), torch.float64)
    w = make_weight(7, torch.float64)
    if kind == "class":
        t = make_class_target((9, 2), 7, ignore_index=-100)
        kw = dict(ignore_index=-100)
    else:
        t = make_prob_target((9, 7, 2), torch.float64)
        kw = {}
    ref, _ = ref_llm(x, t, w, reduction=reduction, label_smoothing=0.15, **kw)
    expected = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.15, **kw)
    torch.testing.assert_close(ref, expected, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------
# 1. The option grid (float64, tight tolerance): each option alone and combined,
#    x reduction x weight x label_smoothing, class targets with ignored elements and soft targets.

OPTION_SETS = {
    "z": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.5),
    "lse": dict(return_lse=True),
    "z+softcap": dict(z_loss=0.05, softcap=4.0),
    "z+lse": dict(z_loss=0.1, return_lse=True),
    "softcap+lse": dict(softcap=3.0, return_lse=True),
    "all": dict(z_loss=0.02, softcap=1.5, return_lse=True),
}


# (use_weight, label_smoothing); label smoothing is exercised with a weight (the harder case)
WEIGHT_LS = [(False, 0.0), (True, 0.0), (True, 0.2)]
WEIGHT_LS_IDS = ["plain", "weight", "weight+ls"]


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_option_grid(device, options, kind):
    # each option set x reduction x (weight, label_smoothing); class targets include ignored elements
    C = 10
    for reduction in ("none", "mean", "sum"):
        for (use_weight, label_smoothing), wid in zip(WEIGHT_LS, WEIGHT_LS_IDS):
            x = make_logits((13, C), torch.float64, device)
            if kind == "class":
                t = make_class_target((13,), C, device, ignore_index=-100)
            else:
                t = make_prob_target((13, C), torch.float64, device)
            w = make_weight(C, torch.float64, device) if use_weight else None
            check_llm(x, t, w, reduction=reduction, label_smoothing=label_smoothing, **OPTION_SETS[options],
                      what=f"{kind} {options} {reduction} {wid}")


@pytest.mark.parametrize("options", ["z", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_custom_ignore_index_is_a_valid_class(device, reduction, options):
    # ignore_index=2 is also a class index: its elements (and their z-loss term) must drop out
    N, C = 40, 7
    x = make_logits((N, C), torch.float64, device)
    t = make_class_target((N,), C, device, ignore_index=2, ignore_frac=0.3)
    w = make_weight(C, torch.float64, device)
    check_llm(x, t, w, reduction=reduction, ignore_index=2, label_smoothing=0.1, **OPTION_SETS[options],
              what=f"ignore_index=2 {options} {reduction}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_ignored(device, reduction):
    for use_weight in (False, True):
        _check_all_ignored(device, reduction, use_weight)


def _check_all_ignored(device, reduction, use_weight):
    # all elements ignored: mean is NaN (like torch), sum 0, none all zeros -- the z-loss term too;
    # the lse is still computed for every element and carries its own gradient.
    N, C = 6, 9
    x = make_logits((N, C, 2), torch.float64, device)
    t = torch.full((N, 2), -100, dtype=torch.long, device=device)
    w = make_weight(C, torch.float64, device) if use_weight else None
    loss, lse, (gi,) = check_llm(x, t, w, reduction=reduction, z_loss=0.5, softcap=2.0, return_lse=True,
                                 label_smoothing=0.1, what=f"all ignored {reduction}")
    if reduction == "mean":
        assert torch.isnan(loss).item()
        torch_loss = F.cross_entropy(x.cpu(), t.cpu(), None if w is None else w.cpu(), reduction="mean")
        assert torch.isnan(torch_loss).item()
    else:
        assert (loss == 0).all()
    assert torch.isfinite(lse).all()
    # without the lse output, the gradient is exactly zero
    xl = x.detach().clone().requires_grad_()
    fused_ce.cross_entropy(xl, t, w, reduction=reduction, z_loss=0.5, softcap=2.0).sum().backward()
    assert (xl.grad == 0).all(), "ignored elements must get a zero gradient (z-loss included)"


# --------------------------------------------------------------------------
# 2. Shapes, layouts and dtypes with the options on.


def _case(kind, dtype, device):
    """(leaf logits, view, loss-element shape, C) for a shape kind."""
    ident = None
    if kind == "unbatched":
        return make_logits((10,), dtype, device), ident, (), 10
    if kind == "2d_tile":
        return make_logits((21, 10), dtype, device), ident, (21,), 10
    if kind == "2d_row":
        return make_logits((6, 1000), dtype, device), ident, (6,), 1000
    if kind == "4d":
        return make_logits((3, 11, 4, 5), dtype, device), ident, (3, 4, 5), 11
    if kind == "2d_transposed":  # (C, N) buffer seen as (N, C)
        return make_logits((67, 9), dtype, device), lambda a: a.t(), (9,), 67
    if kind == "4d_channels_last":  # (N, d1, d2, C) buffer seen as (N, C, d1, d2)
        return make_logits((2, 3, 4, 13), dtype, device), lambda a: a.permute(0, 3, 1, 2), (2, 3, 4), 13
    if kind == "2d_row_sliced":  # every other row and class of a larger buffer
        return make_logits((10, 600), dtype, device), lambda a: a[::2, ::2], (5,), 300
    raise AssertionError(kind)


SHAPE_KINDS = ["unbatched", "2d_tile", "2d_row", "4d", "2d_transposed", "4d_channels_last", "2d_row_sliced"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Loose tolerances for the half types (compared with a float64 reference of the rounded inputs;
# the loss and the gradient are rounded to the half type at the end).
HALF_TOL = {torch.bfloat16: dict(rtol=2e-2, atol_scale=1e-2), torch.float16: dict(rtol=4e-3, atol_scale=2e-3)}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPE_KINDS)
def test_shapes_layouts_dtypes(device, shape, dtype):
    for k, kind in enumerate(("class", "prob")):
        x, view, elem_shape, C = _case(shape, dtype, device)
        reduction = ["none", "mean", "sum"][(SHAPE_KINDS.index(shape) + DTYPES.index(dtype) + k) % 3]
        if kind == "class":
            t = make_class_target(elem_shape, C, device, ignore_index=-100 if elem_shape else None)
        else:
            # the soft target has the (viewed) input's shape; build it contiguous in that shape
            xv = view(x) if view else x
            t = make_prob_target(tuple(xv.shape), dtype, device)
        w = make_weight(C, dtype, device)
        tol = HALF_TOL.get(dtype, {})
        loss, lse, _ = check_llm(x, t, w, view=view, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
                                 softcap=5.0, return_lse=True, what=f"{shape} {dtype_id(dtype)} {kind} {reduction}",
                                 **tol)
        assert tuple(lse.shape) == elem_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("options", ["z", "softcap", "lse"])
def test_each_option_alone_large_vocab(device, options, dtype):
    # the row kernel (C = 1000) with each option alone, 3-D input
    x = make_logits((4, 1000, 3), dtype, device)
    t = make_class_target((4, 3), 1000, device, ignore_index=-100)
    check_llm(x, t, None, reduction="mean", **OPTION_SETS[options], **HALF_TOL.get(dtype, {}),
              what=f"C=1000 {options} {dtype_id(dtype)}")


def test_lse_is_accumulate_precision_for_half_inputs(device):
    # lse is float32 for half inputs and computed from them in float32 (no rounding to the half type)
    x = make_logits((8, 50), torch.bfloat16, device)
    t = make_class_target((8,), 50, device)
    for softcap in (None, 7.0):
        _, lse = fused_ce.cross_entropy(x, t, softcap=softcap, return_lse=True)
        ref = torch.logsumexp(softcap_ref(x.double().cpu(), softcap), 1)
        assert lse.dtype == torch.float32
        assert_close_ref(lse, ref, torch.float32, what=f"bf16 lse softcap={softcap}", rtol=1e-5, floor=1.0)


# --------------------------------------------------------------------------
# 3. softcap: extreme logits and the small-argument (series) branch.


def _extreme_logits(N, C, dtype, device):
    x = make_logits((N, C), torch.float64) * 10
    x[0, :3] = torch.tensor([1e4, -1e4, 5e3], dtype=torch.float64)
    x[1, 1::2] = -math.inf  # masked classes
    x[2, :] = 1e4
    x[2, 5] = -1e4
    x[3, 4] = math.inf
    x[4, :] = -math.inf  # every class masked
    x[5, 0] = -math.inf  # the target below
    x[6, ::3] = math.inf
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("C", [10, 1000])
def test_softcap_extreme_logits(device, C, dtype):
    for reduction in ("none", "mean", "sum"):
        for z_loss in (0.0, 1e-3):
            _check_extreme(device, C, dtype, reduction, z_loss)


def _check_extreme(device, C, dtype, reduction, z_loss):
    N = 8
    x = _extreme_logits(N, C, dtype, device)
    t = torch.randint(0, C, (N,)).to(device)
    t[1] = 2  # target among the unmasked classes
    t[5] = 0  # -inf at the target
    t[7] = -100
    softcap = 30.0
    rtol = 1e-12 if dtype == torch.float64 else None
    atol_scale = 1e-13 if dtype == torch.float64 else None
    loss, lse, (gi,) = check_llm(x, t, None, reduction=reduction, softcap=softcap, z_loss=z_loss, return_lse=True,
                                 rtol=rtol, atol_scale=atol_scale, what=f"extreme C={C} {reduction}")
    # capped logits are finite, so is everything else here
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all() and torch.isfinite(gi).all()
    # the saturated classes get a zero gradient (tanh' == 0 there)
    assert (gi[x.abs() == math.inf] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_softcap_nan_logit_propagates(device, dtype):
    # a NaN logit poisons its element only (loss, lse and gradient of that row), like the reference
    x = make_logits((5, 12), dtype, device)
    x[2, 3] = math.nan
    t = make_class_target((5,), 12, device)
    for reduction in ("none", "sum"):
        check_llm(x, t, None, reduction=reduction, softcap=4.0, z_loss=1e-2, return_lse=True,
                  what=f"nan logit {reduction}")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_masked_classes_without_softcap(device, reduction, z_loss):
    # -inf masked classes with z_loss and no softcap (lse stays finite); a -inf target gives inf loss
    N, C = 6, 20
    x = make_logits((N, C), torch.float64, device)
    x[:, ::2] = -math.inf
    t = (torch.randint(0, C // 2, (N,)) * 2 + 1).to(device)
    check_llm(x, t, None, reduction=reduction, z_loss=z_loss, return_lse=True, what="masked")
    t2 = t.clone()
    t2[0] = 0  # target masked: loss +inf, like torch
    xl = x.clone()
    out, lse = fused_ce.cross_entropy(xl, t2, reduction="none", z_loss=z_loss, return_lse=True)
    ref, ref_lse = ref_llm(x.cpu(), t2.cpu(), reduction="none", z_loss=z_loss)
    assert_close_ref(out, ref, torch.float64, what="masked target loss", floor=1.0)
    assert math.isinf(out[0].item()) and out[0].item() > 0
    assert_close_ref(lse, ref_lse, torch.float64, what="masked lse", floor=1.0)


@pytest.mark.parametrize("C", [1, 3, 200])
def test_softcap_small_arguments_accurate(device, C):
    for softcap in (0.5, 30.0, 1e3):
        _check_small_arguments(device, C, softcap)


def _check_small_arguments(device, C, softcap):
    # |x / softcap| < 0.1 over many magnitudes (down to 1e-9 * softcap): the capped logit must be
    # accurate to ~1e-12 relative.  With C = 1 the lse *is* the capped logit and the z-loss is
    # z * y**2, so relative errors of the tanh evaluation show directly.
    N = 64
    mags = torch.logspace(-9, -1, N, dtype=torch.float64) * softcap
    x = (torch.rand(N, C, dtype=torch.float64) * 2 - 1) * 0.999 * mags[:, None]
    x = x.to(device)
    t = torch.randint(0, C, (N,)).to(device)
    # elementwise check of the lse (C == 1: lse == softcap * tanh(x / softcap))
    _, lse = fused_ce.cross_entropy(x, t, reduction="none", softcap=softcap, return_lse=True)
    ref_lse = torch.logsumexp(softcap_ref(x.cpu(), softcap), 1)
    assert_close_ref(lse, ref_lse, torch.float64, what="small-argument lse", rtol=1e-12, atol_scale=0.0)
    check_llm(x, t, None, reduction="none", softcap=softcap, z_loss=0.5, return_lse=True, rtol=1e-12,
              atol_scale=1e-14, what=f"small args C={C} softcap={softcap}")
    if C == 1:
        loss = fused_ce.cross_entropy(x, t, reduction="none", softcap=softcap, z_loss=1.0)
        ref = softcap_ref(x.cpu(), softcap)[:, 0].square()
        assert_close_ref(loss, ref, torch.float64, what="z * y**2 (C=1)", rtol=1e-12, atol_scale=0.0)


def test_softcap_tanh_branch_boundary(device):
    # values straddling |x / softcap| = 0.1 (a plausible series/exp switch point) and other
    # moderate arguments, float64 at 1e-12 relative through the C = 1 lse
    softcap = 3.0
    r = torch.tensor([0.0999, 0.09999999, 0.1, 0.10000001, 0.1001, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 19.0, 20.0, 25.0],
                     dtype=torch.float64)
    x = torch.cat([r, -r]).mul(softcap)[:, None].to(device)
    t = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    _, lse = fused_ce.cross_entropy(x, t, reduction="none", softcap=softcap, return_lse=True)
    assert_close_ref(lse, softcap * torch.tanh(x.cpu()[:, 0] / softcap), torch.float64, what="tanh near branch",
                     rtol=1e-12, atol_scale=0.0)
    # and exactly 0 at 0
    _, lse0 = fused_ce.cross_entropy(torch.zeros(2, 1, dtype=torch.float64, device=device),
                                     torch.zeros(2, dtype=torch.long, device=device), reduction="none",
                                     softcap=softcap, return_lse=True)
    assert (lse0 == 0).all()


# --------------------------------------------------------------------------
# 4. return_lse.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_return_lse_shape_dtype(device, dtype):
    for shape, elem in [((7,), ()), ((5, 7), (5,)), ((3, 7, 2, 4), (3, 2, 4))]:
        x = make_logits(shape, dtype, device)
        t = make_class_target(elem, 7, device)
        for reduction in ("none", "mean", "sum"):
            out = fused_ce.cross_entropy(x, t, reduction=reduction, return_lse=True)
            assert isinstance(out, tuple) and len(out) == 2
            loss, lse = out
            assert lse.shape == elem and lse.dtype == _acc(dtype) and lse.device == x.device
            assert not lse.requires_grad
            expected_loss = elem if reduction == "none" else ()
            assert loss.shape == expected_loss and loss.dtype == dtype
        # without return_lse: a plain tensor
        assert isinstance(fused_ce.cross_entropy(x, t), torch.Tensor)
        assert isinstance(fused_ce.cross_entropy(x, t, return_lse=False), torch.Tensor)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_return_lse_values_including_ignored(device, kind, softcap):
    x = make_logits((12, 9, 3), torch.float32, device)
    if kind == "class":
        t = make_class_target((12, 3), 9, device, ignore_index=-100, ignore_frac=0.5)
    else:
        t = make_prob_target((12, 9, 3), torch.float32, device)
    for reduction in ("none", "mean", "sum"):
        _, lse = fused_ce.cross_entropy(x, t, reduction=reduction, softcap=softcap, z_loss=0.01,
                                        return_lse=True)
        ref = torch.logsumexp(softcap_ref(x.double().cpu(), softcap), 1)
        assert_close_ref(lse, ref, torch.float32, what=f"lse {kind} {reduction}", floor=1.0)
        if kind == "class":
            ign = (t == -100)
            assert ign.any()
            assert (lse[ign] != 0).all(), "lse must be computed for ignored elements too"


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_return_lse_differentiable(device, kind, softcap):
    for reduction in ("none", "mean", "sum"):
        _check_lse_differentiable(device, kind, reduction, softcap)


def _check_lse_differentiable(device, kind, reduction, softcap):
    # loss + 0.1 * lse.square().mean(): the documented z-loss-by-hand pattern
    x = make_logits((10, 17), torch.float64, device)
    t = make_class_target((10,), 17, device, ignore_index=-100) if kind == "class" \
        else make_prob_target((10, 17), torch.float64, device)
    w = make_weight(17, torch.float64, device)

    def objective(loss, lse):
        return loss.sum() + 0.1 * lse.square().mean()

    xl = x.clone().requires_grad_()
    loss, lse = fused_ce.cross_entropy(xl, t, w, reduction=reduction, softcap=softcap, label_smoothing=0.1,
                                       return_lse=True)
    objective(loss, lse).backward()
    x64 = x.cpu().clone().requires_grad_()
    r_loss, r_lse = ref_llm(x64, t.cpu(), w.cpu(), reduction=reduction, softcap=softcap, label_smoothing=0.1)
    objective(r_loss, r_lse).backward()
    assert_close_ref(xl.grad, x64.grad, torch.float64, what="grad of loss + 0.1 lse^2")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_lse_only_backward(device, kind, dtype):
    for reduction in ("none", "mean", "sum"):
        _check_lse_only_backward(device, kind, reduction, dtype)


def _check_lse_only_backward(device, kind, reduction, dtype):
    # only the lse is used: the loss output receives no gradient (None upstream)
    x = make_logits((6, 10, 2), dtype, device)
    t = make_class_target((6, 2), 10, device, ignore_index=-100) if kind == "class" \
        else make_prob_target((6, 10, 2), dtype, device).requires_grad_()
    xl = x.clone().requires_grad_()
    _, lse = fused_ce.cross_entropy(xl, t, reduction=reduction, softcap=2.0, z_loss=0.3, return_lse=True)
    g = torch.rand(lse.shape, dtype=torch.float64)
    (lse * g.to(lse.device, lse.dtype)).sum().backward()
    x64 = x.double().cpu().requires_grad_()
    ref = torch.logsumexp(softcap_ref(x64, 2.0), 1)
    (ref * g).sum().backward()
    assert_close_ref(xl.grad, x64.grad, dtype, what="lse-only grad", **HALF_TOL.get(dtype, {}))
    if kind == "prob":
        # the lse does not depend on the target: zero (or absent) target gradient
        assert t.grad is None or (t.grad == 0).all()


def test_lse_without_input_grad_and_under_no_grad(device):
    x = make_logits((5, 8), torch.float32, device)
    t = make_prob_target((5, 8), torch.float32, device).requires_grad_()
    loss, lse = fused_ce.cross_entropy(x, t, return_lse=True, z_loss=0.1)
    assert loss.requires_grad
    loss.backward()
    ref_t = t.detach().double().cpu().requires_grad_()
    ref_llm(x.double().cpu(), ref_t, z_loss=0.1)[0].backward()
    assert_close_ref(t.grad, ref_t.grad, torch.float32, what="target grad with lse output")
    with torch.no_grad():
        loss, lse = fused_ce.cross_entropy(x.clone().requires_grad_(), t, return_lse=True, softcap=3.0)
    assert not loss.requires_grad and not lse.requires_grad
    assert_close_ref(lse, torch.logsumexp(softcap_ref(x.double().cpu(), 3.0), 1), torch.float32, what="no_grad lse",
                     floor=1.0)


# --------------------------------------------------------------------------
# 5. gradcheck (float64).


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_class_targets(device, reduction):
    for return_lse in (False, True):
        _gradcheck_class(device, reduction, return_lse)


def _gradcheck_class(device, reduction, return_lse):
    x = make_logits((4, 5, 2), torch.float64, device).requires_grad_()
    t = make_class_target((4, 2), 5, device, ignore_index=-100)
    w = make_weight(5, torch.float64, device)

    def fn(inp):
        return fused_ce.cross_entropy(inp, t, w, reduction=reduction, label_smoothing=0.15, z_loss=0.05,
                                      softcap=1.7, return_lse=return_lse)

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_prob_targets(device, reduction):
    for return_lse in (False, True):
        _gradcheck_prob(device, reduction, return_lse)


def _gradcheck_prob(device, reduction, return_lse):
    x = make_logits((3, 6, 2), torch.float64, device).requires_grad_()
    q = make_prob_target((3, 6, 2), torch.float64, device, normalized=False).requires_grad_()
    w = make_weight(6, torch.float64, device)

    def fn(inp, tgt):
        return fused_ce.cross_entropy(inp, tgt, w, reduction=reduction, label_smoothing=0.2, z_loss=0.1,
                                      softcap=2.2, return_lse=return_lse)

    assert torch.autograd.gradcheck(fn, (x, q), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_unbatched_and_lse_only(device):
    x = make_logits((6,), torch.float64, device).requires_grad_()
    t = torch.tensor(4, device=device)
    assert torch.autograd.gradcheck(
        lambda a: fused_ce.cross_entropy(a, t, z_loss=0.2, softcap=1.3, return_lse=True), (x,))
    assert torch.autograd.gradcheck(
        lambda a: fused_ce.cross_entropy(a, t, z_loss=0.2, softcap=1.3, return_lse=True)[1], (x,))


# --------------------------------------------------------------------------
# 6. opcheck of the operators with the new arguments.


def _op(name):
    return getattr(torch.ops.fused_ce, name).default


def _op_sample(device, kind, dtype=torch.float32, layout="contiguous"):
    N, C, D = 4, 6, 3
    if layout == "contiguous":
        x = make_logits((N, C, D), dtype, device)
    else:  # class stride 1
        x = make_logits((N, D, C), dtype, device).permute(0, 2, 1)
    if kind == "class":
        t = make_class_target((N, D), C, device, ignore_index=-100)
    else:
        t = make_prob_target((N, C, D), dtype, device)
    w = make_weight(C, dtype, device)
    return x, t, w


OP_CASES = [  # (kind, dtype, layout, weight, label_smoothing, z_loss, softcap)
    ("class", torch.float32, "contiguous", True, 0.1, 0.01, 5.0),
    ("class", torch.float64, "class_last", False, 0.0, 0.2, 0.0),
    ("class", torch.bfloat16, "contiguous", True, 0.0, 0.0, 2.0),
    ("prob", torch.float32, "contiguous", False, 0.2, 0.05, 3.0),
    ("prob", torch.float64, "class_last", True, 0.0, 0.1, 0.0),
]
OP_IDS = [f"{c[0]}-{dtype_id(c[1])}-{c[2]}-z{c[5]}-cap{c[6]}" for c in OP_CASES]


@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_opcheck_forward_llm(device, case):
    kind, dtype, layout, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, layout)
    torch.library.opcheck(_op("cross_entropy_forward"), (x, t, w if use_w else None, -100, ls, z, cap))


@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_opcheck_forward_with_grad_llm(device, case):
    kind, dtype, layout, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, layout)
    reduction = 1 + OP_CASES.index(case) % 2  # mean / sum alternate over the cases
    torch.library.opcheck(_op("cross_entropy_forward_with_grad"),
                          (x, t, w if use_w else None, -100, ls, z, cap, reduction))


@pytest.mark.parametrize("case,reduction", [(c, 1 + i % 2) for i, c in enumerate(OP_CASES)],
                         ids=[f"{i}-red{1 + k % 2}" for k, i in enumerate(OP_IDS)])
def test_opcheck_forward_with_grad_inplace(device, case, reduction):
    # the mutating operator (input must be contiguous: class_last cases use a contiguous copy)
    kind, dtype, _, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, "contiguous")
    args = (x.clone(), t, w if use_w else None, -100, ls, z, cap, reduction)
    torch.library.opcheck(_op("cross_entropy_forward_with_grad_inplace"), args)


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_forward_with_grad_inplace_op_values(device, case, reduction):
    # the in-place operator: same per-element outputs as forward_with_grad, its gradient written into input
    kind, dtype, _, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, "contiguous")
    w = w if use_w else None
    ref = torch.ops.fused_ce.cross_entropy_forward_with_grad(x, t, w, -100, ls, z, cap, reduction)
    buf = x.clone()
    ptr = buf.data_ptr()
    out = torch.ops.fused_ce.cross_entropy_forward_with_grad_inplace(buf, t, w, -100, ls, z, cap, reduction)
    assert len(out) == 3 and buf.data_ptr() == ptr
    for a, b, name in zip(out, ref[:3], ("loss", "lse", "total_weight")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_close_ref(buf, ref[3].double(), dtype, what="in-place gradient vs forward_with_grad's")
    # and that gradient is the reference one (float64, grad_output = 1)
    x64 = x.double().cpu().requires_grad_()
    kw = dict(ignore_index=-100) if kind == "class" else {}
    red = "mean" if reduction == 1 else "sum"
    r, _ = ref_llm(x64, t.cpu() if kind == "class" else t.double().cpu(), None if w is None else w.double().cpu(),
                   reduction=red, label_smoothing=ls, z_loss=z, softcap=cap or None, **kw)
    r.backward()
    assert_close_ref(buf, x64.grad, dtype, what="in-place gradient", **HALF_TOL.get(dtype, {}))


# opcheck is slow-ish: one grad_lse layout per case, cycling (None, contiguous, 0-stride, transposed)
GRAD_LSE_LAYOUTS = ["none", "contiguous", "expanded_scalar", "transposed"]


@pytest.mark.parametrize("case,grad_lse_layout", [(c, GRAD_LSE_LAYOUTS[i % 4]) for i, c in enumerate(OP_CASES)],
                         ids=[f"{i}-{GRAD_LSE_LAYOUTS[k % 4]}" for k, i in enumerate(OP_IDS)])
def test_opcheck_backward_llm(device, case, grad_lse_layout):
    kind, dtype, layout, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, layout)
    w = w if use_w else None
    N, C, D = x.shape
    acc = _acc(dtype)
    _, lse, _ = torch.ops.fused_ce.cross_entropy_forward(x, t, w, -100, ls, z, cap)
    g = torch.rand(N, D, dtype=acc, device=device)
    if grad_lse_layout == "none":
        g_lse = None
    elif grad_lse_layout == "contiguous":
        g_lse = torch.rand(N, D, dtype=acc, device=device) - 0.5
    elif grad_lse_layout == "expanded_scalar":
        g_lse = torch.tensor(0.3, dtype=acc, device=device).expand(N, D)
    else:
        g_lse = torch.rand(D, N, dtype=acc, device=device).t()
    flag_sets = [(True, False)] + ([(True, True), (False, True)] if kind == "prob" else [])
    for input_grad, target_grad in flag_sets:
        torch.library.opcheck(_op("cross_entropy_backward"),
                              (g, g_lse, x, t, w, lse, -100, ls, z, cap, input_grad, target_grad))


@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_backward_op_values_with_grad_lse(device, case):
    kind, dtype, layout, use_w, ls, z, cap = case
    x, t, w = _op_sample(device, kind, dtype, layout)
    w = w if use_w else None
    N, C, D = x.shape
    acc = _acc(dtype)
    _, lse, _ = torch.ops.fused_ce.cross_entropy_forward(x, t, w, -100, ls, z, cap)
    g = torch.rand(N, D, dtype=acc, device=device) - 0.3
    g_lse = torch.rand(D, N, dtype=acc, device=device).t() - 0.5
    soft = kind == "prob"
    x64 = x.double().cpu().requires_grad_()
    t64 = t.double().cpu().requires_grad_() if soft else t.cpu()
    kw = {} if soft else dict(ignore_index=-100)
    r_loss, r_lse = ref_llm(x64, t64, None if w is None else w.double().cpu(), reduction="none", label_smoothing=ls,
                            z_loss=z, softcap=cap or None, **kw)
    obj = (r_loss * g.double().cpu()).sum() + (r_lse * g_lse.double().cpu()).sum()
    ref = torch.autograd.grad(obj, [x64] + ([t64] if soft else []))
    gi, gt = torch.ops.fused_ce.cross_entropy_backward(g, g_lse, x, t, w, lse, -100, ls, z, cap, True, soft)
    assert_close_ref(gi, ref[0], dtype, what="backward op grad_input with grad_lse", **HALF_TOL.get(dtype, {}))
    if soft:
        assert_close_ref(gt, ref[1], dtype, what="backward op grad_target with grad_lse", floor=1e-2,
                         **HALF_TOL.get(dtype, {}))


# --------------------------------------------------------------------------
# 7. The module.


def test_module_forward_parity(device):
    C = 12
    x = make_logits((7, C, 3), torch.float32, device)
    t = make_class_target((7, 3), C, device, ignore_index=1, ignore_frac=0.2)
    w = make_weight(C, torch.float32, device)
    for reduction in ("none", "mean", "sum"):
        mod = fused_ce.CrossEntropyLoss(weight=w, ignore_index=1, reduction=reduction, label_smoothing=0.05,
                                        z_loss=0.01, softcap=4.0, return_lse=True)
        loss, lse = mod(x, t)
        f_loss, f_lse = fused_ce.cross_entropy(x, t, w, ignore_index=1, reduction=reduction, label_smoothing=0.05,
                                               z_loss=0.01, softcap=4.0, return_lse=True)
        torch.testing.assert_close(loss, f_loss, rtol=0, atol=0)
        torch.testing.assert_close(lse, f_lse, rtol=0, atol=0)
        r_loss, r_lse = ref_llm(x.double().cpu(), t.cpu(), w.double().cpu(), ignore_index=1, reduction=reduction,
                                label_smoothing=0.05, z_loss=0.01, softcap=4.0)
        assert_close_ref(loss, r_loss, torch.float32, what=f"module {reduction}", floor=1.0)
        assert_close_ref(lse, r_lse, torch.float32, what="module lse", floor=1.0)
    mod = fused_ce.CrossEntropyLoss(z_loss=0.1)
    assert isinstance(mod(x, t.clamp(min=0)), torch.Tensor)


def test_module_backward_and_inplace_option(device):
    C = 30
    h = torch.randn(8, 16, device=device)
    W = (torch.randn(16, C, device=device) * 0.3).requires_grad_()
    t = make_class_target((8,), C, device)
    grads = []
    for inplace in (False, True):
        W.grad = None
        mod = fused_ce.CrossEntropyLoss(z_loss=1e-3, softcap=10.0, inplace_backward=inplace)
        mod(h @ W, t).backward()
        grads.append(W.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_module_repr_and_state_dict():
    w = make_weight(5, torch.float32)
    plain = fused_ce.CrossEntropyLoss(weight=w)
    assert repr(plain) == repr(torch.nn.CrossEntropyLoss(weight=w)), "defaults must not show in repr"
    mod = fused_ce.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, return_lse=True)
    r = repr(mod)
    assert "z_loss=0.0001" in r and "softcap=30.0" in r and "return_lse=True" in r, r
    assert "inplace_backward" not in r, r
    r2 = repr(fused_ce.CrossEntropyLoss(inplace_backward=True))
    assert "inplace_backward=True" in r2 and "z_loss" not in r2 and "softcap" not in r2, r2
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    sd, ref_sd = mod.state_dict(), ref.state_dict()
    assert list(sd.keys()) == list(ref_sd.keys())
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    # round trip with torch's module
    mod2 = fused_ce.CrossEntropyLoss(weight=torch.ones(5), z_loss=0.5)
    mod2.load_state_dict(ref_sd)
    assert torch.equal(mod2.weight, w)
    ref.load_state_dict(mod.state_dict())
    assert isinstance(mod, torch.nn.CrossEntropyLoss)


# --------------------------------------------------------------------------
# 8. Argument errors.


@pytest.mark.parametrize("z_loss", [-1e-3, -1.0, float("nan")])
def test_bad_z_loss(z_loss):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.randint(0, 4, (3,))
    with pytest.raises(ValueError, match="z_loss"):
        fused_ce.cross_entropy(x, t, z_loss=z_loss)
    with pytest.raises(ValueError, match="z_loss"):
        fused_ce.CrossEntropyLoss(z_loss=z_loss)(x, t)


@pytest.mark.parametrize("softcap", [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_bad_softcap(softcap):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.randint(0, 4, (3,))
    with pytest.raises(ValueError, match="softcap"):
        fused_ce.cross_entropy(x, t, softcap=softcap)
    with pytest.raises(ValueError, match="softcap"):
        fused_ce.CrossEntropyLoss(softcap=softcap)(x, t)


def test_valid_edge_options_accepted():
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (3,))
    base = fused_ce.cross_entropy(x, t)
    torch.testing.assert_close(fused_ce.cross_entropy(x, t, z_loss=0.0, softcap=None), base, rtol=0, atol=0)
    fused_ce.cross_entropy(x, t, softcap=1e-6)  # tiny but positive: fine
    fused_ce.cross_entropy(x, t, softcap=3)  # an int is a number
    # huge softcap: tanh(x / s) * s == x to rounding
    torch.testing.assert_close(fused_ce.cross_entropy(x, t, softcap=1e12), base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inplace_kw", [dict(reduction="none"), dict(return_lse=True),
                                        dict(reduction="none", return_lse=True)], ids=["none", "lse", "none+lse"])
def test_inplace_backward_incompatible_options(inplace_kw):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.randint(0, 4, (3,))
    before = x.detach().clone()
    with pytest.raises(ValueError):
        fused_ce.cross_entropy(x, t, inplace_backward=True, **inplace_kw)
    with pytest.raises(ValueError):
        fused_ce.CrossEntropyLoss(inplace_backward=True, **inplace_kw)(x, t)
    assert torch.equal(x.detach(), before), "a rejected call must not touch the logits"


def test_options_are_keyword_only():
    x = torch.randn(3, 4)
    t = torch.randint(0, 4, (3,))
    with pytest.raises(TypeError):
        fused_ce.cross_entropy(x, t, None, None, -100, None, "mean", 0.0, 0.1)
    with pytest.raises(TypeError):
        fused_ce.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, 0.1)


# --------------------------------------------------------------------------
# 9. torch.compile.


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_compile_fullgraph_aot_eager(device, kind, fresh_dynamo):
    C = 40
    x = make_logits((6, C, 2), torch.float32, device)
    if kind == "class":
        t = make_class_target((6, 2), C, device, ignore_index=-100)
    else:
        t = make_prob_target((6, C, 2), torch.float32, device)
    w = make_weight(C, torch.float32, device)

    def fn(inp, tgt, weight):
        loss, lse = fused_ce.cross_entropy(inp, tgt, weight, label_smoothing=0.1, z_loss=1e-2, softcap=5.0,
                                           return_lse=True)
        plain = fused_ce.cross_entropy(inp, tgt, weight, reduction="none", z_loss=1e-3, softcap=2.0)
        return loss + 0.1 * lse.square().mean() + 0.01 * plain.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (compiled, fn):
        xl = x.clone().requires_grad_()
        tl = t.clone().requires_grad_() if kind == "prob" else t
        out = f(xl, tl, w)
        out.backward()
        results.append((out.detach(), xl.grad, tl.grad if kind == "prob" else None))
    (lc, gc, tc), (le, ge, te) = results
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)
    if kind == "prob":
        torch.testing.assert_close(tc, te, rtol=1e-5, atol=1e-7)
    # and the eager value is the reference one
    x64 = x.double().cpu()
    tt = t.cpu() if kind == "class" else t.double().cpu()
    r_loss, r_lse = ref_llm(x64, tt, w.double().cpu(), label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    r_plain, _ = ref_llm(x64, tt, w.double().cpu(), reduction="none", z_loss=1e-3, softcap=2.0)
    ref = r_loss + 0.1 * r_lse.square().mean() + 0.01 * r_plain.sum()
    assert_close_ref(le, ref, torch.float32, what="eager objective", floor=1.0)
