"""First derivatives of the operators themselves (csrc/operator_autograd.cpp).

fused_ce's losses differentiate through their own autograd nodes; these formulas serve graphs
that hold the operators directly: a model exported with torch.export (the autograd Function is
inlined, the operators stay) and trained afterwards, and direct calls of torch.ops.fused_ce.*.
Checked against float64 PyTorch and with gradcheck; a second derivative raises.
"""

import pytest
import torch

import fused_ce  # noqa: F401  (registers the operators)
from conftest import (assert_close_ref, make_class_target, make_logits, make_prob_target, make_weight,
                      ref_llm, train_exported_loss_model)

ops = torch.ops.fused_ce


def _canonical(x, t):
    """The operators' layout: input (N, C, D), class target (N, D) or probabilities (N, C, D)."""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    return x3, (t.reshape(n, c, -1) if t.is_floating_point() else t.reshape(n, -1))


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)],
                         ids=["plain", "smoothing-zloss-softcap"])
def test_forward_operator_gradients_match_torch(device, kind, options):
    """d(sum(a * loss_i + b * lse_i))/d(input), and /d(target) for probabilities, from the
    operator's own backward, against the same quantities from torch operations in float64."""
    x = make_logits((5, 9, 3), torch.float64, device)
    t = make_class_target((5, 3), 9, device, ignore_index=-100) if kind == "class" else \
        make_prob_target((5, 9, 3), torch.float64, device)
    w = make_weight(9, torch.float64, device) if kind == "class" else None
    a, b = torch.rand(5, 3, device=device, dtype=torch.float64), torch.rand(5, 3, device=device, dtype=torch.float64)
    full = dict(label_smoothing=0.0, z_loss=0.0, softcap=0.0) | options

    xs, ts = x.clone().requires_grad_(), t.clone().requires_grad_(kind == "prob")
    x3, t3 = _canonical(xs, ts)
    loss, lse, _ = ops.cross_entropy_forward(x3, t3, w, -100, full["label_smoothing"], full["z_loss"],
                                             full["softcap"])
    (a * loss + b * lse).sum().backward()

    xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_(kind == "prob")
    ref_loss, ref_lse = ref_llm(xr, tr, w, reduction="none", ignore_index=-100,
                                label_smoothing=full["label_smoothing"], z_loss=full["z_loss"],
                                softcap=full["softcap"] or None)
    (a * ref_loss + b * ref_lse).sum().backward()
    assert_close_ref(xs.grad, xr.grad, torch.float64, what="input gradient")
    if kind == "prob":
        assert_close_ref(ts.grad, tr.grad, torch.float64, what="target gradient")


@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
def test_gradcheck_of_the_operators(device, reduction):
    """gradcheck of the forward operators (loss and lse) and of reduce_loss, in float64."""
    x = make_logits((4, 6, 2), torch.float64, device).requires_grad_()
    t = make_class_target((4, 2), 6, device, ignore_index=-100)
    w = make_weight(6, torch.float64, device)

    def forward(x):
        loss, lse, _ = ops.cross_entropy_forward(x, t, w, -100, 0.1, 1e-2, 0.0)
        return loss, lse

    def with_grad(x):
        loss, lse, _, _ = ops.cross_entropy_forward_with_grad(x, t, w, -100, 0.0, 0.0, 3.0, reduction)
        return loss, lse

    def reduced(x):
        loss, _, total_weight = ops.cross_entropy_forward(x, t, w, -100, 0.0, 0.0, 0.0)
        return ops.reduce_loss(loss, total_weight, reduction, torch.float64)

    for fn in (forward, with_grad, reduced):
        assert torch.autograd.gradcheck(fn, (x,)), fn.__name__


def test_a_second_derivative_raises(device):
    """The operators' gradient comes from cross_entropy_backward, which has no derivative:
    differentiating it raises instead of giving a silent zero."""
    x = make_logits((3, 5), torch.float64, device).reshape(3, 5, 1).requires_grad_()
    t = make_class_target((3, 1), 5, device)
    loss, _, _ = ops.cross_entropy_forward(x, t, None, -100, 0.0, 0.0, 0.0)
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        g.sum().backward()


def test_without_grad_the_operators_record_nothing(device):
    """No graph where no input requires grad, or under no_grad: the kernels only pass the call on."""
    x = make_logits((3, 5, 1), torch.float32, device)
    t = make_class_target((3, 1), 5, device)
    loss, lse, total_weight = ops.cross_entropy_forward(x, t, None, -100, 0.0, 0.0, 0.0)
    assert loss.grad_fn is None and lse.grad_fn is None
    with torch.no_grad():
        out = ops.cross_entropy_forward(x.requires_grad_(), t, None, -100, 0.0, 0.0, 0.0)
    assert all(o.grad_fn is None for o in out)
    assert ops.reduce_loss(loss, total_weight, 1, torch.float32).grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_exported_model_trains(device, dtype):
    """torch.export of a model whose forward returns fused_ce's loss keeps the operators; the
    exported module's backward runs through their derivatives and gives PyTorch's gradients."""
    train_exported_loss_model(device, dtype)


def test_opcheck_with_inputs_that_require_grad(device):
    """torch.library.opcheck with the input requiring grad: the autograd registrations and the
    backward traced through AOT dispatch (fake kernels of cross_entropy_backward)."""
    x = make_logits((4, 6, 3), torch.float32, device).requires_grad_()
    t = make_class_target((4, 3), 6, device, ignore_index=-100)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, t, None, -100, 0.1, 0.0, 0.0))
    torch.library.opcheck(ops.cross_entropy_forward_with_grad.default, (x, t, None, -100, 0.0, 0.01, 0.0, 1))
    loss = torch.rand(4, 3, device=device).requires_grad_()
    total = torch.tensor(7.0, device=device)
    torch.library.opcheck(ops.reduce_loss.default, (loss, total, 1, torch.float32))
