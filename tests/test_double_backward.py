"""Second derivatives: differentiating the gradient of the loss (create_graph=True).

The C++ loss node keeps the gradient of the reduced loss, not the logits; with
create_graph=True it hands out a gradient whose own backward computes the
Hessian-vector product from that gradient (csrc/double_backward.h). The
Python CrossEntropyFunction (reduction="none", target gradients, return_lse)
saved the logits and differentiates the same loss built from torch
operations. These tests compare both with PyTorch's double backward of
F.cross_entropy in float64 (hand-written torch ops for z_loss and the
softcap), check gradgradcheck, a MAML-style inner step, and the cases that
refuse a second derivative: the softcap on the C++ node, whose Hessian needs
the logits, a gradient written over the logits, and a third derivative.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fused_ce
import fused_ce.functional as fused_functional
from conftest import make_class_target, make_logits, make_prob_target, make_weight, ref_llm

DOUBLE_BACKWARD_NODE = "fused_ce::CrossEntropyGradientBackward"

CASES = {
    "plain": dict(),
    "weight-smoothing-ignore": dict(weight=True, label_smoothing=0.2, ignore=True),
    "sum-smoothing": dict(reduction="sum", label_smoothing=0.1, ignore=True),
    "zloss-weight": dict(weight=True, z_loss=0.05, ignore=True),
    "probabilities": dict(soft=True),
    "probabilities-weight-smoothing-zloss-sum": dict(soft=True, weight=True, label_smoothing=0.3, z_loss=0.02,
                                                     reduction="sum"),
}
SHAPES = {"2d": (6, 5), "3d": (4, 7, 3), "unbatched": (9,)}


def _inputs(case, shape, device, dtype=torch.float64):
    spec = CASES[case]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype, device).requires_grad_()
    if spec.get("soft"):
        t = make_prob_target(shape, dtype, device)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
        # (an unbatched target would be ignored altogether: test_all_ignored covers that)
        ignore = spec.get("ignore") and len(shape) > 1
        t = make_class_target(tshape, C, device, ignore_index=-100 if ignore else None)
    kwargs = dict(reduction=spec.get("reduction", "mean"), label_smoothing=spec.get("label_smoothing", 0.0))
    if spec.get("weight"):
        kwargs["weight"] = make_weight(C, dtype, device)
    return x, t, kwargs, spec.get("z_loss", 0.0)


def _reference_loss(x, t, kwargs, z_loss):
    """PyTorch's loss in float64 on the CPU, differentiable twice."""
    kwargs = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    if z_loss:
        loss, _ = ref_llm(x, t.cpu(), z_loss=z_loss, **kwargs)
        return loss
    return F.cross_entropy(x, t.cpu(), **kwargs)


def _hvp(loss_of, x, upstream, v):
    """(gradient, d<v, gradient>/dx, d<v, gradient>/d upstream) with create_graph=True."""
    loss = loss_of(x)
    (grad,) = torch.autograd.grad(loss, x, upstream, create_graph=True)
    d_x, d_upstream = torch.autograd.grad((grad * v).sum(), (x, upstream))
    return grad, d_x, d_upstream


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_hessian_vector_product_matches_torch(device, case, shape):
    x, t, kwargs, z_loss = _inputs(case, SHAPES[shape], device)
    v = torch.randn(x.shape, dtype=torch.float64)
    upstream = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().cpu().requires_grad_()
    want = _hvp(lambda a: _reference_loss(a, t, kwargs, z_loss), x_ref, upstream, v)
    got = _hvp(lambda a: fused_ce.cross_entropy(a, t, z_loss=z_loss, **kwargs), x,
               upstream.to(device).detach().requires_grad_(), v.to(device))
    for name, g, w in zip(("gradient", "d/dx", "d/d upstream"), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"{case} {shape} {name}: {m}")


