"""Shared fixtures and helpers for the fused_ce test-suite.

Every test that runs a kernel takes the ``device`` fixture and so runs once on
"cpu" and once on "cuda"; the CUDA case is skipped when no GPU is visible.

The reference for all numerical checks is PyTorch itself: ``F.cross_entropy``
evaluated on float64 copies of the very same inputs (so input rounding is
shared and only the computation differs).  Half-precision results are
compared against that float64 reference with tolerances derived from the
storage precision instead of being required to match torch's own half
computation bit for bit.

Helpers are plain functions in this module; tests import them with
``from conftest import ...`` (pytest puts tests/ on sys.path, rootdir-relative
"prepend" import mode).
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA_SKIP_REASON = "CUDA not available (no GPU on this machine)"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON),
    ),
]


# --------------------------------------------------------------------------
# pytest configuration (this project keeps all test configuration here).


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer-running test (still part of the default run)")
    config.addinivalue_line("markers", "compile: exercises torch.compile")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


@pytest.fixture(params=DEVICES)
def device(request):
    """Device every kernel-running test is parametrised over."""
    return request.param


@pytest.fixture(autouse=True)
def _seed_rng(request):
    """Seed torch / numpy / random deterministically from the test id."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield


# --------------------------------------------------------------------------
# Tolerances.

# (rtol, atol_scale).  Comparisons are |a - r| <= atol_scale * max(max|r|, floor) + rtol * |r|
# where r is the float64 reference: atol scales with the tensor's own magnitude
# (gradients of a mean over many elements are tiny); see assert_close_ref for floor.
TOLS = {
    torch.float64: (1e-11, 1e-13),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}

FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo's caches emptied before and after a test that compiles, so that no
    compiled graph, guard or recompilation count carries over between tests."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def dtype_id(dtype):
    """A dtype's name for test ids: "float32", "bfloat16"."""
    return str(dtype).replace("torch.", "")

REDUCTIONS = ["none", "mean", "sum"]


def tol_for(dtype):
    return TOLS[dtype]


def assert_close_ref(actual, ref, dtype=None, what="value", rtol=None, atol_scale=None, floor=1e-3):
    """Compare ``actual`` (any dtype, any device) with a float64 reference.

    NaN and +-inf positions must match exactly; finite values must be close with
    dtype-appropriate tolerance: |a - r| <= atol_scale * max(max|r|, floor) + rtol * |r|.
    ``floor`` keeps the absolute tolerance meaningful when the reference is (nearly) all zeros
    (C == 1, everything ignored): losses are computed from O(|logit|) quantities, so use
    floor=1 for losses; gradients keep the small default.
    """
    if dtype is None:
        dtype = actual.dtype
    r_default, a_default = tol_for(dtype)
    rtol = r_default if rtol is None else rtol
    atol_scale = a_default if atol_scale is None else atol_scale
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
    assert tuple(actual.shape) == tuple(ref.shape), f"{what}: shape {tuple(actual.shape)} != reference {tuple(ref.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    a_nan, r_nan = torch.isnan(a), torch.isnan(r)
    assert torch.equal(a_nan, r_nan), (
        f"{what}: NaN positions differ: fused NaN at {a_nan.nonzero().tolist()[:8]}, "
        f"torch NaN at {r_nan.nonzero().tolist()[:8]}"
    )
    a_inf, r_inf = torch.isinf(a), torch.isinf(r)
    assert torch.equal(a_inf, r_inf), (
        f"{what}: inf positions differ: fused inf at {a_inf.nonzero().tolist()[:8]}, "
        f"torch inf at {r_inf.nonzero().tolist()[:8]}"
    )
    if a_inf.any():
        assert torch.equal(a[a_inf], r[r_inf]), f"{what}: signs of infinities differ"
    fin = torch.isfinite(r)
    if a.numel() == 0 or not fin.any():
        return
    af, rf = a[fin], r[fin]
    scale = rf.abs().max().item()
    atol = atol_scale * max(scale, floor)
    err = (af - rf).abs()
    bound = atol + rtol * rf.abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{af.numel()} elements out of tolerance "
            f"(rtol={rtol:g}, atol={atol:g}); worst: fused={af[i].item()!r} torch64={rf[i].item()!r} "
            f"abs err={err[i].item():.3e}; max abs err={err.max().item():.3e}, ref scale={scale:.3e}"
        )


