"""The CUDA strategy for the gradient of a reduced loss, exercised on every device.

On CUDA the forward computes the gradient (forward_with_grad) and the backward
scales it in place with scale_gradient_, which skips the pass on the device
when the upstream gradient is 1; a second backward through the same graph
recomputes it. The C++ autograd node (csrc/autograd.cpp) takes this path for the
devices that fused_ce.functional.DEVICE_SCALED_GRADIENT names; these tests add
the CPU to it, so the strategy's autograd logic is checked on machines without
a GPU too.
"""

import pytest
import torch
from torch.autograd import gradcheck

from torch.utils._python_dispatch import TorchDispatchMode

import fused_ce
import fused_ce.functional as fused_functional
from conftest import assert_close_ref, make_class_target, make_logits, make_weight, torch_reference


@pytest.fixture(autouse=True)
def _device_scaled_everywhere(monkeypatch):
    monkeypatch.setattr(fused_functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))


def _case(device, dtype=torch.float64, C=7):
    x = make_logits((9, C), dtype, device, scale=2.0).requires_grad_()
    t = make_class_target((9,), C, device, ignore_index=-100)
    w = make_weight(C, dtype, device)
    return x, t, w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradcheck(device, reduction, label_smoothing):
    # gradcheck backpropagates several times through one graph and requires
    # bitwise-equal results (reentrancy): the recomputed gradient must match
    # the one handed out first.
    x, t, w = _case(device)

    def fn(inp):
        return fused_ce.cross_entropy(inp, t, weight=w, reduction=reduction, label_smoothing=label_smoothing)

    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("upstream", [1.0, 2.5, 0.0])
def test_upstream_scale_and_second_backward(device, upstream):
    x, t, w = _case(device, torch.float32, C=40)
    loss = fused_ce.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss * upstream, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * upstream, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x)
    _, ref_g, _ = torch_reference(x, t, weight=w, label_smoothing=0.1)
    assert_close_ref(g1, ref_g * upstream, torch.float32, what="first backward")
    assert torch.equal(g1, g2), "a second backward through the graph must give the same bits"
    assert_close_ref(g3, ref_g, torch.float32, what="third backward, upstream 1")


def test_accumulates_into_a_leaf(device):
    # loss.backward() twice with retain_graph: x.grad is the sum of both
    x, t, _ = _case(device, torch.float32, C=12)
    loss = fused_ce.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(x.grad, 3 * first, rtol=1e-6, atol=1e-7)


class _FusedOpCalls(TorchDispatchMode):
    """Records the fused_ce operators that reach the dispatcher, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_ce":
            self.calls.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backwards", [1, 2])
def test_strategy_is_taken(device, backwards):
    # the gradient comes from forward_with_grad (whose losses reduce_loss reduces) and is
    # scaled by scale_gradient_; the backward operator is never called, and a second
    # backward recomputes the gradient
    x, t, _ = _case(device, torch.float32)
    with _FusedOpCalls() as spy:
        loss = fused_ce.cross_entropy(x, t)
        for _ in range(backwards):
            loss.backward(retain_graph=True)
    expected = ["cross_entropy_forward_with_grad", "reduce_loss", "scale_gradient_"]
    expected += ["cross_entropy_forward_with_grad", "scale_gradient_"] * (backwards - 1)
    assert spy.calls == expected
