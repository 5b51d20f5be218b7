"""torch.autograd.gradcheck (float64, finite differences vs. the analytic backward) for every option.

The two grids also check the batched backward and forward-mode AD.

gradcheck is independent of torch's cross_entropy: it compares fused_ce's backward with numerical
derivatives of fused_ce's own forward.  The forward itself is pinned to torch by a value check in
each case too.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import fused_ce
from conftest import assert_close_ref, make_class_target, make_logits, make_prob_target, make_weight

SHAPES = {"unbatched": (5,), "2d": (4, 5), "3d": (3, 5, 2), "4d": (2, 4, 2, 2)}

# Besides the backward: batched backward (vmap over the upstream gradient),
# forward-mode AD and batched forward-mode AD, each against finite differences.
ALL_MODES = dict(check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)


def _tshape(shape):
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


# (ignore_index, label_smoothing, shape) for class targets. Left out to keep
# the grid small: an ignore_index with an unbatched input (its single element
# ignored or not is covered in test_parity) and label_smoothing=1.0 past 2-D.
CLASS_TARGET_CASES = [
    (ignore, smoothing, shape_kind)
    for ignore in (None, -100, 2)
    for smoothing in (0.0, 0.3, 1.0)
    for shape_kind in ("2d", "3d", "4d", "unbatched")
    if not (shape_kind == "unbatched" and ignore is not None)
    and not (shape_kind in ("3d", "4d") and smoothing == 1.0)
]


@pytest.mark.parametrize("ignore, label_smoothing, shape_kind", CLASS_TARGET_CASES)
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_class_targets(device, reduction, use_weight, ignore, label_smoothing, shape_kind):
    shape = SHAPES[shape_kind]
    C = shape[0] if shape_kind == "unbatched" else shape[1]
    x = make_logits(shape, torch.float64, device, scale=1.5).requires_grad_()
    t = make_class_target(_tshape(shape), C, device, ignore_index=ignore, ignore_frac=0.3)
    w = make_weight(C, torch.float64, device) if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    if ignore is not None:
        kw["ignore_index"] = ignore

    def fn(inp):
        return fused_ce.cross_entropy(inp, t, **kw)

    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, **ALL_MODES)
    # the forward is torch's
    ref = F.cross_entropy(x.detach().cpu(), t.cpu(), **{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                                         for k, v in kw.items()})
    assert_close_ref(fn(x.detach()), ref, torch.float64)


@pytest.mark.parametrize("shape_kind", ["2d", "3d", "unbatched"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grads", ["input+target", "target_only", "input_only"])
def test_gradcheck_prob_targets(device, grads, reduction, use_weight, label_smoothing, shape_kind):
    shape = SHAPES[shape_kind]
    C = shape[0] if shape_kind == "unbatched" else shape[1]
    x = make_logits(shape, torch.float64, device, scale=1.5).requires_grad_(grads != "target_only")
    t = make_prob_target(shape, torch.float64, device).requires_grad_(grads != "input_only")
    w = make_weight(C, torch.float64, device) if use_weight else None

    def fn(inp, tgt):
        return fused_ce.cross_entropy(inp, tgt, weight=w, reduction=reduction, label_smoothing=label_smoothing)

    assert gradcheck(fn, (x, t), eps=1e-6, atol=1e-7, rtol=1e-5, **ALL_MODES)
    ref = F.cross_entropy(x.detach().cpu(), t.detach().cpu(), weight=None if w is None else w.cpu(),
                          reduction=reduction, label_smoothing=label_smoothing)
    assert_close_ref(fn(x.detach(), t.detach()), ref, torch.float64)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_prob_targets_with_weight_gradient(device, reduction):
    # Probability targets are differentiable with respect to the class weights, as in PyTorch.
    x = make_logits((4, 5, 2), torch.float64, device, scale=1.5).requires_grad_()
    t = make_prob_target((4, 5, 2), torch.float64, device).requires_grad_()
    w = make_weight(5, torch.float64, device).requires_grad_()

    def fn(inp, tgt, weight):
        return fused_ce.cross_entropy(inp, tgt, weight=weight, reduction=reduction, label_smoothing=0.2)

    assert gradcheck(fn, (x, t, w), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_gradcheck_noncontiguous(device, layout):
    if layout == "transposed":
        base = make_logits((5, 4), torch.float64, device).requires_grad_()
        view = lambda a: a.t()  # noqa: E731
        t = make_class_target((4,), 5, device, ignore_index=-100)
    elif layout == "channels_last":
        base = make_logits((2, 5, 2, 3), torch.float64, device).requires_grad_()
        view = lambda a: a.contiguous(memory_format=torch.channels_last)  # noqa: E731
        t = make_class_target((2, 2, 3), 5, device, ignore_index=-100)
    else:
        base = make_logits((6, 10, 3), torch.float64, device).requires_grad_()
        view = lambda a: a[::2, 1::2]  # noqa: E731
        t = make_class_target((3, 3), 5, device, ignore_index=-100)
    for reduction in ("none", "mean"):
        assert gradcheck(lambda a: fused_ce.cross_entropy(view(a), t, reduction=reduction, label_smoothing=0.2),
                         (base,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_row_kernel_sizes(device):
    # C >= 64 takes the vectorised row kernel on the CPU; a small batch keeps the Jacobian cheap
    C = 67
    x = make_logits((2, C), torch.float64, device).requires_grad_()
    t = make_class_target((2,), C, device)
    w = make_weight(C, torch.float64, device)
    for reduction in ("none", "mean", "sum"):
        assert gradcheck(lambda a: fused_ce.cross_entropy(a, t, w, reduction=reduction, label_smoothing=0.1),
                         (x,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_all_ignored(device):
    x = make_logits((3, 4), torch.float64, device).requires_grad_()
    t = torch.full((3,), -100, device=device)
    # sum / none: zero loss and zero gradient everywhere
    for reduction in ("none", "sum"):
        assert gradcheck(lambda a: fused_ce.cross_entropy(a, t, reduction=reduction), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_through_module(device):
    C = 4
    m = fused_ce.CrossEntropyLoss(weight=make_weight(C, torch.float64, device), label_smoothing=0.1, ignore_index=0)
    x = make_logits((5, C), torch.float64, device).requires_grad_()
    t = make_class_target((5,), C, device, ignore_index=0)
    assert gradcheck(lambda a: m(a, t), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("path", ["native", "native-device-scaled", "function", "inplace"])
def test_batched_upstream_gradients(device, path, monkeypatch):
    # One backward for several upstream gradients (is_grads_batched, torch.func.vmap
    # around a backward): the scalar upstream gradient is batched, so it can be
    # neither read on the host nor applied in place.
    if path == "native-device-scaled":
        monkeypatch.setattr(fused_ce.functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))
    x = make_logits((4, 5, 3), torch.float64, device).requires_grad_()
    t = make_class_target((4, 3), 5, device, ignore_index=-100)
    upstream = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64, device=device)
    want = torch.autograd.grad(F.cross_entropy(x, t, label_smoothing=0.1), x)[0]
    want = upstream.view(-1, 1, 1, 1) * want

    def loss():
        if path == "function":
            return fused_ce.CrossEntropyFunction.apply(x, t, None, -100, 0.1, 1)
        return fused_ce.cross_entropy(x.clone() if path == "inplace" else x, t, label_smoothing=0.1,
                                      inplace_backward=path == "inplace")

    batched = torch.autograd.grad(loss(), x, upstream, is_grads_batched=True)[0]
    assert_close_ref(batched, want, torch.float64)
    if path != "inplace":  # the in-place gradient is handed out once per graph
        graph = loss()
        mapped = torch.func.vmap(lambda u: torch.autograd.grad(graph, x, u, retain_graph=True)[0])(upstream)
        assert_close_ref(mapped, want, torch.float64)
