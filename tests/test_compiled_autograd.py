"""Compiled autograd (torch._dynamo.compiled_autograd): the backward of a graph holding fused_ce's
C++ nodes, traced and compiled instead of run node by node by autograd's engine.

What turns it on: torch.compile's ``compiled_autograd`` option, and the ``_enable`` context that
training loops wrap around ``loss.backward()`` (the forward often outside it). Without
compiled_args / apply_with_saved on the nodes such a backward raised "compiled_args not
implemented: fused_ce::CrossEntropyLossBackward". Every case checks the gradient against eager
PyTorch in float64 and that the backward did go through compiled autograd (its compile counter).
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo import compiled_autograd

import fused_ce
from conftest import (NATIVE_NODE, PER_ELEMENT_NODE, assert_close_ref, grad_fn_name, make_class_target,
                      make_logits, make_prob_target, make_weight, ref_llm, train_exported_loss_model)

# The C++ nodes take part in compiled autograd when built against torch 2.7 or newer, whose API for
# it they use (csrc/compiled_autograd_step.h); built against an older torch, a compiled backward
# through them raises PyTorch's error, which test_the_nodes_take_part_from_torch_2_7 checks there
# instead of the cases below.
pytestmark = [pytest.mark.compile, pytest.mark.usefixtures("fresh_dynamo")]
requires_compiled_autograd_nodes = pytest.mark.skipif(
    not fused_ce._C.compiled_autograd_nodes(),
    reason=f"fused_ce was built against torch {torch.__version__}: its nodes take part in compiled autograd "
           f"from torch 2.7 on")


def test_the_nodes_take_part_from_torch_2_7(device):
    supported = fused_ce._C.compiled_autograd_nodes()
    assert supported == (torch.torch_version.TorchVersion(torch.__version__) >= (2, 7))
    x = make_logits((8, 10), device=device).requires_grad_()
    t = make_class_target((8,), 10, device)
    compiler = _CountingCompiler()
    # (torch 2.5 and older name the context manager enable)
    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable
    with enable(compiler):
        if supported:
            fused_ce.cross_entropy(x, t).backward()
        else:
            with pytest.raises(RuntimeError, match="compiled_args not implemented"):
                fused_ce.cross_entropy(x, t).backward()
    assert compiler.graphs == (1 if supported else 0)


class _CountingCompiler:
    """A compiled-autograd compiler (torch.compile with the given backend) that counts the
    backward graphs it is handed."""

    def __init__(self, backend="eager"):
        self.backend = backend
        self.graphs = 0

    def __call__(self, graph):
        self.graphs += 1
        return torch.compile(graph, backend=self.backend, fullgraph=True)


def _reference_gradient(x, t, w, upstream=None, **options):
    """The float64 reference: d(sum(upstream * loss))/dx, with ``options`` as fused_ce takes them."""
    x64 = x.detach().double().requires_grad_()
    loss, _ = ref_llm(x64, t, None if w is None else w.double(), **options)
    grad = torch.ones_like(loss) if upstream is None else upstream.double()
    (loss * grad).sum().backward()
    return x64.grad


CASES = [
    # (shape, dtype, options): reduced losses take fused_ce::CrossEntropyLossBackward, "none"
    # fused_ce::PerElementLossBackward
    ((16, 40), torch.float32, dict(reduction="mean")),
    ((16, 40), torch.float32, dict(reduction="sum", label_smoothing=0.1, use_weight=True)),
    ((6, 40, 3), torch.float32, dict(reduction="mean", ignore_index=-100, use_weight=True)),
    ((16, 40), torch.bfloat16, dict(reduction="mean", z_loss=1e-3, softcap=15.0)),
    ((16, 40), torch.float32, dict(reduction="none", label_smoothing=0.2, use_weight=True)),
    ((6, 40, 3), torch.bfloat16, dict(reduction="none", ignore_index=-100, z_loss=1e-3, softcap=15.0)),
]


@requires_compiled_autograd_nodes
@pytest.mark.parametrize("shape, dtype, options", CASES,
                         ids=["mean", "sum-smoothing-weight", "spatial-ignored-weight", "bf16-zloss-softcap",
                              "none-smoothing-weight", "none-spatial-bf16-zloss-softcap"])
@pytest.mark.parametrize("forward_inside", [True, False], ids=["forward-inside", "forward-outside"])
def test_backward_under_compiled_autograd_matches_torch(device, shape, dtype, options, forward_inside):
    options = dict(options)
    use_weight = options.pop("use_weight", False)
    C = shape[1]
    x = make_logits(shape, dtype, device).requires_grad_()
    t = make_class_target((shape[0],) + shape[2:], C, device,
                          ignore_index=options.get("ignore_index") if "ignore_index" in options else None)
    w = make_weight(C, dtype, device) if use_weight else None
    # a loss times a number (a token count's normalisation), or per-element losses times a mask
    upstream = (torch.rand(t.shape, device=device) > 0.3).to(torch.float32) if options["reduction"] == "none" \
        else torch.tensor(0.37, device=device)
    compiler = _CountingCompiler()

    def loss_of(x):
        return fused_ce.cross_entropy(x, t, weight=w, **options)

    if forward_inside:
        with compiled_autograd._enable(compiler):
            loss = loss_of(x)
            (loss * upstream.to(loss.dtype)).sum().backward()
    else:
        loss = loss_of(x)
        with compiled_autograd._enable(compiler):
            (loss * upstream.to(loss.dtype)).sum().backward()
    assert grad_fn_name(loss) == (PER_ELEMENT_NODE if options["reduction"] == "none" else NATIVE_NODE)
    assert compiler.graphs == 1
    ref = _reference_gradient(x, t, w, upstream, **options)
    assert_close_ref(x.grad, ref, dtype, what="gradient under compiled autograd")


@requires_compiled_autograd_nodes
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_cached_graph_takes_the_next_steps_tensors(device, reduction):
    """The second and third steps reuse the compiled graph (same shapes, same options) with their
    own logits, targets and weights, which compiled_args hands over as the graph's inputs."""
    compiler = _CountingCompiler()
    for step in range(3):
        x = make_logits((12, 30), torch.float32, device).requires_grad_()
        t = make_class_target((12,), 30, device, ignore_index=-100)
        w = make_weight(30, torch.float32, device)
        with compiled_autograd._enable(compiler):
            loss = fused_ce.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)
            loss.sum().backward()
        ref = _reference_gradient(x, t, w, None, reduction=reduction, label_smoothing=0.1, ignore_index=-100)
        if reduction == "none":
            ref = _reference_gradient(x, t, w, torch.ones(12, device=device), reduction="none",
                                      label_smoothing=0.1, ignore_index=-100)
        assert_close_ref(x.grad, ref, torch.float32, what=f"step {step}")
    assert compiler.graphs == 1