def assert_same_special(actual, expected, what="value", rtol=1e-5, atol=1e-6):
    """Exact agreement on NaN/inf positions, closeness elsewhere (same-dtype comparison)."""
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert tuple(a.shape) == tuple(e.shape), f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ:\nfused={a}\ntorch={e}"
    assert torch.equal(torch.isposinf(a), torch.isposinf(e)), f"{what}: +inf positions differ:\nfused={a}\ntorch={e}"
    assert torch.equal(torch.isneginf(a), torch.isneginf(e)), f"{what}: -inf positions differ:\nfused={a}\ntorch={e}"
    fin = torch.isfinite(e)
    torch.testing.assert_close(a[fin], e[fin], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}\nfused={a}\ntorch={e}")


# --------------------------------------------------------------------------
# Data generation (always on the CPU generator, then moved: reproducible per seed).


def make_logits(shape, dtype=torch.float32, device="cpu", scale=3.0):
    x = torch.randn(shape, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def make_class_target(shape, C, device="cpu", ignore_index=None, ignore_frac=0.25, dtype=torch.long):
    t = torch.randint(0, C, shape, dtype=torch.long)
    if ignore_index is not None and t.numel() > 0:
        mask = torch.rand(shape) < ignore_frac
        # make sure at least one element is ignored and (when possible) one is not
        flat = mask.view(-1)
        flat[0] = True
        if flat.numel() > 1:
            flat[-1] = False
            # an ignore_index inside [0, C) must not ignore that last element either
            if C > 1 and t.view(-1)[-1] == ignore_index:
                t.view(-1)[-1] = (ignore_index + 1) % C
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(dtype).to(device)


# Target layouts that the CPU's target check walks differently: a fixed
# stride between consecutive positions (D == 1, strided; dense (N, D)) or
# an (n, d) walk (a transposed (N, D) target). 40000 positions span three
# of its blocks of 16384.
TARGET_WALK_LAYOUTS = ["strided_1d", "dense_2d", "transposed_2d"]


def make_target_in_walk_layout(layout, C, device):
    """A class target with ignored elements, and the logits shape that goes with it."""
    if layout == "strided_1d":
        full = make_class_target((80000,), C, device, ignore_index=-100)
        return full[::2], (40000, C)
    if layout == "dense_2d":
        return make_class_target((400, 100), C, device, ignore_index=-100), (400, C, 100)
    assert layout == "transposed_2d"
    return make_class_target((100, 400), C, device, ignore_index=-100).t(), (400, C, 100)


def make_prob_target(shape, dtype=torch.float32, device="cpu", normalized=True):
    """Random soft target with the input's shape (class axis 1, or 0 when unbatched)."""
    cdim = 0 if len(shape) == 1 else 1
    raw = torch.randn(shape, dtype=torch.float64)
    t = raw.softmax(cdim) if normalized else torch.rand(shape, dtype=torch.float64)
    return t.to(dtype).to(device)


def make_weight(C, dtype=torch.float32, device="cpu"):
    return (torch.rand(C, dtype=torch.float64) * 1.5 + 0.25).to(dtype).to(device)


# --------------------------------------------------------------------------
# Reference and comparison drivers.


def reduced_loss_reference(loss, total_weight, reduction, dtype):
    """What the reduce_loss operator must give, to within rounding: the float64 sum of the
    per-element losses (over the float64 total weight for the mean), in ``dtype``."""
    total = loss.double().sum()
    if reduction == "mean":
        total = total / total_weight.double()
    return total.to(dtype)


def worst_dtype(*dtypes):
    """The least precise of the given floating dtypes (for picking a tolerance)."""
    return max(dtypes, key=lambda d: TOLS[d][0])


def identical(a, b):
    """Bitwise-ish equality that treats NaN == NaN (for the in-place modification check)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


# Names of the loss's autograd node (grad_fn.name()) under fused_ce: the C++
# nodes of the common cases (csrc/autograd.cpp for a reduced loss,
# csrc/per_element_loss.cpp for reduction="none"), and the Python
# CrossEntropyFunction's for the rest.
NATIVE_NODE = "fused_ce::CrossEntropyLossBackward"
PER_ELEMENT_NODE = "fused_ce::PerElementLossBackward"
PYTHON_NODE = "CrossEntropyFunctionBackward"


def _torch_takes_unbatched_one_element_target() -> bool:
    try:
        F.cross_entropy(torch.zeros(3), torch.tensor([0]))
    except RuntimeError:
        return False
    return True


# torch 2.11 and newer take a (1,) class-index target for an unbatched (C,) input, as fused_ce does;
# torch 2.4-2.5 refuse it ("size mismatch"): the references of such calls take the 0-d target there,
# the same loss.
TORCH_TAKES_UNBATCHED_ONE_ELEMENT_TARGET = _torch_takes_unbatched_one_element_target()


def unbatched_reference_target(t):
    """A (1,) target of an unbatched input as the installed torch takes it (see above)."""
    return t if TORCH_TAKES_UNBATCHED_ONE_ELEMENT_TARGET else t.reshape(())


def outcome(fn, *args, **kwargs):
    """What a call gives: its result, or the exception it raised (for comparing failures)."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        return error


def grad_fn_name(t):
    """t.grad_fn.name(), or None for a tensor without one."""
    return t.grad_fn.name() if t.grad_fn is not None else None


def _leaf(t, requires_grad):
    leaf = t.detach().clone()
    return leaf.requires_grad_(requires_grad)


def torch_reference(x, target, weight=None, grad_out=None, input_grad=True, target_grad=False,
                    view=None, target_view=None, **kwargs):
    """F.cross_entropy on float64 CPU copies; returns (loss, grad_input, grad_target) in float64.

    ``view``/``target_view`` map the leaf to the tensor actually passed (non-contiguous layouts);
    gradients are with respect to the leaves.
    """
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(input_grad)
    soft = target.dtype.is_floating_point
    t64 = target.detach().to("cpu", torch.float64).requires_grad_(target_grad) if soft else target.detach().to("cpu")
    w64 = None if weight is None else weight.detach().to("cpu", torch.float64)
    xin = view(x64) if view is not None else x64
    tin = target_view(t64) if target_view is not None else t64
    loss = F.cross_entropy(xin, tin, weight=w64, **kwargs)
    gi = gt = None
    if input_grad or target_grad:
        go = torch.ones_like(loss) if grad_out is None else grad_out.detach().to("cpu", torch.float64)
        inputs = ([x64] if input_grad else []) + ([t64] if target_grad else [])
        grads = list(torch.autograd.grad(loss, inputs, go, allow_unused=True))
        if input_grad:
            gi = grads.pop(0)
        if target_grad:
            gt = grads.pop(0)
    return loss.detach(), gi, gt


def run_fused(fc, x, target, weight=None, grad_out=None, input_grad=True, target_grad=False,
              view=None, target_view=None, **kwargs):
    """fused_ce.cross_entropy forward (+ backward); gradients w.r.t. the leaves x / target."""
    xl = _leaf(x, input_grad)
    soft = target.dtype.is_floating_point
    tl = _leaf(target, target_grad) if soft else target
    xin = view(xl) if view is not None else xl
    tin = target_view(tl) if target_view is not None else tl
    loss = fc.cross_entropy(xin, tin, weight=weight, **kwargs)
    gi = gt = None
    if input_grad or target_grad:
        go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.device, loss.dtype)
        inputs = ([xl] if input_grad else []) + ([tl] if target_grad else [])
        grads = list(torch.autograd.grad(loss, inputs, go, allow_unused=True))
        if input_grad:
            gi = grads.pop(0)
        if target_grad:
            gt = grads.pop(0)
    return loss.detach(), gi, gt


