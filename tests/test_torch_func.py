"""torch.func transforms (grad, vmap, jacrev): fused_ce.cross_entropy under functorch.

Under a transform the loss goes through FunctorchCrossEntropyFunction (a
Function with setup_context, always the lse path). These tests compare
gradients, per-sample gradients (vmap over grad) and Jacobians with PyTorch's
F.cross_entropy under the same transforms, in float64. Forward mode and
nested transforms (jvp, jacfwd, hessian, grad of grad) take another path:
test_forward_mode.py.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from conftest import make_class_target, make_logits, make_prob_target, make_weight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func scripts a helper


def _close(got, want):
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("soft", [False, True], ids=["classes", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad(device, reduction, soft):
    x = make_logits((6, 5, 3), torch.float64, device)
    if soft:
        t = make_prob_target((6, 5, 3), torch.float64, device)
    else:
        t = make_class_target((6, 3), 5, device, ignore_index=-100)
    kwargs = dict(weight=make_weight(5, torch.float64, device), label_smoothing=0.1, reduction=reduction)
    want = torch.func.grad(lambda a: F.cross_entropy(a, t, **kwargs))(x)
    got = torch.func.grad(lambda a: fused_ce.cross_entropy(a, t, **kwargs))(x)
    _close(got, want)


def test_per_sample_gradients(device):
    # vmap over grad of an unbatched loss: one gradient per example (DP-SGD, influence functions)
    x = make_logits((7, 9), torch.float64, device)
    t = make_class_target((7,), 9, device)

    def per_sample(loss_fn):
        return torch.func.vmap(torch.func.grad(lambda a, b: loss_fn(a, b, label_smoothing=0.2)))(x, t)

    _close(per_sample(fused_ce.cross_entropy), per_sample(F.cross_entropy))


def test_jacobian_of_per_element_losses(device):
    x = make_logits((4, 6), torch.float64, device)
    t = make_class_target((4,), 6, device, ignore_index=-100)
    want = torch.func.jacrev(lambda a: F.cross_entropy(a, t, reduction="none"))(x)
    got = torch.func.jacrev(lambda a: fused_ce.cross_entropy(a, t, reduction="none"))(x)
    _close(got, want)


def test_lse_and_z_loss(device):
    x = make_logits((5, 8), torch.float64, device)
    t = make_class_target((5,), 8, device)

    def fused(a):
        loss, lse = fused_ce.cross_entropy(a, t, z_loss=1e-2, return_lse=True)
        return loss + 0.5 * lse.sum()

    def reference(a):
        lse = torch.logsumexp(a, 1)
        return F.cross_entropy(a, t) + 1e-2 * lse.square().mean() + 0.5 * lse.sum()

    _close(torch.func.grad(fused)(x), torch.func.grad(reference)(x))


# vmap batching rules (fused_ce/_vmap.py): the operators run once for the
# whole batch, the vmapped dimension folded into the rows. Registered from
# torch 2.6 on; with an older torch its fallback runs them element by element.
VMAP_RULES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)

@pytest.mark.parametrize("soft", [False, True], ids=["classes", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
def test_vmap_matches_torch_without_fallback(device, reduction, soft, weighted):
    x = make_logits((4, 6, 5, 3), torch.float64, device)
    if soft:
        t = make_prob_target((4, 6, 5, 3), torch.float64, device)
    else:
        t = make_class_target((4, 6, 3), 5, device, ignore_index=-100)
        t[1] = -100  # one batch element all ignored: its mean alone is NaN
    kwargs = dict(weight=make_weight(5, torch.float64, device) if weighted else None,
                  label_smoothing=0.1, reduction=reduction)

    def loss_and_grad(loss_fn):
        return torch.func.vmap(torch.func.grad_and_value(lambda a, b: loss_fn(a, b, **kwargs).sum()))(x, t)

    with warnings.catch_warnings():
        # functorch's "no batching rule" warning: an error where the rules are registered, from
        # torch 2.6 on (fused_ce/_vmap.py); before, the results must still match.
        warnings.simplefilter("error" if VMAP_RULES else "ignore")
        got = loss_and_grad(fused_ce.cross_entropy)
    for g, w in zip(got, loss_and_grad(F.cross_entropy)):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=1e-9, atol=1e-12, equal_nan=True)


def test_vmap_in_dims_and_nesting(device):
    x = make_logits((3, 4, 6), torch.float64, device)
    t = make_class_target((3, 4), 6, device, ignore_index=-100)
    weight = make_weight(6, torch.float64, device)
    cases = [
        # (function of (x, t), in_dims, arguments)
        (lambda a, b: fn(a, b, weight=weight), (1, 1), (x.transpose(0, 1), t.t())),  # not dim 0
        (lambda a, b: fn(a, b), (2, 1), (x.permute(1, 2, 0), t.t())),                # nor 1
        (lambda a, b: fn(a, b, label_smoothing=0.2), (0, None), (x, t[0])),          # shared target
        (lambda a, b: fn(a, b, reduction="sum"), (None, 0), (x[0], t)),              # shared logits
        (lambda a, w: fn(a, t[0], weight=w), (0, 0),
         (x, torch.rand(3, 6, dtype=torch.float64, device=device) + 0.5)),           # vmapped weight
    ]
    for make, in_dims, args in cases:
        results = []
        for fn in (fused_ce.cross_entropy, F.cross_entropy):
            results.append(torch.func.vmap(torch.func.grad(make, argnums=0), in_dims)(*args))
        _close(*results)
    # vmap of vmap, per element of a (2, 3, 4) batch of rows
    rows, row_targets = make_logits((2, 3, 7), torch.float64, device), t[:2, :3].clamp(min=0)
    nested = [torch.func.vmap(torch.func.vmap(torch.func.grad(lambda a, b: fn(a, b, label_smoothing=0.1))))(
        rows, row_targets) for fn in (fused_ce.cross_entropy, F.cross_entropy)]
    _close(*nested)


def test_vmap_gradients_for_probability_targets(device):
    x = make_logits((5, 4, 6), torch.float64, device)
    t = make_prob_target((5, 4, 6), torch.float64, device)
    results = [torch.func.vmap(torch.func.grad(lambda a, b: fn(a, b, label_smoothing=0.3), argnums=(0, 1)))(x, t)
               for fn in (fused_ce.cross_entropy, F.cross_entropy)]
    for got, want in zip(*results):
        _close(got, want)


def test_vmap_empty_batches_and_rows(device):
    # vmap over zero elements and elements with zero rows (the folded rows cannot be
    # unfolded by inference: B * N = 0)
    cases = [((0, 4, 5), (0, 4), None), ((3, 0, 5), (3, 0), None), ((2, 0, 5), (2, 0), (2, 5))]
    for shape, target_shape, weight_shape in cases:
        x = make_logits(shape, torch.float64, device)
        t = make_class_target(target_shape, 5, device)
        w = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64, device=device)
        for reduction in ("mean", "sum", "none"):
            results = []
            for fn in (fused_ce.cross_entropy, F.cross_entropy):
                def loss(a, b, c, fn=fn):
                    return fn(a, b, weight=c, reduction=reduction).sum()
                in_dims = (0, 0, None if w is None else 0)
                results.append(torch.func.vmap(torch.func.grad_and_value(loss), in_dims)(x, t, w))
            for got, want in zip(*results):
                assert got.shape == want.shape
                torch.testing.assert_close(got.cpu(), want.cpu(), equal_nan=True)


def test_vmap_weights_over_an_empty_batch(device):
    # (PyTorch's own fallback loop raises here: it has no element to run)
    x, t = make_logits((0, 4, 5), torch.float64, device), make_class_target((0, 4), 5, device)
    w = torch.rand(0, 5, dtype=torch.float64, device=device)
    grad, loss = torch.func.vmap(torch.func.grad_and_value(
        lambda a, b, c: fused_ce.cross_entropy(a, b, weight=c)))(x, t, w)
    assert grad.shape == (0, 4, 5) and loss.shape == (0,)