@requires_compiled_autograd_nodes
def test_options_that_change_the_backward_compile_a_new_graph(device):
    """The options are constants of the graph (collected into its cache key): a step with other
    options must not reuse a graph compiled for the first ones."""
    compiler = _CountingCompiler()
    x = make_logits((10, 25), torch.float32, device)
    t = make_class_target((10,), 25, device)
    for smoothing in (0.0, 0.3):
        xl = x.clone().requires_grad_()
        with compiled_autograd._enable(compiler):
            fused_ce.cross_entropy(xl, t, label_smoothing=smoothing).backward()
        assert_close_ref(xl.grad, _reference_gradient(x, t, None, label_smoothing=smoothing), torch.float32,
                         what=f"label_smoothing={smoothing}")
    assert compiler.graphs == 2


@requires_compiled_autograd_nodes
def test_retain_graph_then_a_second_compiled_backward(device):
    """retain_graph=True keeps what the node saved (on CUDA the gradient it held is recomputed
    from the saved input once a backward took it); both backwards give the same gradient."""
    x = make_logits((9, 21), torch.float32, device).requires_grad_()
    t = make_class_target((9,), 21, device)
    loss = fused_ce.cross_entropy(x, t, z_loss=1e-2)
    grads = []
    for retain in (True, False):
        with compiled_autograd._enable(_CountingCompiler()):
            grads.append(torch.autograd.grad(loss * 2.0, x, retain_graph=retain)[0])
    ref = 2.0 * _reference_gradient(x, t, None, z_loss=1e-2)
    for grad in grads:
        assert_close_ref(grad, ref, torch.float32, what="compiled backward")
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@requires_compiled_autograd_nodes
def test_saved_tensor_hooks_run_inside_the_compiled_graph(device):
    """The per-element node's saved tensors go through saved-tensor hooks (offloading, activation
    checkpointing); under compiled autograd the unpack hooks become part of the graph."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    x = make_logits((8, 17), torch.float32, device).requires_grad_()
    t = make_class_target((8,), 17, device)
    mask = (torch.rand(8, device=device) > 0.5).float()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = fused_ce.cross_entropy(x, t, reduction="none")
    assert grad_fn_name(loss) == PER_ELEMENT_NODE
    with compiled_autograd._enable(_CountingCompiler()):
        (loss * mask).sum().backward()
    assert len(packed) >= 3 and len(unpacked) >= 3  # input, target, lse (no weight)
    assert_close_ref(x.grad, _reference_gradient(x, t, None, mask, reduction="none"), torch.float32,
                     what="gradient through hooks")


@requires_compiled_autograd_nodes
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_aot_eager_traces_the_nodes_backward(device, reduction):
    """With a backend that traces the graph through AOTAutograd (aot_eager), the nodes' backward
    functions run on fake tensors (the operators' fake kernels) and land in the graph as the
    library's operators."""
    compiler = _CountingCompiler("aot_eager")
    x = make_logits((10, 33), torch.float32, device).requires_grad_()
    t = make_class_target((10,), 33, device, ignore_index=-100)
    with compiled_autograd._enable(compiler):
        loss = fused_ce.cross_entropy(x, t, reduction=reduction, softcap=20.0)
        loss.sum().backward()
    assert compiler.graphs == 1
    upstream = torch.ones(10, device=device) if reduction == "none" else None
    ref = _reference_gradient(x, t, None, upstream, reduction=reduction, softcap=20.0, ignore_index=-100)
    assert_close_ref(x.grad, ref, torch.float32, what=f"{reduction} under aot_eager")


@requires_compiled_autograd_nodes
def test_a_model_step_with_compile_and_compiled_autograd(device):
    """torch.compile's own switch: a compiled training step (linear head, loss, backward) with
    torch._dynamo.config.compiled_autograd on gives the eager step's gradients. (Dynamo traces
    the forward through the operators' registrations, so no C++ node is built here; this worked
    before the nodes learnt compiled autograd, and must go on working.)"""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50).to(device)
    data = torch.randn(12, 16, device=device)
    target = make_class_target((12,), 50, device, ignore_index=-100)

    def step():
        loss = fused_ce.cross_entropy(head(data), target, label_smoothing=0.1)
        loss.backward()
        return loss.detach()

    expected = F.cross_entropy(head(data).double(), target, label_smoothing=0.1)
    expected.backward()
    want = head.weight.grad.clone()
    head.weight.grad = None
    with torch._dynamo.config.patch(compiled_autograd=True):
        loss = torch.compile(step, backend="aot_eager")()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want, rtol=1e-4, atol=1e-6)


