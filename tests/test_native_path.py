"""The two autograd paths of fused_ce.cross_entropy.

The common cases (the loss alone, or a gradient for the input only) take a
C++ autograd node: csrc/autograd.cpp's for a reduced loss,
csrc/per_element_loss.cpp's for reduction="none"; every other case takes
the Python CrossEntropyFunction. These tests check which path each case
takes, and that the C++ nodes behave as the Python Function does wherever
autograd's own machinery is involved: create_graph, saved-tensor hooks,
activation checkpointing, in-place changes, no_grad and inference mode, and
tensors that override __torch_function__. Values and gradients of every
path are checked against PyTorch by the rest of the suite; second
derivatives by test_double_backward.py.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fused_ce
from conftest import (NATIVE_NODE, PER_ELEMENT_NODE, PYTHON_NODE, assert_close_ref, grad_fn_name, identical, make_class_target,
                      make_logits, make_prob_target, outcome, torch_reference)


def _leaf(shape, device, dtype=torch.float32):
    return make_logits(shape, dtype, device).requires_grad_()


@pytest.mark.parametrize(
    "kwargs, soft, target_grad, expected",
    [
        ({}, False, False, NATIVE_NODE),
        ({"reduction": "sum", "label_smoothing": 0.1}, False, False, NATIVE_NODE),
        ({"z_loss": 1e-3, "softcap": 20.0}, False, False, NATIVE_NODE),
        ({}, True, False, NATIVE_NODE),                      # probabilities, no target gradient
        ({"reduction": "none"}, False, False, PER_ELEMENT_NODE),  # per-element gradients
        ({"reduction": "none"}, True, False, PER_ELEMENT_NODE),
        ({}, True, True, PYTHON_NODE),                       # target gradient
        ({"return_lse": True}, False, False, PYTHON_NODE),
        ({"inplace_backward": True}, False, False, PYTHON_NODE),
    ],
    ids=["mean", "sum-smoothing", "zloss-softcap", "soft", "none", "soft-none", "target-grad", "return-lse",
         "inplace"],
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


@pytest.fixture(params=["saved", "device-scaled"])
def gradient_strategy(request, monkeypatch):
    """Both ways the node keeps its gradient (csrc/autograd.cpp), on any device: saved and
    multiplied out of place, or held and scaled in place (CUDA's; here forced for the CPU too)."""
    from fused_ce import functional

    if request.param == "device-scaled":
        monkeypatch.setattr(functional, "DEVICE_SCALED_GRADIENT", ("cpu", "cuda"))
    else:
        monkeypatch.setattr(functional, "DEVICE_SCALED_GRADIENT", ())
    return request.param


def test_a_second_backward_needs_retain_graph(device, gradient_strategy):
    x = _leaf((5, 9), device)
    t = make_class_target((5,), 9, device)
    loss = fused_ce.cross_entropy(x, t)
    assert grad_fn_name(loss) == NATIVE_NODE
    assert loss.grad_fn.next_functions[0][0].variable is x
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("how", ["retain-graph", "saved-tensor-hook", "direct-call"])
def test_a_scaled_gradient_leaves_what_is_still_needed_intact(device, gradient_strategy, how):
    # An upstream gradient other than 1 (a sum over a token count) scales the saved gradient in
    # place only in a backward that frees the graph with nothing else holding it: a retained graph
    # gives the same gradient twice, a saved-tensor hook's packed tensor stays unscaled, and a
    # direct call of grad_fn (no backward running) leaves the node usable.
    x = _leaf((6, 11), device)
    t = make_class_target((6,), 11, device)
    want = 0.25 * torch_reference(x, t, reduction="sum")[1]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda g: packed.append(g) or g, lambda g: g):
        loss = fused_ce.cross_entropy(x, t, reduction="sum") if how == "saved-tensor-hook" else None
    if loss is None:
        loss = fused_ce.cross_entropy(x, t, reduction="sum")
    upstream = torch.tensor(0.25, device=device)
    if how == "retain-graph":
        first = torch.autograd.grad(loss, x, upstream, retain_graph=True)[0]
        second = torch.autograd.grad(loss, x, upstream)[0]
        assert_close_ref(first, want, torch.float32)
        assert identical(first, second)
    elif how == "saved-tensor-hook":
        kept = [g.clone() for g in packed]
        assert_close_ref(torch.autograd.grad(loss, x, upstream)[0], want, torch.float32)
        assert all(identical(g, k) for g, k in zip(packed, kept))
    else:
        with torch.no_grad():
            first, second = loss.grad_fn(upstream), loss.grad_fn(upstream)
        assert_close_ref(first, want, torch.float32)
        assert identical(first, second)


