"""fused_ce.cross_entropy(..., inplace_backward=True): the gradient overwrites the logits.

Behaviour: the ``inplace_backward`` entry of fused_ce.cross_entropy's docstring.  Checked here:

* parity: the gradients reaching the logits' producer (``logits = h @ W``; h.grad, W.grad) equal
  those of the ordinary path and a float64 reference, over the options, targets, dtypes, layouts;
* the memory saving: the gradient handed to the producer *is* the logits' storage, and the node
  saves no new logits-sized tensor;
* the documented side effects: after the forward the logits hold the gradient, version bumped;
* the safety net: other nodes that saved the logits, modifying them after the forward, and a
  second backward through the graph all raise instead of silently giving wrong gradients;
* no effect when the logits need no gradient.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_ref, dtype_id, make_class_target, make_logits, make_prob_target, make_weight

import fused_ce  # an ImportError must fail the module, not skip it

INPLACE_ERR = "modified by an inplace operation"


# --------------------------------------------------------------------------
# A float64 reference (reduced losses only: inplace_backward needs mean or sum).


def ref_loss(x, target, weight=None, *, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
             softcap=None):
    """Spec's loss from torch ops: softcap, then cross-entropy + z_loss * w_i * lse**2, reduced."""
    y = x if softcap is None else softcap * torch.tanh(x / softcap)
    soft = target.dtype.is_floating_point
    kw = dict(weight=weight, reduction="none", label_smoothing=label_smoothing)
    if not soft:
        kw["ignore_index"] = ignore_index
    per = F.cross_entropy(y, target, **kw)
    lse = torch.logsumexp(y, 1)
    if soft:
        w_i = torch.ones_like(per)
        denom = float(per.numel())
    else:
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        w_i = torch.ones_like(per) if weight is None else weight[safe]
        w_i = torch.where(valid, w_i, torch.zeros_like(w_i))
        denom = float(w_i.sum())
    per = per + z_loss * w_i * lse.square()
    if reduction == "sum":
        return per.sum()
    if denom == 0:
        return per.sum() * 0 + float("nan")
    return per.sum() / denom


def ref_logits_grad(logits, target, weight=None, upstream=1.0, **opts):
    """(loss, d(upstream * loss)/d logits) in float64 from the logits' actual values."""
    x64 = logits.detach().to("cpu", torch.float64).requires_grad_()
    t = target.detach().cpu()
    t = t.double() if t.is_floating_point() else t
    w = None if weight is None else weight.detach().to("cpu", torch.float64)
    loss = ref_loss(x64, t, w, **opts)
    (g,) = torch.autograd.grad(loss * upstream, x64)
    return loss.detach(), g


# --------------------------------------------------------------------------
# Producers of logits: logits = f(h, W) with h, W leaves.


def _producer(layout, N, C, dtype, device, K=24, d=3):
    """Leaves (h, W) and a function building the logits from them (and the logits' shape)."""
    h = torch.randn(N, K, d if layout == "3d" else 1, dtype=torch.float64)
    W = torch.randn(C, K, dtype=torch.float64) * 0.7
    if layout == "2d":
        h = h[..., 0]
        fn = lambda h, W: h @ W.t()  # noqa: E731  (N, C) contiguous
    elif layout == "3d":
        fn = lambda h, W: W @ h  # noqa: E731  (C, K) @ (N, K, d) -> (N, C, d) contiguous
    elif layout == "noncontig":
        h = h[..., 0]
        fn = lambda h, W: (W @ h.t()).t()  # noqa: E731  (C, N) buffer seen as (N, C)
    else:
        raise AssertionError(layout)
    return h.to(dtype).to(device), W.to(dtype).to(device), fn