@pytest.mark.parametrize("weight", [False, True])
def test_all_ignored(device, weight):
    # PyTorch: the mean is NaN, its gradient and the gradient's derivative w.r.t. x are 0, and the
    # derivative w.r.t. the upstream gradient is NaN (it divides by the total weight, 0, last)
    x = make_logits((4, 6), torch.float64, device).requires_grad_()
    t = torch.full((4,), -100, device=device)
    kwargs = dict(weight=make_weight(6, torch.float64, device)) if weight else {}
    v = torch.randn(x.shape, dtype=torch.float64)
    upstream = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().cpu().requires_grad_()
    want = _hvp(lambda a: _reference_loss(a, t, kwargs, 0.0), x_ref, upstream, v)
    got = _hvp(lambda a: fused_ce.cross_entropy(a, t, **kwargs), x, upstream.to(device).detach().requires_grad_(),
               v.to(device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forward-mode AD scripts a helper
@pytest.mark.parametrize("path", ["native", "none", "lse"])  # the C++ node; the Python Function twice
@pytest.mark.parametrize("case", ["weight-smoothing-ignore", "zloss-weight", "probabilities"])
def test_gradgradcheck(device, case, path):
    x, t, kwargs, z_loss = _inputs(case, (5, 4), device)
    if path == "none":
        kwargs["reduction"] = "none"

    def fn(a):
        return fused_ce.cross_entropy(a, t, z_loss=z_loss, return_lse=path == "lse", **kwargs)

    # Also forward-over-reverse (forward-mode tangents on the logits and on the
    # upstream gradient) and batched second derivatives.
    modes = dict(check_batched_grad=True, check_fwd_over_rev=True)
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, check_forward_ad=True)
    assert gradgradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, **modes)


@pytest.mark.parametrize("case", ["weight-smoothing-ignore", "probabilities"])
def test_reduction_none_per_element_node(device, case):
    # reduction="none" takes the C++ per-element node, which saved the logits: its second
    # derivatives come from the same loss built with torch operations
    x, t, kwargs, _ = _inputs(case, (4, 7, 3), device)
    kwargs["reduction"] = "none"
    v = torch.randn(x.shape, dtype=torch.float64)
    upstream = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().cpu().requires_grad_()
    want = _hvp(lambda a: _reference_loss(a, t, kwargs, 0.0), x_ref, upstream, v)
    got = _hvp(lambda a: fused_ce.cross_entropy(a, t, **kwargs), x, upstream.to(device).detach().requires_grad_(),
               v.to(device))
    for name, g, w in zip(("gradient", "d/dx", "d/d upstream"), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("soft", [False, True], ids=["class-target", "probabilities"])
def test_differentiable_loss_operator(device, soft):
    # The operator the per-element node differentiates for create_graph (its kernel the Python
    # formula): the fused forward's per-element loss in torch operations, and a registration that
    # opcheck accepts (schema, autograd, fake tensors, AOT dispatch).
    x = make_logits((4, 5, 3), torch.float64, device).requires_grad_()
    t = make_prob_target((4, 5, 3), torch.float64, device) if soft else make_class_target((4, 3), 5, device, -100)
    w = make_weight(5, torch.float64, device)
    args = (x, t, w, -100, 0.1, 0.01, 2.0)
    got = torch.ops.fused_ce.differentiable_loss(*args)
    want = fused_ce.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1, z_loss=0.01, softcap=2.0)
    torch.testing.assert_close(got, want.reshape(4, 3), rtol=1e-12, atol=1e-12)
    assert got.requires_grad
    torch.library.opcheck(torch.ops.fused_ce.differentiable_loss.default, args)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_reduction_none_third_derivative(device, softcap):
    # The per-element node's gradient carries a graph of torch operations: any order, the softcap
    # included, as PyTorch's.
    x, t, kwargs, _ = _inputs("zloss-weight", (5, 6), device)
    kwargs.update(reduction="none", z_loss=0.05, softcap=softcap)
    upstream = torch.rand(5, dtype=torch.float64)
    v, u = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)

    def third(loss_of, a):
        (grad,) = torch.autograd.grad(loss_of(a), a, upstream.to(a.device), create_graph=True)
        (hv,) = torch.autograd.grad((grad * v.to(a.device)).sum(), a, create_graph=True)
        return torch.autograd.grad((hv * u.to(a.device)).sum(), a)[0]

    got = third(lambda a: fused_ce.cross_entropy(a, t, **kwargs), x)
    want = third(lambda a: ref_llm(a, t.cpu(), **{k: (w.cpu() if torch.is_tensor(w) else w)
                                                   for k, w in kwargs.items()})[0],
                 x.detach().cpu().requires_grad_())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


