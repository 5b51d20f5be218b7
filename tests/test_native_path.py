"""The two autograd paths of fused_ce.cross_entropy.

The common cases (the loss alone, or a reduced loss with a gradient for the
input only) take a C++ autograd node (csrc/autograd.cpp); every other case
takes the Python CrossEntropyFunction. These tests check which path each
case takes, and that the C++ node behaves as the Python Function does
wherever autograd's own machinery is involved: create_graph, saved-tensor
hooks, activation checkpointing, no_grad and inference mode, and tensors
that override __torch_function__. Values and gradients of both paths are
checked against PyTorch by the rest of the suite; the C++ node's second
derivatives (which the Python Function does not offer) by
test_double_backward.py.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fused_ce
from conftest import (NATIVE_NODE, PYTHON_NODE, assert_close_ref, grad_fn_name, make_class_target,
                      make_logits, make_prob_target, torch_reference)


def _leaf(shape, device, dtype=torch.float32):
    return make_logits(shape, dtype, device).requires_grad_()


@pytest.mark.parametrize(
    "kwargs, soft, target_grad, expected",
    [
        ({}, False, False, NATIVE_NODE),
        ({"reduction": "sum", "label_smoothing": 0.1}, False, False, NATIVE_NODE),
        ({"z_loss": 1e-3, "softcap": 20.0}, False, False, NATIVE_NODE),
        ({}, True, False, NATIVE_NODE),                      # probabilities, no target gradient
        ({"reduction": "none"}, False, False, PYTHON_NODE),  # per-element gradients
        ({}, True, True, PYTHON_NODE),                       # target gradient
        ({"return_lse": True}, False, False, PYTHON_NODE),
        ({"inplace_backward": True}, False, False, PYTHON_NODE),
    ],
    ids=["mean", "sum-smoothing", "zloss-softcap", "soft", "none", "target-grad", "return-lse", "inplace"],
)
def test_path_taken(device, kwargs, soft, target_grad, expected):
    x = _leaf((6, 11), device)
    t = make_prob_target((6, 11), device=device) if soft else make_class_target((6,), 11, device)
    t.requires_grad_(target_grad)
    out = fused_ce.cross_entropy(x, t, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    assert grad_fn_name(loss) == expected


def test_no_graph_without_gradients(device):
    x = _leaf((5, 9), device)
    t = make_class_target((5,), 9, device)
    want = torch_reference(x, t, reduction="none")[0]
    with torch.no_grad():
        loss = fused_ce.cross_entropy(x, t, reduction="none")
    assert loss.grad_fn is None and not loss.requires_grad and loss.shape == (5,)
    assert_close_ref(loss, want, torch.float32)
    with torch.inference_mode():
        loss = fused_ce.cross_entropy(x.detach(), t)
    assert loss.is_inference() and loss.grad_fn is None
    # grad mode on, but nothing requires grad
    loss = fused_ce.cross_entropy(x.detach(), t, label_smoothing=0.2)
    assert loss.grad_fn is None
    assert_close_ref(loss, torch_reference(x, t, label_smoothing=0.2)[0], torch.float32)


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 4, 2), (13,)], ids=["2d", "4d", "unbatched"])
def test_gradient_reaches_the_logits_in_their_shape(device, shape):
    x = _leaf(shape, device)
    C = shape[1] if len(shape) > 1 else shape[0]
    t = make_class_target((shape[0],) + shape[2:], C, device) if len(shape) > 1 else \
        make_class_target((), C, device, ignore_frac=0.0)
    loss = fused_ce.cross_entropy(x, t, reduction="sum")
    assert grad_fn_name(loss) == NATIVE_NODE
    loss.backward()
    want_loss, want_grad, _ = torch_reference(x, t, reduction="sum")
    assert x.grad.shape == x.shape
    assert_close_ref(loss, want_loss, torch.float32)
    assert_close_ref(x.grad, want_grad, torch.float32)


def test_channels_last_gradient_keeps_the_layout(device):
    x = make_logits((2, 6, 5, 3), torch.float32, device).to(memory_format=torch.channels_last).requires_grad_()
    t = make_class_target((2, 5, 3), 6, device)
    fused_ce.cross_entropy(x, t).backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert_close_ref(x.grad, torch_reference(x, t)[1], torch.float32)


def test_create_graph_for_the_rest_of_the_graph(device):
    # a gradient penalty elsewhere in the graph still gets its second-order term
    x = _leaf((4, 7), device, torch.float64)
    y = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    t = make_class_target((4,), 7, device, ignore_frac=0.0)
    loss = fused_ce.cross_entropy(x, t) + (y ** 3).sum()
    grad_x, grad_y = torch.autograd.grad(loss, (x, y), create_graph=True)
    assert_close_ref(grad_x, torch_reference(x, t)[1], torch.float64)
    grad_y.sum().backward()
    torch.testing.assert_close(y.grad, 6 * y.detach())


def test_saved_tensor_hooks_see_the_saved_gradient(device):
    x = _leaf((8, 33), device)
    t = make_class_target((8,), 33, device)
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor.clone()  # e.g. an offload: backward must use what unpack returns

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fused_ce.cross_entropy(x, t, label_smoothing=0.05)
    assert packed, "the node saved nothing through the hooks"
    loss.backward()
    assert_close_ref(x.grad, torch_reference(x, t, label_smoothing=0.05)[1], torch.float32)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(device, use_reentrant):
    x = _leaf((6, 20), device)
    w = torch.randn(20, 20, device=device, requires_grad=True)
    t = make_class_target((6,), 20, device)

    def head(inp, weight):
        return fused_ce.cross_entropy(inp @ weight, t)

    checkpoint(head, x, w, use_reentrant=use_reentrant).backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    head(x, w).backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


class _LoggingTensor(torch.Tensor):
    """A subclass that overrides __torch_function__ and counts the calls it sees."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclass_takes_the_python_path(device):
    # the C++ entry point would not honour __torch_function__; the Python Function's ops do
    x = make_logits((5, 8), torch.float32, device).as_subclass(_LoggingTensor).requires_grad_()
    t = make_class_target((5,), 8, device)
    _LoggingTensor.calls = 0
    loss = fused_ce.cross_entropy(x, t)
    assert _LoggingTensor.calls > 0
    loss.backward()
    assert_close_ref(x.grad.as_subclass(torch.Tensor), torch_reference(x.as_subclass(torch.Tensor), t)[1],
                     torch.float32)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forward_ad scripts a helper with torch.jit
def test_forward_mode_ad_is_not_silently_dropped(device):
    # A C++ node would return the loss without its tangent: cross_entropy sends dual
    # inputs elsewhere (test_forward_mode.py checks the tangents); the Python
    # Function, which has no jvp, raises when called directly.
    import torch.autograd.forward_ad as fwAD

    x = make_logits((4, 6), torch.float32, device)
    t = make_class_target((4,), 6, device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        assert fwAD.unpack_dual(fused_ce.cross_entropy(dual, t)).tangent is not None
        with pytest.raises(NotImplementedError):
            fused_ce.CrossEntropyFunction.apply(dual, t, None, -100, 0.0, 1)