def _run(fn, h, W, target, weight, inplace, upstream=1.0, **opts):
    """Forward + backward of upstream * loss; returns loss, h.grad, W.grad, logits' values before the
    call, the gradient the logits received (via a hook), and the logits tensor itself."""
    hl = h.detach().clone().requires_grad_()
    Wl = W.detach().clone().requires_grad_()
    logits = fn(hl, Wl)
    before = logits.detach().clone()
    received = []
    logits.register_hook(lambda g: received.append(g.detach().clone()))
    loss = fused_ce.cross_entropy(logits, target, weight, inplace_backward=inplace, **opts)
    (upstream * loss).backward() if upstream != 1.0 else loss.backward()
    assert len(received) == 1
    return loss.detach(), hl.grad, Wl.grad, before, received[0], logits


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}

CONFIGS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=-100),
    "ignore_index=3": dict(ignore=3, ignore_index=3),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "everything": dict(weight=True, ignore=-100, label_smoothing=0.2, z_loss=5e-2, softcap=2.0),
    "prob": dict(prob=True),
    "prob_everything": dict(prob=True, weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=4.0),
}


def _make_target(cfg, logits_shape, C, device, dtype):
    if cfg.get("prob"):
        return make_prob_target(logits_shape, dtype, device)
    elem = (logits_shape[0],) + tuple(logits_shape[2:])
    return make_class_target(elem, C, device, ignore_index=cfg.get("ignore"), ignore_frac=0.3)


def _check_parity(device, dtype, layout, config, reduction, upstream=1.0, N=16, C=37):
    cfg = CONFIGS[config]
    h, W, fn = _producer(layout, N, C, dtype, device)
    logits_shape = tuple(fn(h, W).shape)
    t = _make_target(cfg, logits_shape, C, device, dtype)
    w = make_weight(C, dtype, device) if cfg.get("weight") else None
    opts = {k: cfg[k] for k in ("ignore_index", "label_smoothing", "z_loss", "softcap") if k in cfg}
    opts["reduction"] = reduction
    tag = f"{layout} {dtype_id(dtype)} {config} {reduction} upstream={upstream}"

    loss0, gh0, gW0, before0, recv0, _ = _run(fn, h, W, t, w, False, upstream, **opts)
    loss1, gh1, gW1, before1, recv1, logits1 = _run(fn, h, W, t, w, True, upstream, **opts)

    assert torch.equal(before0, before1)
    tol = TOL[dtype]
    torch.testing.assert_close(loss1, loss0, **tol, msg=lambda m: f"{tag}: loss {m}")
    torch.testing.assert_close(recv1, recv0, **tol, msg=lambda m: f"{tag}: gradient at the logits {m}")
    # h.grad and W.grad are sums of products with the logits' gradient: where they cancel, the
    # last-bit differences of the two gradients (the kernels differ: on CUDA the in-place one is
    # register-resident) are relative to the terms, so the absolute tolerance follows their size.
    for name, got, want in (("h.grad", gh1, gh0), ("W.grad", gW1, gW0)):
        atol = tol["atol"] * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol,
                                   msg=lambda m, name=name: f"{tag}: {name} {m}")

    # and both against the float64 reference computed from the logits' actual values
    ref_l, ref_g = ref_logits_grad(before1, t, w, upstream, **opts)
    assert_close_ref(loss1, ref_l, dtype, what=f"{tag}: loss", floor=1.0)
    assert_close_ref(recv1, ref_g, dtype, what=f"{tag}: gradient at the logits",
                     floor=upstream / max(1, N) if reduction == "mean" else 1e-3)
    # the producer's gradients: reference logits gradient through the (float64) producer
    h64 = h.detach().to("cpu", torch.float64).requires_grad_()
    W64 = W.detach().to("cpu", torch.float64).requires_grad_()
    fn(h64, W64).backward(ref_g)
    assert_close_ref(gh1, h64.grad, dtype, what=f"{tag}: h.grad", floor=1e-3)
    assert_close_ref(gW1, W64.grad, dtype, what=f"{tag}: W.grad", floor=1e-3)

    if layout == "noncontig":
        # the logits were copied: the user's (non-contiguous) tensor is left as it was
        assert torch.equal(logits1.detach(), before1), f"{tag}: non-contiguous logits were modified"
    return loss1


# --------------------------------------------------------------------------
# 1. Parity.


@pytest.mark.parametrize("config", list(CONFIGS))
def test_parity_options(device, config):
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in ("mean", "sum"):
            _check_parity(device, dtype, "2d", config, reduction)