def test_target_gradient_and_lse_python_path(device):
    # probabilities that require grad, and a differentiable lse, with z_loss and the softcap: mixed
    # second derivatives in x and the target, against the same loss in torch operations
    x = make_logits((5, 6), torch.float64, device).requires_grad_()
    q = make_prob_target((5, 6), torch.float64, device).requires_grad_()
    opts = dict(reduction="sum", z_loss=0.05, softcap=4.0, label_smoothing=0.1)
    v, u = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)

    def second_derivatives(loss_and_lse, a, b):
        loss, lse = loss_and_lse(a, b)
        ga, gb = torch.autograd.grad(loss + 0.3 * lse.sum(), (a, b), create_graph=True)
        mixed = (ga * v.to(ga.device)).sum() + (gb * u.to(gb.device)).sum()
        return (ga, gb) + torch.autograd.grad(mixed, (a, b))

    got = second_derivatives(lambda a, b: fused_ce.cross_entropy(a, b, return_lse=True, **opts), x, q)
    x_ref, q_ref = (t.detach().cpu().requires_grad_() for t in (x, q))
    want = second_derivatives(lambda a, b: ref_llm(a, b, **opts), x_ref, q_ref)
    for name, g, w in zip(("d/dx", "d/dq", "d2/dx", "d2/dq"), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_inplace_backward_refuses_a_second_derivative(device):
    x = make_logits((6, 5), torch.float32, device).requires_grad_()
    t = make_class_target((6,), 5, device)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x * 1.0, t, inplace_backward=True), x, create_graph=True)
    with pytest.raises(RuntimeError, match="computed in the forward"):
        grad.sum().backward()


def test_gradient_node_and_float32(device):
    # float32: the Hessian-vector product is computed from the float32 gradient
    x, t, kwargs, _ = _inputs("weight-smoothing-ignore", (16, 33), device, torch.float32)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t, **kwargs), x, create_graph=True)
    assert grad.grad_fn.name() == DOUBLE_BACKWARD_NODE
    v = torch.randn(x.shape)
    (d_x,) = torch.autograd.grad((grad * v.to(device)).sum(), x)
    x64 = x.detach().double().cpu().requires_grad_()
    kwargs64 = dict(kwargs, weight=kwargs["weight"].double())
    (g64,) = torch.autograd.grad(_reference_loss(x64, t, kwargs64, 0.0), x64, create_graph=True)
    (want,) = torch.autograd.grad((g64 * v.double()).sum(), x64)
    torch.testing.assert_close(d_x.cpu().double(), want, rtol=1e-4, atol=1e-6)


def _maml_meta_gradient(loss_fn, w0, features, labels, query, query_labels):
    """One MAML inner step on a linear classifier, then the query loss's gradient w.r.t. w0.

    The inner gradient is taken with create_graph=True and an upstream gradient that does not
    require grad (autograd.grad's default): the meta-gradient needs the loss's Hessian."""
    w = w0.detach().requires_grad_()
    (inner,) = torch.autograd.grad(loss_fn(features @ w, labels), w, create_graph=True)
    adapted = w - 0.5 * inner
    (meta,) = torch.autograd.grad(loss_fn(query @ adapted, query_labels), w)
    return meta