def test_gradient_for_other_tensors_leaves_the_loss_node_usable(device, gradient_strategy):
    # A backward that needs nothing from the loss node's input computes nothing there, and a
    # later backward through the same graph still gets the input's gradient.
    x = _leaf((6, 11), device)
    y = torch.randn(3, device=device, requires_grad=True)
    t = make_class_target((6,), 11, device)
    total = fused_ce.cross_entropy(x, t) + (y ** 2).sum()
    (grad_y,) = torch.autograd.grad(total, y, retain_graph=True)
    torch.testing.assert_close(grad_y, 2 * y.detach())
    assert x.grad is None
    total.backward()
    assert_close_ref(x.grad, torch_reference(x, t)[1], torch.float32)


def test_node_hooks_and_anomaly_mode(device, gradient_strategy):
    x = _leaf((4, 7), device)
    t = make_class_target((4,), 7, device)
    loss = fused_ce.cross_entropy(x, t, reduction="sum")
    seen = []
    loss.grad_fn.register_prehook(lambda grad_outputs: (seen.append("pre"), (grad_outputs[0] * 3,))[1])
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append("post"))
    with pytest.warns(UserWarning, match="Anomaly Detection"), torch.autograd.detect_anomaly():
        loss.backward()
    assert seen == ["pre", "post"]
    assert_close_ref(x.grad, 3 * torch_reference(x, t, reduction="sum")[1], torch.float32)


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


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(device, use_reentrant, reduction):
    x = _leaf((6, 20), device)
    w = torch.randn(20, 20, device=device, requires_grad=True)
    t = make_class_target((6,), 20, device)
    mask = torch.rand(6, device=device)

    def head(inp, weight):
        loss = fused_ce.cross_entropy(inp @ weight, t, reduction=reduction)
        return loss if reduction == "mean" else (loss * mask).sum()

    checkpoint(head, x, w, use_reentrant=use_reentrant).backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    head(x, w).backward()
    torch.testing.assert_close(grads[0], x.grad)
    torch.testing.assert_close(grads[1], w.grad)


# ---------------------------------------------------------------------------
# The per-element node (reduction="none" with a gradient for the input).