@pytest.mark.parametrize("config", ["plain", "everything", "prob_everything"])
@pytest.mark.parametrize("layout", ["3d", "noncontig"])
def test_parity_layouts(device, layout, config):
    for dtype in (torch.float32, torch.bfloat16):
        _check_parity(device, dtype, layout, config, "mean")


@pytest.mark.parametrize("config", ["plain", "everything", "prob_everything"])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_parity_upstream_gradient(device, layout, config):
    # (2.5 * loss).backward(): the gradient written in the forward is scaled in the backward
    for reduction in ("mean", "sum"):
        _check_parity(device, torch.float32, layout, config, reduction, upstream=2.5)


@pytest.mark.parametrize("C", [10, 1000])
def test_parity_tile_and_row_kernels(device, C):
    _check_parity(device, torch.float32, "2d", "everything", "mean", N=12, C=C)
    _check_parity(device, torch.float32, "2d", "prob_everything", "sum", N=12, C=C)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(device, reduction):
    N, C = 6, 11
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    t = torch.full((N,), -100, dtype=torch.long, device=device)
    results = [_run(fn, h, W, t, None, inplace, z_loss=0.1, softcap=3.0, reduction=reduction)
               for inplace in (False, True)]
    for loss, gh, gW, _, recv, _ in results:
        if reduction == "mean":
            assert torch.isnan(loss).item()
        else:
            assert loss.item() == 0
        assert (recv == 0).all() and (gh == 0).all() and (gW == 0).all()


# --------------------------------------------------------------------------
# 2. The memory saving.


def _record_saved(fn):
    """Run fn() under saved_tensors_hooks; returns (fn's result, [(storage ptr, storage nbytes, shape)])."""
    saved = []

    def pack(t):
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gradient_shares_the_logits_storage(device, dtype, layout):
    for upstream in (1.0, 2.5):
        _check_shared_storage(device, dtype, layout, upstream)


def _check_shared_storage(device, dtype, layout, upstream):
    N, C = 16, 600
    h, W, fn = _producer(layout, N, C, dtype, device)
    t = make_class_target((N,) if layout == "2d" else (N, 3), C, device, ignore_index=-100)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = fn(hl, Wl)
    ptr = logits.data_ptr()
    storage = (logits.untyped_storage().data_ptr(), logits.untyped_storage().nbytes())
    received = []
    logits.register_hook(lambda g: received.append((g.data_ptr(), g.detach().clone())))

    loss, saved = _record_saved(
        lambda: fused_ce.cross_entropy(logits, t, z_loss=1e-3, softcap=20.0, label_smoothing=0.1,
                                       inplace_backward=True))
    # the fused node saves nothing logits-sized besides the logits themselves, and O(N) otherwise
    assert saved, "the fused node saved nothing at all?"
    new_bytes = sum(nb for p, nb, _ in saved if p != storage[0])
    assert new_bytes <= 64 * N * (3 if layout == "3d" else 1) + 1024, (
        f"saved tensors other than the logits take {new_bytes} bytes (logits: {storage[1]} bytes): {saved}")
    assert any(p == storage[0] for p, _, _ in saved)

    (upstream * loss).backward()
    assert len(received) == 1
    assert received[0][0] == ptr, "the gradient handed to the logits' producer must be the logits' own storage"
    ref_l, ref_g = ref_logits_grad(_logits_values(fn, h, W), t, upstream=upstream, z_loss=1e-3, softcap=20.0,
                                   label_smoothing=0.1)
    assert_close_ref(received[0][1], ref_g, dtype, what="gradient", floor=upstream / N)
    assert_close_ref(loss.detach(), ref_l, dtype, what="loss", floor=1.0)