def random_grad_out(loss_shape, reduction):
    """A random upstream gradient (not all ones) so grad_output scaling is exercised."""
    if reduction == "none":
        return torch.rand(loss_shape, dtype=torch.float64) * 2 - 0.5
    return torch.tensor(0.5 + torch.rand(()).item() * 2, dtype=torch.float64)


def _natural_grad_scale(x, target, weight, grad_out, reduction, ignore_index):
    """Magnitude a gradient entry would have for an O(1) softmax term: |upstream| * max(w) / divisor.

    Used as the floor of the absolute tolerance for gradients, so that an exactly-zero reference
    (C == 1: p - 1 == 0) still allows rounding-level error of the O(1) terms it is computed from.
    """
    if grad_out is None:
        return 1e-3
    up = float(grad_out.abs().max()) if grad_out.numel() else 0.0
    wmax = 1.0 if weight is None or weight.numel() == 0 else max(1.0, float(weight.detach().abs().max()))
    if reduction == "mean":
        if target.dtype.is_floating_point:
            C = x.shape[0] if x.dim() == 1 else x.shape[1]
            total = x.numel() / max(C, 1)
        else:
            target = target.long()
            valid = target != ignore_index
            if weight is None or weight.numel() == 0:
                total = float(valid.sum())
            else:
                w = weight.detach().cpu().double()
                total = float(w[target.clamp(0, w.numel() - 1)][valid].sum())
        if total == 0:
            return 1e-30
        up = up / total
    return max(up * wmax, 1e-30)


