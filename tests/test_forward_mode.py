"""Forward-mode AD and nested torch.func transforms.

Dual tensors (torch.autograd.forward_ad), ``torch.func.jvp``, ``jacfwd``,
``hessian``, ``grad`` of ``grad`` and torch.autograd over torch.func take
``composite_cross_entropy``: the operator's values carrying the graph of the
same loss in torch operations. These tests compare tangents, Jacobians and
Hessians with PyTorch's F.cross_entropy under the same transforms in float64,
check that the values are the fused path's own and that bad targets still
raise; and that a tangent on the upstream gradient alone (forward-over-reverse
through the fused backward) comes out on every gradient strategy.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fused_ce
from conftest import (NATIVE_NODE, grad_fn_name, identical, make_class_target, make_logits,
                      make_prob_target, make_weight, ref_llm)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func scripts a helper

# (kwargs, probability targets?) over the options that change the formulas.
CASES = [
    (dict(), False),
    (dict(reduction="sum", label_smoothing=0.2), False),
    (dict(reduction="none", ignore_index=2), False),
    (dict(weight=True, label_smoothing=0.1), False),
    (dict(weight=True, reduction="none"), False),
    (dict(), True),
    (dict(weight=True, label_smoothing=0.3, reduction="sum"), True),
    (dict(reduction="none"), True),
]
CASE_IDS = ["mean", "sum-smoothing", "none-ignore", "weight-smoothing", "weight-none",
            "probabilities", "probabilities-weight-smoothing", "probabilities-none"]
SHAPES = [(6, 5), (4, 5, 3), (5,)]


def _arguments(case, shape, device):
    kwargs, soft = case
    kwargs = dict(kwargs)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, torch.float64, device)
    if soft:
        target = make_prob_target(shape, torch.float64, device)
    else:
        target_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        # Some elements ignored, but not the one element of an unbatched target.
        ignore = None if not target_shape else kwargs.get("ignore_index", -100)
        target = make_class_target(target_shape, num_classes, device, ignore_index=ignore)
    if kwargs.get("weight"):
        kwargs["weight"] = make_weight(num_classes, torch.float64, device)
    return x, target, kwargs


def _close(got, want):
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCd", "C"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dual_tensors_match_torch(device, case, shape):
    x, target, kwargs = _arguments(case, shape, device)
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        want = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(x, tangent), target, **kwargs))
        got = fwAD.unpack_dual(fused_ce.cross_entropy(fwAD.make_dual(x, tangent), target, **kwargs))
    _close(got.tangent, want.tangent)
    # The values are the operator's, bit for bit those of a call without tangents.
    assert identical(got.primal, fused_ce.cross_entropy(x, target, **kwargs))


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCd", "C"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jvp_jacfwd_and_hessian_match_torch(device, case, shape):
    x, target, kwargs = _arguments(case, shape, device)
    tangent = torch.randn_like(x)

    def transforms(loss_fn):
        def scalar(a):
            return loss_fn(a, target, **kwargs).sum()
        return (torch.func.jvp(lambda a: loss_fn(a, target, **kwargs), (x,), (tangent,))[1],
                torch.func.jacfwd(lambda a: loss_fn(a, target, **kwargs))(x),
                torch.func.hessian(scalar)(x),
                torch.func.jacrev(torch.func.jacrev(scalar))(x))

    for got, want in zip(transforms(fused_ce.cross_entropy), transforms(F.cross_entropy)):
        _close(got, want)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grad_of_grad_matches_torch(device, case):
    # A second derivative through torch.func (e.g. MAML written with torch.func):
    # it used to raise.
    x, target, kwargs = _arguments(case, (6, 5), device)

    def outer(loss_fn):
        inner = torch.func.grad(lambda a: loss_fn(a, target, **kwargs).sum())
        return torch.func.grad(lambda a: inner(a).square().sum() + inner(a)[0, 0])(x)

    _close(outer(fused_ce.cross_entropy), outer(F.cross_entropy))


def test_per_sample_hessians_under_vmap(device):
    x = make_logits((3, 4, 6), torch.float64, device)
    target = make_class_target((3, 4), 6, device)

    def per_sample(loss_fn):
        return torch.func.vmap(torch.func.hessian(lambda a, b: loss_fn(a, b, label_smoothing=0.1)))(x, target)

    _close(per_sample(fused_ce.cross_entropy), per_sample(F.cross_entropy))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_llm_options_and_lse(device, reduction):
    x = make_logits((5, 7), torch.float64, device)
    target = make_class_target((5,), 7, device, ignore_index=-100)
    weight = make_weight(7, torch.float64, device)
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=2.5)
    tangent = torch.randn_like(x)

    def fused(a):
        loss, lse = fused_ce.cross_entropy(a, target, return_lse=True, **options)
        return loss, lse

    def reference(a):
        return ref_llm(a, target, **options)

    for got, want in zip(torch.func.jvp(fused, (x,), (tangent,))[1],
                         torch.func.jvp(reference, (x,), (tangent,))[1]):
        _close(got, want)
    _close(torch.func.hessian(lambda a: fused(a)[0].sum())(x),
           torch.func.hessian(lambda a: reference(a)[0].sum())(x))


def test_tangents_of_targets_and_weights(device):
    # Probability targets and their class weights have derivatives in PyTorch;
    # the class weights of class-index targets have none (their tangent is dropped).
    x = make_logits((4, 5), torch.float64, device)
    probabilities = make_prob_target((4, 5), torch.float64, device)
    classes = make_class_target((4,), 5, device)
    weight = make_weight(5, torch.float64, device)
    target_tangent, weight_tangent = torch.randn_like(probabilities), torch.randn_like(weight)
    results = []
    for loss_fn in (fused_ce.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            soft_target = loss_fn(x, fwAD.make_dual(probabilities, target_tangent), weight=weight,
                                  label_smoothing=0.2)
            soft_weight = loss_fn(x, probabilities, weight=fwAD.make_dual(weight, weight_tangent))
            class_weight = loss_fn(x, classes, weight=fwAD.make_dual(weight, weight_tangent))
            results.append([fwAD.unpack_dual(t).tangent for t in (soft_target, soft_weight, class_weight)])
    got, want = results
    _close(got[0], want[0])
    _close(got[1], want[1])
    assert got[2] is None and want[2] is None


def test_half_precision_tangent(device):
    # Computed in float32 like the kernel; the tangent is rounded to the input's dtype.
    x = make_logits((8, 33), torch.float64, device)
    target = make_class_target((8,), 33, device, ignore_index=-100)
    tangent = torch.randn_like(x)
    want = torch.func.jvp(lambda a: F.cross_entropy(a, target, label_smoothing=0.1), (x,), (tangent,))[1]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        value, got = torch.func.jvp(lambda a: fused_ce.cross_entropy(a, target, label_smoothing=0.1),
                                    (x.to(dtype),), (tangent.to(dtype),))
        assert value.dtype == got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=2e-2, atol=2e-2)


def test_all_ignored_and_empty_batches(device):
    x = make_logits((3, 4), torch.float64, device)
    ignored = torch.full((3,), -100, device=device)
    tangent = torch.randn_like(x)
    for reduction in ("mean", "sum", "none"):
        want = torch.func.jvp(lambda a: F.cross_entropy(a, ignored, reduction=reduction), (x,), (tangent,))
        got = torch.func.jvp(lambda a: fused_ce.cross_entropy(a, ignored, reduction=reduction), (x,), (tangent,))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w.cpu(), equal_nan=True, rtol=0, atol=0)
    empty = make_logits((0, 4), torch.float64, device)
    got = torch.func.jvp(lambda a: fused_ce.cross_entropy(a, ignored[:0]), (empty,), (empty,))
    want = torch.func.jvp(lambda a: F.cross_entropy(a, ignored[:0]), (empty,), (empty,))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w.cpu(), equal_nan=True, rtol=0, atol=0)


def test_out_of_range_target_raises():
    # The operator checks the targets as on every other path (CPU: PyTorch's IndexError;
    # on CUDA a device-side assertion would end the process, so it is not tried here).
    x = make_logits((4, 6), torch.float64)
    target = torch.tensor([0, 6, 1, 2])
    with pytest.raises(IndexError, match="Target 6 is out of bounds"):
        torch.func.jvp(lambda a: fused_ce.cross_entropy(a, target), (x,), (torch.randn_like(x),))
    with fwAD.dual_level(), pytest.raises(IndexError, match="Target 6 is out of bounds"):
        fused_ce.cross_entropy(fwAD.make_dual(x, torch.randn_like(x)), target)


def test_dual_level_without_tangents_takes_the_native_node(device):
    # An open dual level alone changes nothing: the C++ node, and its gradient.
    x = make_logits((4, 6), torch.float32, device).requires_grad_()
    target = make_class_target((4,), 6, device)
    with fwAD.dual_level():
        loss = fused_ce.cross_entropy(x, target)
        assert grad_fn_name(loss) == NATIVE_NODE
        assert fwAD.unpack_dual(loss).tangent is None
        (grad,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().double().requires_grad_()
    F.cross_entropy(x_ref, target).backward()
    torch.testing.assert_close(grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_forward_over_reverse_with_dual_tensors(device):
    # Hessian-vector product as forward-mode over a create_graph backward.
    x = make_logits((5, 6), torch.float64, device)
    target = make_class_target((5,), 6, device, ignore_index=-100)
    direction = torch.randn_like(x)
    results = []
    for loss_fn in (fused_ce.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.clone().requires_grad_(), direction)
            (grad,) = torch.autograd.grad(loss_fn(dual, target, label_smoothing=0.1), dual, create_graph=True)
            results.append(fwAD.unpack_dual(grad).tangent)
    _close(*results)


def test_autograd_over_torch_func_grad(device):
    # torch.autograd differentiating what torch.func.grad (or vmap of it) returned,
    # for logits that require grad outside the transforms.
    x = make_logits((4, 6), torch.float64, device).requires_grad_()
    target = make_class_target((4,), 6, device, ignore_index=-100)

    def second_derivatives(loss_fn):
        grad = torch.func.grad(lambda a: loss_fn(a, target, label_smoothing=0.1))(x)
        per_sample = torch.func.vmap(torch.func.grad(loss_fn))(x, target)
        # vmap alone, both derivatives outside it
        per_row = torch.func.vmap(lambda a, b: loss_fn(a, b, label_smoothing=0.2))(x, target)
        (row_grad,) = torch.autograd.grad((per_row * torch.arange(4.0, device=device)).sum(), x,
                                          create_graph=True)
        return torch.autograd.grad((grad.square().sum(), per_sample.square().sum(), row_grad.square().sum()),
                                   x)[0]

    _close(second_derivatives(fused_ce.cross_entropy), second_derivatives(F.cross_entropy))


@pytest.mark.parametrize("path", ["native", "native-device-scaled", "none", "lse", "inplace", "function"])
@pytest.mark.parametrize("upstream_value", [1.0, 0.7])
def test_tangent_of_the_upstream_gradient(device, path, upstream_value, monkeypatch):
    # Forward-over-reverse with respect to the upstream gradient, without
    # create_graph: the backward is linear in it, so its tangent must come out
    # (also when its value is 1, where the backward skips the product).
    if path == "native-device-scaled":
        monkeypatch.setattr(fused_ce.functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))
    x = make_logits((5, 6), torch.float64, device).requires_grad_()
    target = make_class_target((5,), 6, device, ignore_index=-100)
    reduction = "none" if path == "none" else "mean"
    shape = (5,) if path == "none" else ()
    upstream = torch.full(shape, upstream_value, dtype=torch.float64, device=device)
    tangent = torch.randn(shape, dtype=torch.float64, device=device)

    def loss(loss_fn, a):
        if loss_fn is F.cross_entropy:
            return loss_fn(a, target, reduction=reduction, label_smoothing=0.1)
        if path == "function":
            return fused_ce.CrossEntropyFunction.apply(a, target, None, -100, 0.1, 1)
        if path == "lse":
            return fused_ce.cross_entropy(a, target, label_smoothing=0.1, return_lse=True)[0]
        return fused_ce.cross_entropy(a.clone() if path == "inplace" else a, target, reduction=reduction,
                                      label_smoothing=0.1, inplace_backward=path == "inplace")

    results = []
    for loss_fn in (fused_ce.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            (grad,) = torch.autograd.grad(loss(loss_fn, x), x, fwAD.make_dual(upstream, tangent))
            results.append(fwAD.unpack_dual(grad))
    _close(results[0].primal, results[1].primal)
    _close(results[0].tangent, results[1].tangent)