@pytest.mark.parametrize("shape", [(16, 600), (4, 600, 3)])
def test_leaf_logits_receive_their_own_storage_as_grad(device, shape):
    # A leaf's .grad must be the logits' memory itself, not a copy: autograd
    # copies a gradient that is the very tensor it accumulates into, so the
    # Function hands out a view of it.
    x = make_logits(shape, torch.float32, device)
    t = make_class_target((shape[0],) + shape[2:], shape[1], device, ignore_index=-100)
    ref_l, ref_g = ref_logits_grad(x, t)
    xl = x.clone().requires_grad_()
    fused_ce.cross_entropy(xl, t, inplace_backward=True).backward()
    assert xl.grad.data_ptr() == xl.data_ptr(), "the leaf's gradient was copied"
    assert_close_ref(xl.grad, ref_g, torch.float32, what="gradient", floor=1.0 / shape[0])


def _logits_values(fn, h, W):
    with torch.no_grad():
        return fn(h, W)


def test_saved_tensor_measurement_detects_a_logits_sized_save():
    # Sanity check of the measurement above: the ordinary CPU path (gradient computed in the forward
    # and saved) does save a new logits-sized tensor, and the hooks see it.
    N, C = 32, 1000
    logits = torch.randn(N, C, requires_grad=True)
    t = make_class_target((N,), C)
    _, saved = _record_saved(lambda: fused_ce.cross_entropy(logits, t, inplace_backward=False))
    storage = logits.untyped_storage().data_ptr()
    assert any(p != storage and nb >= logits.numel() * 4 for p, nb, _ in saved), saved


# --------------------------------------------------------------------------
# 3. Documented side effects: the logits hold the gradient after the forward.


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_logits_overwritten_by_gradient(device, dtype, kind):
    for reduction in ("mean", "sum"):
        _check_overwritten(device, dtype, kind, reduction)


def _check_overwritten(device, dtype, kind, reduction):
    N, C = 20, 50
    h, W, fn = _producer("2d", N, C, dtype, device)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = fn(hl, Wl)
    before = logits.detach().clone()
    version = logits._version
    t = make_class_target((N,), C, device, ignore_index=-100) if kind == "class" \
        else make_prob_target((N, C), dtype, device)
    w = make_weight(C, dtype, device)
    opts = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-2, softcap=6.0)
    loss = fused_ce.cross_entropy(logits, t, w, inplace_backward=True, **opts)
    assert logits._version > version, "the logits' version counter must be bumped"
    ref_l, ref_g = ref_logits_grad(before, t, w, **opts)
    assert_close_ref(loss, ref_l, dtype, what="loss", floor=1.0)
    # the logits now hold d loss / d logits for an upstream gradient of 1
    assert_close_ref(logits.detach(), ref_g, dtype, what="logits after the forward",
                     floor=1.0 / N if reduction == "mean" else 1e-3)
    loss.backward()
    h64, W64 = h.double().cpu().requires_grad_(), W.double().cpu().requires_grad_()
    fn(h64, W64).backward(ref_g)
    assert_close_ref(hl.grad, h64.grad, dtype, what="h.grad", floor=1e-3)


def test_leaf_logits(device):
    # a leaf with requires_grad=True: logits.grad is the gradient
    N, C = 9, 40
    for reduction, upstream in (("mean", 1.0), ("sum", 1.0), ("mean", 0.25)):
        x = (torch.randn(N, C, dtype=torch.float64) * 3).float().to(device)
        before = x.clone()
        x.requires_grad_()
        t = make_class_target((N,), C, device, ignore_index=-100)
        loss = fused_ce.cross_entropy(x, t, reduction=reduction, z_loss=1e-2, softcap=5.0, inplace_backward=True)
        (loss * upstream).backward()
        ref_l, ref_g = ref_logits_grad(before, t, upstream=upstream, reduction=reduction, z_loss=1e-2, softcap=5.0)
        assert_close_ref(loss, ref_l, torch.float32, what="leaf loss", floor=1.0)
        assert x.grad is not None
        assert_close_ref(x.grad, ref_g, torch.float32, what=f"leaf grad {reduction} x{upstream}", floor=1e-3)


# --------------------------------------------------------------------------
# 4. Safety: what would silently corrupt gradients raises instead.