def check_against_torch(fc, x, target, weight=None, reduction="mean", input_grad=True, target_grad=False,
                        grad_out="random", view=None, target_view=None, what="", rtol=None,
                        atol_scale=None, ref_target=None, **kwargs):
    """Full parity check of fused_ce.cross_entropy with F.cross_entropy (float64 reference).

    ``x`` / ``target`` are the leaves (any device/dtype); ``view`` / ``target_view`` optionally turn
    them into the (non-contiguous) tensors that are passed in.  Checks output shape, dtype and
    values, grad w.r.t. input and (soft targets) w.r.t. target, and that nothing was modified in place.
    ``ref_target`` replaces the target in the torch computations only (e.g. uint8 targets, which
    torch accepts but cannot always process: its weight+label_smoothing+mean path fails on them).
    Returns (fused_loss, fused_grad_input, fused_grad_target, reference tuple).
    """
    rt = target if ref_target is None else ref_target
    kwargs = dict(kwargs, reduction=reduction)
    x_before = x.detach().clone()
    t_before = target.detach().clone()
    # torch on the very same dtypes: the expected output dtype and shape
    xin_cpu = x.detach().cpu()
    tin_cpu = rt.detach().cpu()
    xin_cpu = view(xin_cpu) if view is not None else xin_cpu
    tin_cpu = target_view(tin_cpu) if target_view is not None else tin_cpu
    same_dtype = F.cross_entropy(xin_cpu, tin_cpu, weight=None if weight is None else weight.detach().cpu(),
                                 **kwargs)
    out_dtype = same_dtype.dtype
    if grad_out == "random":
        grad_out = random_grad_out(same_dtype.shape, reduction) if (input_grad or target_grad) else None
    ref = torch_reference(x, rt, weight, grad_out, input_grad, target_grad, view, target_view, **kwargs)
    ref_loss, ref_gi, ref_gt = ref
    loss, gi, gt = run_fused(fc, x, target, weight, grad_out, input_grad, target_grad, view, target_view,
                             **kwargs)

    grad_floor = _natural_grad_scale(xin_cpu, tin_cpu, weight, grad_out, reduction, kwargs.get("ignore_index", -100))

    tag = what or "config"
    assert loss.dtype == out_dtype, f"{tag}: loss dtype {loss.dtype}, torch gives {out_dtype}"
    assert loss.device.type == torch.device(x.device).type, f"{tag}: loss on {loss.device}, input on {x.device}"
    assert tuple(loss.shape) == tuple(same_dtype.shape), f"{tag}: loss shape {tuple(loss.shape)} != torch {tuple(same_dtype.shape)}"
    assert_close_ref(loss, ref_loss, out_dtype, what=f"{tag}: loss", rtol=rtol, atol_scale=atol_scale, floor=1.0)
    if input_grad:
        assert gi is not None, f"{tag}: no gradient for input"
        assert gi.dtype == x.dtype and gi.shape == x.shape, f"{tag}: grad_input {gi.dtype} {tuple(gi.shape)}"
        assert_close_ref(gi, ref_gi, worst_dtype(x.dtype, out_dtype), what=f"{tag}: grad_input",
                         rtol=rtol, atol_scale=atol_scale, floor=grad_floor)
    if target_grad:
        assert gt is not None, f"{tag}: no gradient for the soft target"
        assert gt.dtype == target.dtype and gt.shape == target.shape, f"{tag}: grad_target {gt.dtype} {tuple(gt.shape)}"
        assert_close_ref(gt, ref_gt, worst_dtype(target.dtype, out_dtype), what=f"{tag}: grad_target",
                         rtol=rtol, atol_scale=atol_scale, floor=grad_floor * 10)
    assert identical(x.detach(), x_before), f"{tag}: input modified in place"
    assert identical(target.detach(), t_before), f"{tag}: target modified in place"
    return loss, gi, gt, ref