@requires_compiled_autograd_nodes
def test_the_python_functions_under_compiled_autograd(device):
    """The cases that take the Python autograd Functions, which compiled autograd traces by
    itself: probability targets with a gradient for the target, return_lse, inplace_backward,
    and linear_cross_entropy (whose weight gradient is scaled out of place in a traced
    backward)."""
    C, H = 12, 8
    x0 = make_logits((9, C), torch.float32, device)
    t = make_class_target((9,), C, device)
    p0 = torch.softmax(torch.randn(9, C, device=device), dim=1)

    def leaf(t, dtype):
        return t.to(dtype, copy=True).requires_grad_()

    def both(fn):
        """fn's leaves' gradients under compiled autograd, and with torch's loss in float64."""
        compiler = _CountingCompiler()
        with compiled_autograd._enable(compiler):
            ours = fn(fused_ce, torch.float32)
        assert compiler.graphs >= 1
        return ours, fn(None, torch.float64)

    def soft(lib, dtype):
        x, p = leaf(x0, dtype), leaf(p0, dtype)
        (F if lib is None else lib).cross_entropy(x, p, label_smoothing=0.1).backward()
        return x.grad, p.grad

    def with_lse(lib, dtype):
        x = leaf(x0, dtype)
        if lib is None:
            loss, lse = F.cross_entropy(x, t), torch.logsumexp(x, dim=1)
        else:
            loss, lse = lib.cross_entropy(x, t, return_lse=True)
        (loss + 0.1 * lse.sum()).backward()
        return (x.grad,)

    def in_place(lib, dtype):
        x = leaf(x0, dtype)
        logits = x * 2.0  # the loss may write its gradient over these
        if lib is None:
            F.cross_entropy(logits, t).backward()
        else:
            lib.cross_entropy(logits, t, inplace_backward=True).backward()
        return (x.grad,)

    torch.manual_seed(1)
    h0, w0 = torch.randn(9, H, device=device), torch.randn(C, H, device=device)

    def head(lib, dtype):
        h, w = leaf(h0, dtype), leaf(w0, dtype)
        if lib is None:
            (F.cross_entropy(h @ w.T, t) * 0.5).backward()
        else:
            (lib.linear_cross_entropy(h, w, t) * 0.5).backward()
        return h.grad, w.grad

    for fn in (soft, with_lse, in_place, head):
        ours, ref = both(fn)
        for got, want in zip(ours, ref):
            assert_close_ref(got, want, torch.float32, what=fn.__name__)