def _per_element_case(device, dtype=torch.float32):
    """Spatial logits (N, C, d), a target with ignored elements, class weights."""
    x = _leaf((5, 9, 3), device, dtype)
    t = make_class_target((5, 3), 9, device, ignore_index=-100)
    w = torch.rand(9, dtype=dtype, device=device)
    return x, t, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_per_element_node_matches_torch(device, dtype):
    # A random upstream gradient per element: the kernel's gradient, element by element.
    x, t, w = _per_element_case(device, dtype)
    options = dict(weight=w, label_smoothing=0.1, reduction="none")
    loss = fused_ce.cross_entropy(x, t, **options)
    assert grad_fn_name(loss) == PER_ELEMENT_NODE and loss.shape == (5, 3) and loss.dtype == dtype
    upstream = torch.randn(5, 3, device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    want_loss, want_grad, _ = torch_reference(x, t, grad_out=upstream, **options)
    assert_close_ref(loss, want_loss, dtype)
    assert_close_ref(grad, want_grad, dtype, what="gradient")


@pytest.mark.parametrize("layout", ["2d", "transposed", "spatial", "channels-last", "probabilities", "bfloat16"])
def test_per_element_node_gives_the_python_functions_bits(device, layout):
    # Both call the same operators on the same canonical views: loss and gradient agree bit for bit,
    # whatever the strides.
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    shape = {"spatial": (4, 7, 3, 2), "channels-last": (4, 7, 3, 2)}.get(layout, (6, 7))
    x = make_logits(shape, dtype, device)
    if layout == "transposed":
        x = make_logits((7, 6), dtype, device).t()
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    batch = (shape[0],) + shape[2:]
    t = (make_prob_target(shape, dtype, device) if layout == "probabilities"
         else make_class_target(batch, 7, device, ignore_index=-100))
    w = torch.rand(7, dtype=dtype, device=device)
    loss = fused_ce.cross_entropy(x, t, weight=w, reduction="none", label_smoothing=0.1)
    assert grad_fn_name(loss) == PER_ELEMENT_NODE
    want = fused_ce.CrossEntropyFunction.apply(x, t, w, -100, 0.1, 0)
    upstream = torch.randn_like(loss)
    assert identical(loss, want)
    assert identical(torch.autograd.grad(loss, x, upstream)[0], torch.autograd.grad(want, x, upstream)[0])


def test_per_element_loss_may_be_modified_in_place(device):
    # As PyTorch's: the node keeps the lse, not the loss, so the loss is the caller's to change.
    x, t, w = _per_element_case(device)
    loss = fused_ce.cross_entropy(x, t, weight=w, reduction="none")
    loss.mul_(3.0)
    loss.sum().backward()
    want_grad = torch_reference(x, t, weight=w, grad_out=torch.full((5, 3), 3.0), reduction="none")[1]
    assert_close_ref(x.grad, want_grad, torch.float32, what="gradient")


@pytest.mark.parametrize("modified", ["input", "target", "weight"])
def test_per_element_node_refuses_operands_modified_since_the_forward(device, modified):
    leaf, t, w = _per_element_case(device)
    x = leaf * 1.0  # a non-leaf, which may be modified in place
    loss = fused_ce.cross_entropy(x, t, weight=w, reduction="none")
    {"input": x, "target": t, "weight": w}[modified].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_per_element_node_saves_everything_through_saved_tensor_hooks(device):
    # Offloading hooks see the logits, target, weight and lse, and the backward uses what unpack
    # returns (here clones; the originals are then changed, which must not matter).
    x, t, w = _per_element_case(device)
    packed = []

    def pack(tensor):
        packed.append(tuple(tensor.shape))
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fused_ce.cross_entropy(x, t, weight=w, reduction="none")
    assert sorted(packed) == sorted([(5, 9, 3), (5, 3), (9,), (5, 3)])
    upstream = torch.rand(5, 3, device=device)
    want_grad = torch_reference(x, t, weight=w, grad_out=upstream, reduction="none")[1]
    t.fill_(0)
    loss.backward(upstream)
    assert_close_ref(x.grad, want_grad, torch.float32, what="gradient")


def test_per_element_node_second_backward_and_other_tensors(device):
    x, t, w = _per_element_case(device)
    y = torch.randn(3, device=device, requires_grad=True)
    upstream = torch.rand(5, 3, device=device)
    total = (fused_ce.cross_entropy(x, t, weight=w, reduction="none") * upstream).sum() + (y ** 2).sum()
    torch.autograd.grad(total, y, retain_graph=True)  # computes nothing for x
    assert x.grad is None
    total.backward(retain_graph=True)
    first = x.grad.clone()
    total.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    assert_close_ref(first, torch_reference(x, t, weight=w, grad_out=upstream, reduction="none")[1],
                     torch.float32, what="gradient")
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        total.backward()


def test_per_element_node_hooks_and_anomaly_mode(device):
    x, t, _ = _per_element_case(device)
    loss = fused_ce.cross_entropy(x, t, reduction="none")
    seen = []
    loss.grad_fn.register_prehook(lambda grad_outputs: (seen.append("pre"), (grad_outputs[0] * 3,))[1])
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append("post"))
    with pytest.warns(UserWarning, match="Anomaly Detection"), torch.autograd.detect_anomaly():
        loss.sum().backward()
    assert seen == ["pre", "post"]
    want_grad = torch_reference(x, t, grad_out=torch.full((5, 3), 3.0), reduction="none")[1]
    assert_close_ref(x.grad, want_grad, torch.float32, what="gradient")


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