@pytest.mark.parametrize("other", ["pow", "mul_by_param", "abs", "gelu"])
def test_other_node_that_saved_the_logits_raises(device, other):
    # these ops save their *input* (the logits) for backward; the in-place write invalidates it
    N, C = 8, 30
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = fn(hl, Wl)
    v = torch.randn(C, device=device, requires_grad=True)
    aux = {"pow": lambda z: (z ** 2).sum(),
           "mul_by_param": lambda z: (z * v).sum(),
           "abs": lambda z: z.abs().sum(),
           "gelu": lambda z: F.gelu(z).sum()}[other](logits)
    t = make_class_target((N,), C, device)
    loss = fused_ce.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERR):
        (loss + 0.01 * aux).backward()


@pytest.mark.parametrize("other", ["exp", "sigmoid", "tanh", "sum"])
def test_other_node_that_saved_only_its_output_is_fine(device, other):
    # exp / sigmoid / tanh save their output, sum saves nothing: no error, and the total gradient is right
    N, C = 8, 30
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    t = make_class_target((N,), C, device, ignore_index=-100)
    op = {"exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "sum": lambda z: z}[other]

    def total(h_, W_, inplace):
        logits = fn(h_, W_)
        aux = op(logits * 0.1).sum() if other != "sum" else logits.sum()
        # the aux output is computed before the fused call, on the original logits
        return fused_ce.cross_entropy(logits, t, z_loss=1e-2, inplace_backward=inplace) + 0.3 * aux

    grads = []
    for inplace in (False, True):
        hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = total(hl, Wl, inplace)
        out.backward()
        grads.append((out.detach(), hl.grad, Wl.grad))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("producer", ["exp", "tanh", "sigmoid"])
def test_producer_that_saved_its_output_raises(device, producer):
    # the logits are the saved *output* of their producer (exp / tanh / sigmoid backward use it):
    # overwriting them must make that producer's backward raise, not use the gradient as its output
    N, C = 8, 30
    z = torch.randn(N, C, device=device, requires_grad=True)
    logits = {"exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[producer](z)
    t = make_class_target((N,), C, device)
    loss = fused_ce.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERR):
        loss.backward()


def test_modifying_logits_after_forward_raises(device):
    N, C = 8, 30
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = fn(hl, Wl)
    t = make_class_target((N,), C, device)
    loss = fused_ce.cross_entropy(logits, t, inplace_backward=True)
    logits.add_(1)
    with pytest.raises(RuntimeError, match=INPLACE_ERR):
        loss.backward()


def test_modifying_leaf_logits_after_forward_raises(device):
    x = torch.randn(6, 12, device=device, requires_grad=True)
    t = make_class_target((6,), 12, device)
    loss = fused_ce.cross_entropy(x, t, reduction="sum", inplace_backward=True)
    with torch.no_grad():
        x.mul_(2)
    with pytest.raises(RuntimeError, match=INPLACE_ERR):
        loss.backward()


def test_retain_graph_second_backward_raises(device):
    N, C = 8, 30
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
    logits = fn(hl, Wl)
    before = logits.detach().clone()
    t = make_class_target((N,), C, device)
    loss = fused_ce.cross_entropy(logits, t, z_loss=1e-2, inplace_backward=True)
    loss.backward(retain_graph=True)
    first = hl.grad.clone()
    _, ref_g = ref_logits_grad(before, t, z_loss=1e-2)
    h64, W64 = h.double().cpu().requires_grad_(), W.double().cpu().requires_grad_()
    fn(h64, W64).backward(ref_g)
    assert_close_ref(first, h64.grad, torch.float32, what="first backward h.grad")
    with pytest.raises(RuntimeError, match=r"inplace_backward.*(retain_graph|twice|already)"):
        loss.backward()
    # a failed second backward must not have corrupted what the first one accumulated
    torch.testing.assert_close(hl.grad, first, rtol=0, atol=0)


def test_target_requiring_grad_rejected(device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    q = make_prob_target((5, 7), torch.float32, device).requires_grad_()
    before = x.detach().clone()
    with pytest.raises(ValueError, match="target"):
        fused_ce.cross_entropy(x, q, inplace_backward=True)
    assert torch.equal(x.detach(), before)
    # the same target without grad is fine
    loss = fused_ce.cross_entropy(x, q.detach(), inplace_backward=True)
    loss.backward()
    ref_l, ref_g = ref_logits_grad(before, q.detach())
    assert_close_ref(loss.detach(), ref_l, torch.float32, what="soft-target loss", floor=1.0)
    assert_close_ref(x.grad, ref_g, torch.float32, what="soft-target leaf grad")


# --------------------------------------------------------------------------
# 5. No effect when no gradient is needed.


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_effect_without_requires_grad(device, reduction):
    N, C = 10, 25
    x = (torch.randn(N, C) * 2).to(device)
    before, version = x.clone(), x._version
    t = make_class_target((N,), C, device, ignore_index=-100)
    loss = fused_ce.cross_entropy(x, t, reduction=reduction, z_loss=1e-2, softcap=3.0, inplace_backward=True)
    assert torch.equal(x, before), "logits that do not require grad must not be overwritten"
    assert x._version == version
    assert not loss.requires_grad
    ref_l, _ = ref_logits_grad(before, t, reduction=reduction, z_loss=1e-2, softcap=3.0)
    assert_close_ref(loss, ref_l, torch.float32, what="loss", floor=1.0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_effect_under_no_grad(device, mode):
    # Regression: ctx.needs_input_grad is still True inside autograd.Function.forward under no_grad,
    # so the logits of a tensor that requires grad used to be overwritten here.  Nothing can
    # backpropagate under no_grad, so inplace_backward must have no effect and the logits stay intact.
    N, C = 10, 25
    x = (torch.randn(N, C) * 2).to(device).requires_grad_()
    before = x.detach().clone()
    t = make_class_target((N,), C, device, ignore_index=-100)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        loss = fused_ce.cross_entropy(x, t, z_loss=1e-2, softcap=3.0, inplace_backward=True)
    assert not loss.requires_grad
    ref_l, _ = ref_logits_grad(before, t, z_loss=1e-2, softcap=3.0)
    assert_close_ref(loss, ref_l, torch.float32, what="loss", floor=1.0)
    overwritten = not torch.equal(x.detach(), before)
    assert not overwritten, "under no_grad / inference_mode the logits must not be overwritten"


def test_no_effect_when_only_the_producer_does_not_require_grad(device):
    # logits computed from tensors that do not require grad: nothing to overwrite either
    N, C = 7, 19
    h, W, fn = _producer("2d", N, C, torch.float32, device)
    logits = fn(h, W)
    before = logits.clone()
    t = make_class_target((N,), C, device)
    loss = fused_ce.cross_entropy(logits, t, inplace_backward=True)
    assert torch.equal(logits, before)
    ref_l, _ = ref_logits_grad(before, t)
    assert_close_ref(loss, ref_l, torch.float32, what="loss", floor=1.0)


# --------------------------------------------------------------------------
# 6. torch.compile.


@pytest.mark.compile
@pytest.mark.slow
def test_compile_fullgraph_aot_eager(device):
    import torch._dynamo

    torch._dynamo.reset()
    try:
        N, C = 8, 30
        h, W, fn = _producer("2d", N, C, torch.float32, device)
        t = make_class_target((N,), C, device, ignore_index=-100)

        def f(h_, W_):
            return fused_ce.cross_entropy(fn(h_, W_), t, z_loss=1e-2, softcap=5.0, label_smoothing=0.1,
                                          inplace_backward=True)

        results = []
        for g in (torch.compile(f, backend="aot_eager", fullgraph=True), f):
            hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
            loss = g(hl, Wl)
            (2.5 * loss).backward()
            results.append((loss.detach(), hl.grad, Wl.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        ref_l, ref_g = ref_logits_grad(_logits_values(fn, h, W), t, upstream=2.5, z_loss=1e-2, softcap=5.0,
                                       label_smoothing=0.1)
        assert_close_ref(results[0][0], ref_l, torch.float32, what="compiled loss", floor=1.0)
    finally:
        torch._dynamo.reset()