def test_maml_inner_step(device):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 5, dtype=torch.float64, generator=gen)
    features = torch.randn(12, 8, dtype=torch.float64, generator=gen)
    query = torch.randn(10, 8, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 5, (12,), generator=gen)
    query_labels = torch.randint(0, 5, (10,), generator=gen)
    args = [a.to(device) for a in (w0, features, labels, query, query_labels)]
    got = _maml_meta_gradient(lambda z, y: fused_ce.cross_entropy(z, y, label_smoothing=0.1), *args)
    want = _maml_meta_gradient(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1),
                               w0, features, labels, query, query_labels)
    # without the Hessian term the meta-gradient would be that of the query loss at the adapted weights
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


def test_device_scaled_gradient_stays_for_a_later_backward(device, monkeypatch):
    # CUDA's strategy (the held gradient, scaled in place by the first backward) on every device:
    # create_graph=True must not scale the held gradient, which a plain backward then still hands out
    monkeypatch.setattr(fused_functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))
    x, t, kwargs, _ = _inputs("weight-smoothing-ignore", (6, 5), device)
    x_ref = x.detach().cpu().requires_grad_()
    v = torch.randn(x.shape, dtype=torch.float64)
    loss = fused_ce.cross_entropy(x, t, **kwargs)
    (grad,) = torch.autograd.grad(loss * 3.0, x, create_graph=True)
    (d_x,) = torch.autograd.grad((grad * v.to(device)).sum(), x)
    (plain,) = torch.autograd.grad(loss, x)
    ref_loss = _reference_loss(x_ref, t, kwargs, 0.0)
    (ref_grad,) = torch.autograd.grad(ref_loss * 3.0, x_ref, create_graph=True)
    (ref_d_x,) = torch.autograd.grad((ref_grad * v).sum(), x_ref)
    torch.testing.assert_close(d_x.cpu(), ref_d_x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(plain.cpu(), ref_grad.detach() / 3.0, rtol=1e-9, atol=1e-12)


def test_softcap_refuses_a_second_derivative(device):
    x, t, kwargs, _ = _inputs("plain", (6, 5), device)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t, softcap=5.0), x, create_graph=True)
    with pytest.raises(RuntimeError, match="softcap"):
        grad.sum().backward()


def test_third_derivative_raises(device):
    x, t, kwargs, _ = _inputs("plain", (6, 5), device)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t), x, create_graph=True)
    (second,) = torch.autograd.grad((grad ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):
        second.sum().backward()


def test_differentiating_the_gradient_twice_needs_retain_graph(device):
    x, t, kwargs, _ = _inputs("weight-smoothing-ignore", (6, 5), device)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t, **kwargs), x, create_graph=True)
    first = torch.autograd.grad(grad.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(grad.sum(), x)[0]
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="retain_graph"):
        torch.autograd.grad(grad.sum(), x)