# --------------------------------------------------------------------------
# The reference for the LLM options (z_loss, softcap, return_lse), from torch ops.


def softcap_ref(x, softcap):
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def ref_llm(x, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
            z_loss=0.0, softcap=None):
    """(loss, lse) of the spec, computed by torch ops from ``x`` / ``target`` as given.

    Differentiable: pass float64 leaves to get reference gradients.  ``x`` may be any layout
    (the class axis is 1, or 0 for unbatched input).
    """
    cdim = 0 if x.dim() == 1 else 1
    y = softcap_ref(x, softcap)
    soft = target.dtype.is_floating_point
    kw = dict(weight=weight, reduction="none", label_smoothing=label_smoothing)
    if not soft:
        kw["ignore_index"] = ignore_index
    base = F.cross_entropy(y, target, **kw)
    lse = torch.logsumexp(y, cdim)
    if soft:
        w_i = torch.ones_like(base)
    else:
        valid = target != ignore_index
        C = x.shape[cdim]
        safe = torch.where(valid, target, torch.zeros_like(target)).clamp(0, C - 1)
        w_i = torch.ones_like(base) if weight is None else weight[safe].to(base.dtype)
        w_i = torch.where(valid, w_i, torch.zeros_like(w_i))
    if z_loss:
        # where(): an ignored element contributes exactly 0 (also when its lse is +-inf / nan)
        z_term = torch.where(w_i != 0, z_loss * w_i * lse.square(), torch.zeros_like(lse))
        per_element = base + z_term
    else:
        per_element = base
    if reduction == "none":
        return per_element, lse
    if reduction == "sum":
        return per_element.sum(), lse
    denom = w_i.sum()
    if soft:
        denom = torch.tensor(float(base.numel()), dtype=base.dtype)
    if denom.item() == 0:
        # like torch: the mean over no elements is NaN, with a zero gradient
        return per_element.sum() * 0 + float("nan"), lse
    return per_element.sum() / denom, lse


def train_exported_loss_model(device, dtype, backward=torch.Tensor.backward):
    """A linear head and fused_ce's loss (label smoothing 0.1, ignored targets) exported with
    torch.export, which keeps the loss as fused_ce's operators; one step of the exported module,
    its loss passed to ``backward``; its loss and parameter gradients checked against PyTorch's
    in float64."""
    import fused_ce

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 20).to(device=device, dtype=dtype)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head
            self.loss = fused_ce.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)

        def forward(self, h, target):
            return self.loss(self.head(h), target)

    h = torch.randn(12, 16, device=device, dtype=dtype)
    target = make_class_target((12,), 20, device, ignore_index=-100)
    exported = torch.export.export(Model(), (h, target)).module()
    loss = exported(h, target)
    backward(loss)
    got = {name: p.grad for name, p in exported.named_parameters()}
    assert got and all(g is not None for g in got.values())

    ref_head = torch.nn.Linear(16, 20).to(device=device, dtype=torch.float64)
    ref_head.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    ref = F.cross_entropy(ref_head(h.double()), target, label_smoothing=0.1, ignore_index=-100)
    ref.backward()
    assert_close_ref(loss, ref, dtype, what="exported loss", floor=1.0)
    assert_close_ref(got["head.weight"], ref_head.weight.grad, dtype, what="exported weight gradient")
    assert_close_ref(got["head.bias"], ref_head.bias.grad, dtype, what="exported bias gradient")
