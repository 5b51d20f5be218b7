"""torch.func transforms (grad, vmap, jacrev): fused_ce.cross_entropy under functorch.

Under a transform the loss goes through FunctorchCrossEntropyFunction (a
Function with setup_context, always the lse path). These tests compare
gradients, per-sample gradients (vmap over grad) and Jacobians with PyTorch's
F.cross_entropy under the same transforms, in float64; a second derivative
through a transform raises (the operators register autograd's "not
implemented" kernel) instead of coming out as zeros.
"""

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


def test_second_derivative_raises(device):
    x = make_logits((4, 6), torch.float64, device)
    t = make_class_target((4,), 6, device)
    first = torch.func.grad(lambda a: fused_ce.cross_entropy(a, t))
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.func.grad(lambda a: first(a).square().sum())(x)