ops = torch.ops.fused_ce


@requires_compiled_autograd_nodes
@pytest.mark.parametrize("kind, used", [("class", "both"), ("class", "lse"), ("class", "reduced"),
                                        ("prob", "both")])
def test_the_operators_nodes_under_compiled_autograd(device, kind, used):
    """Graphs that hold the operators themselves (direct calls of torch.ops.fused_ce.*, an
    exported model) differentiate through the operators' own nodes (csrc/operator_autograd.cpp),
    which compiled autograd traces too: d(sum(a * loss + b * lse))/d(input) (and /d(target) for
    probabilities), with only lse used (the loss's upstream gradient is undefined), and through
    reduce_loss, against float64 PyTorch; two steps share one graph."""
    compiler = _CountingCompiler()
    for step in range(2):
        x = make_logits((5, 9, 3), torch.float32, device)
        t = make_class_target((5, 3), 9, device, ignore_index=-100) if kind == "class" else \
            make_prob_target((5, 9, 3), torch.float32, device)
        w = make_weight(9, torch.float32, device) if kind == "class" else None
        a, b = torch.rand(5, 3, device=device), torch.rand(5, 3, device=device)

        def objective(lib, x, t):
            options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-2)
            if lib is None and used == "reduced":
                return ref_llm(x, t, w.double(), reduction="mean", **options)[0]
            if lib is None:
                loss, lse = ref_llm(x, t, None if w is None else w.double(), reduction="none", **options)
            else:
                loss, lse, total = ops.cross_entropy_forward(x, t, w, -100, 0.1, 1e-2, 0.0)
                if used == "reduced":
                    return ops.reduce_loss(loss, total, 1, torch.float32)
            if used == "lse":
                return (b.to(lse.dtype) * lse).sum()
            return (a.to(loss.dtype) * loss + b.to(lse.dtype) * lse).sum()

        xs, ts = x.clone().requires_grad_(), t.clone().requires_grad_(kind == "prob")
        with compiled_autograd._enable(compiler):
            objective(fused_ce, xs, ts).backward()
        xr, tr = x.double().requires_grad_(), (t.double() if kind == "prob" else t).requires_grad_(kind == "prob")
        objective(None, xr, tr).backward()
        assert_close_ref(xs.grad, xr.grad, torch.float32, what=f"step {step}: input gradient")
        if kind == "prob":
            assert_close_ref(ts.grad, tr.grad, torch.float32, what=f"step {step}: target gradient")
    assert compiler.graphs == 1


@requires_compiled_autograd_nodes
def test_an_exported_model_trains_under_compiled_autograd(device):
    """A model exported with torch.export (its loss held as the operators) trained with its
    backward under compiled autograd gives PyTorch's gradients."""
    compiler = _CountingCompiler()

    def backward(loss):
        with compiled_autograd._enable(compiler):
            loss.backward()

    train_exported_loss_model(device, torch.float32, backward)
    assert compiler.graphs == 1