# ---------------------------------------------------------------------------
# The plain call: cross_entropy hands a call whose arguments cannot fail any
# of its checks straight to the C++ node (functional._plain_call). The spy
# below tells whether the checks ran; forcing the full path gives what the
# plain one must reproduce.

@pytest.fixture
def checks_run(monkeypatch):
    """A list that gets one entry per call of cross_entropy's argument checks."""
    from fused_ce import functional

    calls = []
    check = functional.check_loss_options

    def counted(*args, **kwargs):
        calls.append(args)
        return check(*args, **kwargs)

    monkeypatch.setattr(functional, "check_loss_options", counted)
    return calls


def _full_path(monkeypatch):
    from fused_ce import functional

    monkeypatch.setattr(functional, "_plain_call", lambda *args: None)


def _plain_case(name, device):
    """(logits, target, kwargs) of a plain call."""
    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(name, torch.float32)
    rows = 0 if name == "empty-batch" else 9
    x = make_logits((rows, 17), dtype, device).requires_grad_(name not in ("no-grad-leaf", "none-without-grad"))
    t = make_class_target((rows,), 17, device)
    kwargs = {
        "sum": {"reduction": "sum"},
        "none-without-grad": {"reduction": "none"},
        "none": {"reduction": "none", "weight": torch.rand(17, dtype=dtype, device=device)},
        "weight": {"weight": torch.rand(17, dtype=dtype, device=device)},
        "smoothing-ignore": {"label_smoothing": 0.2, "ignore_index": 3},
        "zloss-softcap": {"z_loss": 1e-2, "softcap": 5.0},
        "module-defaults": {"z_loss": 0.0, "softcap": None, "return_lse": False, "inplace_backward": False,
                            "validate": False},
    }.get(name, {})
    return x, t, kwargs


PLAIN_CASES = ["mean", "sum", "none-without-grad", "none", "weight", "smoothing-ignore", "zloss-softcap",
               "module-defaults", "float64", "bfloat16", "empty-batch", "no-grad-leaf"]


@pytest.mark.parametrize("name", PLAIN_CASES)
def test_plain_calls_skip_the_checks_and_give_the_full_paths_bits(device, monkeypatch, checks_run, name):
    x, t, kwargs = _plain_case(name, device)
    loss = fused_ce.cross_entropy(x, t, **kwargs)
    assert not checks_run, "a plain call ran the argument checks"
    upstream = torch.rand_like(loss)
    grad = torch.autograd.grad(loss, x, upstream)[0] if loss.requires_grad else None

    _full_path(monkeypatch)
    want = fused_ce.cross_entropy(x, t, **kwargs)
    assert len(checks_run) == 1
    assert grad_fn_name(loss) == grad_fn_name(want)
    assert identical(loss, want)
    if grad is not None:
        assert identical(grad, torch.autograd.grad(want, x, upstream)[0])


def test_plain_call_under_no_grad_computes_no_gradient(device, checks_run):
    x, t, _ = _plain_case("mean", device)
    with torch.no_grad():
        loss = fused_ce.cross_entropy(x, t, reduction="none")
    assert not checks_run and loss.grad_fn is None and loss.shape == (9,)
    assert_close_ref(loss, torch_reference(x, t, reduction="none")[0], torch.float32)