def test_linear_cross_entropy_refuses_a_second_derivative(device):
    # its gradients come from the chunk loop, without a graph: with create_graph=True they raise
    # when differentiated, also for an upstream gradient that needs no grad (where PyTorch's
    # once_differentiable would hand out gradients without history and the term would be lost)
    x = make_logits((8, 4), torch.float64, device).requires_grad_()
    w = make_logits((6, 4), torch.float64, device).requires_grad_()
    t = make_class_target((8,), 6, device)
    gx, gw = torch.autograd.grad(fused_ce.linear_cross_entropy(x, w, t), (x, w), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (gx.sum() + gw.sum()).backward()


def test_target_modified_in_place_refuses_a_second_derivative(device):
    # the second derivative reads the forward's targets: like a saved tensor, they must be unchanged
    x, t, kwargs, _ = _inputs("plain", (6, 5), device)
    loss = fused_ce.cross_entropy(x, t)
    t.add_(1).remainder_(5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(device, reduction):
    x = torch.randn(0, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    loss = fused_ce.cross_entropy(x, t, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss), create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert grad.shape == second.shape == x.shape


def _refusing_gradient(kind, device):
    x = make_logits((6, 5), torch.float64, device).requires_grad_()
    t = make_class_target((6,), 5, device)
    if kind == "softcap":
        loss = fused_ce.cross_entropy(x, t, softcap=3.0)
    elif kind == "inplace":
        loss = fused_ce.cross_entropy(x * 1.0, t, inplace_backward=True)
    else:  # the gradient of the gradient: a third derivative
        (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t), x, create_graph=True)
        return x, torch.autograd.grad((grad ** 2).sum(), x, create_graph=True)[0]
    return x, torch.autograd.grad(loss, x, create_graph=True)[0]


@pytest.mark.parametrize("kind", ["softcap", "inplace", "third"])
def test_refusals_are_reached_by_autograd_grad(device, kind):
    # torch.autograd.grad(..., x) only runs the nodes on paths to x: a refusal hung on a detached
    # leaf would be skipped and the term silently left out
    x, grad = _refusing_gradient(kind, device)
    with pytest.raises(RuntimeError, match="differentia"):
        torch.autograd.grad((grad * grad).sum() + x.sum(), x)


def test_functional_hvp_raises_rather_than_returning_zeros(device):
    # autograd.functional.hvp differentiates the Hessian-vector product with respect to the vector
    x = make_logits((4, 6), torch.float64, device)
    t = make_class_target((4,), 6, device)
    v = torch.randn_like(x)
    _, vhp = torch.autograd.functional.vhp(lambda a: fused_ce.cross_entropy(a, t), x, v)
    _, want = torch.autograd.functional.vhp(lambda a: F.cross_entropy(a.cpu(), t.cpu()), x.cpu(), v.cpu())
    torch.testing.assert_close(vhp.cpu(), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="hvp"):
        torch.autograd.functional.hvp(lambda a: fused_ce.cross_entropy(a, t), x, v)


@pytest.mark.parametrize("what", ["target", "weight"])
def test_operands_modified_after_the_first_backward(device, what):
    # the Hessian-vector product reads target and weight when it runs, after the create_graph backward
    x, t, kwargs, _ = _inputs("weight-smoothing-ignore", (6, 5), device)
    (grad,) = torch.autograd.grad(fused_ce.cross_entropy(x, t, **kwargs), x, create_graph=True)
    if what == "target":
        t.add_(1).remainder_(5)
    else:
        kwargs["weight"].mul_(3)
    with pytest.raises(RuntimeError, match=f"its {what}.*modified by an inplace operation"):
        torch.autograd.grad(grad.sum(), x)


def test_target_whose_canonical_view_is_a_copy(device):
    # a transposed (N, d1, d2) target is copied by the (N, D) reshape: no false in-place error
    x = make_logits((2, 3, 4, 5), torch.float64, device).requires_grad_()
    t = make_class_target((2, 5, 4), 3, device, ignore_index=-100).transpose(1, 2)
    t[0, 0, 0] = -100  # bumps the original's version
    got = _hvp(lambda a: fused_ce.cross_entropy(a, t), x, torch.tensor(1.0, dtype=torch.float64,
               device=device, requires_grad=True), torch.ones_like(x))
    x_ref = x.detach().cpu().requires_grad_()
    want = _hvp(lambda a: F.cross_entropy(a, t.cpu()), x_ref, torch.tensor(1.0, dtype=torch.float64,
                requires_grad=True), torch.ones_like(x_ref))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-12)


def test_device_scaled_plain_backward_between_hessian_products(device, monkeypatch):
    # CUDA's held gradient: a plain backward (which scales the held gradient in place) between two
    # differentiations of the create_graph gradient must not change the second one
    monkeypatch.setattr(fused_functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))
    x, t, kwargs, _ = _inputs("weight-smoothing-ignore", (6, 5), device)
    v = torch.randn(x.shape, dtype=torch.float64, device=device)
    loss = fused_ce.cross_entropy(x, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (first,) = torch.autograd.grad((grad * v).sum(), x, retain_graph=True)
    (plain,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    (second,) = torch.autograd.grad((grad * v).sum(), x)
    assert torch.equal(first, second)
    torch.testing.assert_close(plain, 3.0 * grad.detach(), rtol=1e-12, atol=0)