class _Mode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _not_plain_cases(device):
    """name -> a call that must go through the checks: one argument at a time off the plain call,
    valid or not (the checks give the invalid ones their errors)."""
    x = make_logits((6, 11), torch.float32, device).requires_grad_()
    t = make_class_target((6,), 11, device)
    numpy = pytest.importorskip("numpy")
    w = torch.rand(11, device=device)
    call = fused_ce.cross_entropy
    return {
        "legacy-size-average": lambda: call(x, t, size_average=False),
        "legacy-reduce": lambda: call(x, t, reduce=True),
        "elementwise-mean": lambda: call(x, t, reduction="elementwise_mean"),
        "bad-reduction": lambda: call(x, t, reduction="avg"),
        "numpy-ignore-index": lambda: call(x, t, ignore_index=numpy.int64(-100)),
        "bool-ignore-index": lambda: call(x, t, ignore_index=True),
        "int-smoothing": lambda: call(x, t, label_smoothing=0),
        "smoothing-above-1": lambda: call(x, t, label_smoothing=1.5),
        "nan-smoothing": lambda: call(x, t, label_smoothing=float("nan")),
        "int-z-loss": lambda: call(x, t, z_loss=0),
        "negative-z-loss": lambda: call(x, t, z_loss=-1.0),
        "infinite-softcap": lambda: call(x, t, softcap=float("inf")),
        "zero-softcap": lambda: call(x, t, softcap=0.0),
        "return-lse": lambda: call(x, t, return_lse=True),
        "inplace-backward": lambda: call(x.clone(), t, inplace_backward=True),
        "validate": lambda: call(x, t, validate=True),
        "input-subclass": lambda: call(torch.nn.Parameter(x.detach().clone()), t),
        "input-not-a-tensor": lambda: call(x.tolist(), t),
        "uint8-target": lambda: call(x, t.clamp(min=0).to(torch.uint8)),
        "int32-target": lambda: call(x, t.int()),
        "float-target": lambda: call(x, t.float()),
        "probabilities": lambda: call(x, torch.softmax(torch.randn(6, 11, device=device), 1)),
        "unbatched": lambda: call(x[0], t[0]),
        "spatial": lambda: call(x.reshape(6, 11, 1), t.reshape(6, 1)),
        "short-target": lambda: call(x, t[:5]),
        "no-classes": lambda: call(x[:, :0], t.clamp(max=-100)),
        "target-elsewhere": lambda: call(x, t.to("meta")),
        "integer-logits": lambda: call(x.detach().long(), t),
        "weight-wrong-dtype": lambda: call(x, t, weight=w.double()),
        "weight-wrong-shape": lambda: call(x, t, weight=w[:10]),
        "weight-2d": lambda: call(x, t, weight=w.reshape(1, 11)),
        "weight-strided": lambda: call(x, t, weight=torch.rand(22, device=device)[::2]),
        "weight-requires-grad": lambda: call(x, t, weight=w.clone().requires_grad_()),
        "weight-elsewhere": lambda: call(x, t, weight=w.to("meta")),
        "autocast-half": lambda: _under_autocast(device, call, x.detach().bfloat16().requires_grad_(), t),
        "function-mode": lambda: _under(_Mode(), call, x, t),
        "forward-ad": lambda: _with_tangent(call, x.detach(), t),
        "vmap": lambda: torch.func.vmap(lambda row: call(row.unsqueeze(0), t[:1]))(x),
    }


def _under(context, fn, *args):
    with context:
        return fn(*args)


def _under_autocast(device, fn, *args):
    return _under(torch.autocast(device.split(":")[0], dtype=torch.bfloat16), fn, *args)


def _with_tangent(fn, x, t):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fn(fwAD.make_dual(x, torch.randn_like(x)), t)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_other_calls_run_the_checks(device, checks_run):
    skipped = []
    for name, run in _not_plain_cases(device).items():
        checks_run.clear()
        outcome(run)
        if not checks_run:
            skipped.append(name)
    assert not skipped, f"these calls skipped the argument checks: {skipped}"


def test_module_calls_are_plain(device, checks_run):
    x, t, _ = _plain_case("mean", device)
    criterion = fused_ce.CrossEntropyLoss(weight=torch.rand(17, device=device), label_smoothing=0.1)
    loss = criterion(x, t)
    assert not checks_run and grad_fn_name(loss) == NATIVE_NODE
    loss.backward()
    want = torch_reference(x, t, weight=criterion.weight, label_smoothing=0.1)
    assert_close_ref(loss, want[0], torch.float32)
    assert_close_ref(x.grad, want[1], torch.float32)
