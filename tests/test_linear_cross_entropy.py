"""fused_ce.linear_cross_entropy: the LM head and the loss in one, never holding the N x V logits.

The oracle is torch's reference path ``F.cross_entropy(F.linear(x, W, b), target, ...)``
evaluated in float64 on copies of the same inputs; loss and the gradients of the input, the
linear weight and the bias are compared. The memory test watches every tensor the call creates
(a TorchDispatchMode) and checks that none has N x V elements, while the reference path does.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import fused_ce.linear as linear_mod
from conftest import assert_close_ref, make_prob_target, make_weight, outcome, ref_llm, unbatched_reference_target
from fused_ce.linear import default_chunk_size, linear_cross_entropy

N, H, V = 40, 16, 33  # N chosen so that chunk 7 does not divide it and chunk 8 does


# --------------------------------------------------------------------------- helpers


def _inputs(n=N, h=H, v=V, dtype=torch.float64, device="cpu", bias=True):
    x = torch.randn(n, h, dtype=torch.float64) if n is not None else torch.randn(h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / math.sqrt(h) * 2
    b = torch.randn(v, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def _class_target(n, v, device="cpu", ignore_index=None, frac=0.3):
    t = torch.randint(0, v, (n,) if n is not None else ())
    if ignore_index is not None and t.numel():
        mask = torch.rand(t.shape) < frac
        mask.view(-1)[0] = True
        if t.numel() > 1:
            mask.view(-1)[-1] = False
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(device)


def _grads(loss, tensors, grad_out):
    leaves = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(loss, leaves, grad_out))
    return [None if t is None else next(got) for t in tensors]


def _reference(x, w, b, target, grad_out=None, weight=None, dtype=torch.float64, **kwargs):
    """torch's reference path on `dtype` CPU copies: (loss, [grad_x, grad_w, grad_b])."""
    leaf = lambda t: None if t is None else t.detach().to("cpu", dtype).requires_grad_()  # noqa: E731
    x64, w64, b64 = leaf(x), leaf(w), leaf(b)
    t64 = target.detach().cpu()
    if t64.is_floating_point():
        t64 = t64.to(dtype)
    wt = None if weight is None else weight.detach().to("cpu", dtype)
    logits = F.linear(x64, w64, b64)
    if "z_loss" in kwargs or "softcap" in kwargs:  # fused_ce's options: the spec's formula in torch ops
        loss, _ = ref_llm(logits, t64, wt, **kwargs)
    else:
        loss = F.cross_entropy(logits, t64, weight=wt, **kwargs)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    return loss.detach(), _grads(loss, [x64, w64, b64], go)


def _fused(x, w, b, target, grad_out=None, **kwargs):
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    xl, wl, bl = leaf(x), leaf(w), leaf(b)
    loss = linear_cross_entropy(xl, wl, target, linear_bias=bl, **kwargs)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.device, loss.dtype)
    return loss.detach(), _grads(loss, [xl, wl, bl], go)


def _random_grad_out(shape):
    return torch.rand(shape, dtype=torch.float64) * 2 + 0.25


def check(x, w, b, target, *, weight=None, reduction="mean", grad_out="random", what="", rtol=None,
          atol_scale=None, ref_dtype=torch.float64, **kwargs):
    """Loss and the three gradients against the reference path (float64 unless ref_dtype)."""
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    ref_loss, ref_grads = _reference(x, w, b, target, None, weight, ref_dtype, reduction=reduction, **ref_kwargs)
    go = _random_grad_out(ref_loss.shape) if grad_out == "random" else grad_out
    ref_loss, ref_grads = _reference(x, w, b, target, go, weight, ref_dtype, reduction=reduction, **ref_kwargs)
    loss, grads = _fused(x, w, b, target, go, weight=weight, reduction=reduction, **kwargs)
    dtype = x.dtype
    tag = what or f"reduction={reduction} {kwargs}"
    assert loss.dtype == dtype and tuple(loss.shape) == tuple(ref_loss.shape), \
        f"{tag}: loss {loss.dtype} {tuple(loss.shape)}, reference {tuple(ref_loss.shape)}"
    assert_close_ref(loss, ref_loss, dtype, f"{tag}: loss", rtol=rtol, atol_scale=atol_scale, floor=1.0)
    for name, got, ref, src in zip(("grad_input", "grad_linear_weight", "grad_linear_bias"), grads, ref_grads,
                                   (x, w, b)):
        if src is None:
            continue
        assert got.dtype == src.dtype and got.shape == src.shape, f"{tag}: {name} {got.dtype} {tuple(got.shape)}"
        assert_close_ref(got, ref, dtype, f"{tag}: {name}", rtol=rtol, atol_scale=atol_scale)
    return loss, grads


class AllocationMonitor(TorchDispatchMode):
    """Records every operator called, the shape of the first tensor it returns, and the
    element count of the largest tensor any operator returns (views included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = []
        self.shapes = []  # of the first tensor each operator returns

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.shapes.append(tuple(leaves[0].shape) if leaves else None)
        for t in leaves:
            self.largest = max(self.largest, t.numel())
        return out


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore", [None, -100, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_targets(device, reduction, ignore, label_smoothing, use_weight, bias):
    x, w, b = _inputs(device=device, bias=bias)
    t = _class_target(N, V, device, ignore_index=ignore)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, chunk_size=7,
              weight=make_weight(V, torch.float64, device) if use_weight else None)
    if ignore is not None:
        kw["ignore_index"] = ignore
    check(x, w, b, t, **kw)


@pytest.mark.parametrize("chunk_size", [1, 2, 8, 13, N - 1, N, N + 5, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunk_sizes(reduction, chunk_size):
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    check(x, w, b, t, reduction=reduction, chunk_size=chunk_size, label_smoothing=0.1,
          weight=make_weight(V, torch.float64))


@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets(device, reduction, label_smoothing, use_weight):
    x, w, b = _inputs(device=device)
    t = make_prob_target((N, V), torch.float64, device)
    check(x, w, b, t, reduction=reduction, label_smoothing=label_smoothing, chunk_size=6,
          weight=make_weight(V, torch.float64, device) if use_weight else None)


@pytest.mark.parametrize("target_kind", ["class0d", "class1", "ignored", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched(reduction, target_kind):
    x, w, b = _inputs(n=None)
    if target_kind == "prob":
        t = make_prob_target((V,), torch.float64)
    elif target_kind == "class1":
        t = torch.randint(0, V, (1,))
    elif target_kind == "ignored":
        t = torch.tensor(-100)
    else:
        t = torch.randint(0, V, ())
    if target_kind == "class1":
        # torch accepts a (1,) target for an unbatched input in the forward, but its backward
        # fails on it ("size mismatch"): the gradients are checked against the () target
        ref = F.cross_entropy(F.linear(x, w, b), unbatched_reference_target(t), reduction=reduction)
        got = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref)
        loss, grads = _fused(x, w, b, t, reduction=reduction)
        _, ref_grads = _reference(x, w, b, t.reshape(()), reduction=reduction)
        for g, r in zip(grads, ref_grads):
            assert_close_ref(g, r, torch.float64)
        return
    check(x, w, b, t, reduction=reduction, label_smoothing=0.1)


# Several chunks (the gradients of the sum, scaled at the end) and one (the kernel's own
# gradient of the mean or the sum).
CHUNKINGS = pytest.mark.parametrize("chunk_size", [7, None], ids=["chunks", "one_chunk"])


@CHUNKINGS
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction, label_smoothing, chunk_size):
    """torch: the mean is NaN, every gradient 0."""
    x, w, b = _inputs()
    t = torch.full((N,), -100)
    loss, grads = check(x, w, b, t, reduction=reduction, label_smoothing=label_smoothing, chunk_size=chunk_size,
                        grad_out=None)
    if reduction == "mean":
        assert torch.isnan(loss)
    for g in grads:
        assert torch.count_nonzero(g) == 0


@CHUNKINGS
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_zero_total_weight(label_smoothing, chunk_size):
    """Counted elements whose class weight is 0: torch's mean is NaN, and so are the gradients
    of the counted rows (0 * 1/0), the others' stay 0."""
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    t[t >= 0] = 2
    weight = make_weight(V, torch.float64)
    weight[2] = 0
    check(x, w, b, t, weight=weight, label_smoothing=label_smoothing, chunk_size=chunk_size, grad_out=None)


@pytest.mark.parametrize("kind", ["class", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction, kind):
    x, w, b = _inputs(n=0)
    t = torch.zeros(0, dtype=torch.long) if kind == "class" else torch.zeros(0, V, dtype=torch.float64)
    check(x, w, b, t, reduction=reduction, grad_out=None)


def _torch_linear_cross_entropy(input, linear_weight, target, linear_bias=None, **kwargs):
    """torch's F.linear_cross_entropy (torch >= 2.13), or before it the composition whose
    semantics it has (the GPU machine runs torch 2.11)."""
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, **kwargs)
    # A (V, d1, ..., H) weight gives (..., V, d1, ...) logits.
    classes_and_extra = linear_weight.shape[:-1]
    flat_bias = None if linear_bias is None else linear_bias.flatten()
    logits = F.linear(input, linear_weight.flatten(0, -2), flat_bias)
    return F.cross_entropy(logits.unflatten(-1, classes_and_extra), target, **kwargs)


def test_matches_torch_linear_cross_entropy():
    """Also against torch's own F.linear_cross_entropy (same defaults, ignore_index included)."""
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    ours = linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    theirs = _torch_linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_uint8_targets_and_noncontiguous_tensors():
    x, w, b = _inputs()
    x = torch.cat([x, x], 1)[:, ::2]  # strided input
    w = w.t().contiguous().t()  # column-major weight (tied embeddings)
    t = torch.randint(0, V, (N,), dtype=torch.uint8)
    check(x, w, b, t, chunk_size=9, label_smoothing=0.1)


@pytest.mark.parametrize("which", ["input", "weight", "bias", "weight+bias"])
def test_partial_requires_grad(which):
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    _, (rgx, rgw, rgb) = _reference(x, w, b, t)
    xl = x.clone().requires_grad_("input" in which)
    wl = w.clone().requires_grad_("weight" in which)
    bl = b.clone().requires_grad_("bias" in which)
    linear_cross_entropy(xl, wl, t, linear_bias=bl, chunk_size=7).backward()
    for leaf, ref in ((xl, rgx), (wl, rgw), (bl, rgb)):
        if leaf.requires_grad:
            assert_close_ref(leaf.grad, ref, torch.float64)
        else:
            assert leaf.grad is None


def test_gradients_accumulate_and_retain_graph():
    """A second backward through the same graph recomputes the gradients (they were handed over)."""
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    _, ref = _reference(x, w, b, t, weight=None, label_smoothing=0.1)
    xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
    loss = linear_cross_entropy(xl, wl, t, linear_bias=bl, label_smoothing=0.1, chunk_size=7)
    loss.backward(retain_graph=True)
    (loss * 3).backward()
    for leaf, r in zip((xl, wl, bl), ref):
        assert_close_ref(leaf.grad, 4 * r, torch.float64)


def test_inputs_not_modified():
    x, w, b = _inputs()
    t = make_prob_target((N, V), torch.float64)
    before = [v.clone() for v in (x, w, b, t)]
    xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
    linear_cross_entropy(xl, wl, t, linear_bias=bl, chunk_size=7).backward()
    for v, v0 in zip((xl, wl, bl, t), before):
        assert torch.equal(v.detach(), v0)


@CHUNKINGS
def test_bfloat16(device, chunk_size):
    """bf16 inputs against the float32 reference on the same (bf16-rounded) values: over
    several chunks (float32 accumulators; on CUDA float32 GEMM outputs) and in one (on CUDA
    bf16 GEMM outputs, as eager's)."""
    x, w, b = _inputs(n=64, h=32, v=100, dtype=torch.bfloat16, device=device)
    t = _class_target(64, 100, device, ignore_index=-100)
    for reduction in ("mean", "sum", "none"):
        check(x, w, b, t, reduction=reduction, label_smoothing=0.1, chunk_size=chunk_size, ref_dtype=torch.float32,
              rtol=3e-2, atol_scale=2e-2, what=f"bf16 {reduction}")


def test_float32_default_chunking(device):
    x, w, b = _inputs(n=300, h=24, v=257, dtype=torch.float32, device=device)
    t = _class_target(300, 257, device, ignore_index=-100)
    check(x, w, b, t, label_smoothing=0.1, rtol=1e-4, atol_scale=1e-5)


def test_autocast_cpu():
    """Under CPU autocast: the GEMMs in bfloat16, the loss in float32, like F.linear + F.cross_entropy."""
    x, w, b = _inputs(n=48, h=32, v=64, dtype=torch.float32)
    t = _class_target(48, 64, ignore_index=-100)
    xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
    xr, wr, br = (v.clone().requires_grad_() for v in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(xl, wl, t, linear_bias=bl, chunk_size=16)
        ref = F.cross_entropy(F.linear(xr, wr, br), t)
    assert ours.dtype == ref.dtype == torch.float32
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    for a, r in ((xl, xr), (wl, wr), (bl, br)):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, r.grad, rtol=3e-2, atol=3e-2 * float(r.grad.abs().max()))


# --------------------------------------------------------------------------- no gradient work


def test_no_grad_does_no_gradient_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("gradient operator called although nothing needs a gradient")

    monkeypatch.setattr(linear_mod, "_chunk_loss_and_grad", forbidden)
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    for reduction in ("mean", "sum", "none"):
        ref, _ = _reference(x, w, b, t, reduction=reduction)
        xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
        with torch.no_grad():
            out = linear_cross_entropy(xl, wl, t, linear_bias=bl, reduction=reduction, chunk_size=7)
        assert out.grad_fn is None
        assert_close_ref(out, ref, torch.float64, floor=1.0)
        # nothing requires grad, grad mode on
        out = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=7)
        assert out.grad_fn is None and not out.requires_grad
        assert_close_ref(out, ref, torch.float64, floor=1.0)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_never_materialised(reduction, dtype):
    """No operator of the forward + backward produces a tensor of N x V elements (or anything
    larger than a chunk of logits, the weight or the input); the reference path does."""
    n, h, v, chunk = 512, 16, 384, 48
    x, w, b = _inputs(n=n, h=h, v=v, dtype=dtype)
    t = _class_target(n, v, ignore_index=-100)
    xl, wl, bl = (u.clone().requires_grad_() for u in (x, w, b))
    with AllocationMonitor() as mon:
        linear_cross_entropy(xl, wl, t, linear_bias=bl, reduction=reduction, chunk_size=chunk).sum().backward()
    assert any("cross_entropy" in op for op in mon.ops), "the monitor did not see the fused operator"
    allowed = max(chunk * v, v * h, n * h)
    assert mon.largest <= allowed < n * v // 8, (mon.largest, allowed, n * v)

    xr, wr, br = (u.clone().requires_grad_() for u in (x, w, b))
    with AllocationMonitor() as ref_mon:  # positive control: the monitor sees the logits
        F.cross_entropy(F.linear(xr, wr, br), t, reduction=reduction).sum().backward()
    assert ref_mon.largest >= n * v


def test_default_chunking_holds_a_sixteenth():
    """With the default chunk size, on logits big enough for it to matter (512 MiB), nothing
    bigger than 1/16 of the logits is created (H is tiny to keep the GEMMs cheap)."""
    n, h, v = 4096, 4, 32768
    x, w, _ = _inputs(n=n, h=h, v=v, dtype=torch.float32, bias=False)
    x.requires_grad_()
    w.requires_grad_()
    t = _class_target(n, v, ignore_index=-100)
    with AllocationMonitor() as mon:
        linear_cross_entropy(x, w, t).backward()
    assert mon.largest * 16 <= n * v, (mon.largest, n * v)


def test_default_chunk_size():
    assert default_chunk_size(8192, 32000, 4) == 512  # 1/16 of the logits, 62.5 MiB
    for n, v, bpl in ((8192, 32000, 4), (16384, 32000, 2), (65536, 128256, 2), (8192, 32000, 6)):
        rows = default_chunk_size(n, v, bpl)  # logits >= 512 MiB: at most 1/16 and 64 MiB
        assert rows * 16 <= n and rows * v * bpl <= 64 << 20, (n, v, bpl, rows)
    assert default_chunk_size(100000, 50000, 4) * 50000 * 4 <= 64 << 20  # the 64 MiB cap
    assert default_chunk_size(2048, 32000, 4) == 256  # small logits: the 32 MiB floor
    assert default_chunk_size(200, 32000, 4) == 200  # under 32 MiB of logits: one chunk
    assert default_chunk_size(0, 10, 4) == 1
    assert default_chunk_size(1024, 10**8, 4) == 1
    # CUDA: at least 4096 rows (the weight's traffic per chunk), at most N
    assert default_chunk_size(8192, 128256, 2, "cuda") == 4096
    assert default_chunk_size(65536, 32000, 4, "cuda") == 4096
    assert default_chunk_size(1000, 32000, 4, "cuda") == 1000


LLM_OPTIONS = [dict(z_loss=1e-2), dict(softcap=2.0), dict(z_loss=1e-2, softcap=2.0, label_smoothing=0.1)]


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("options", LLM_OPTIONS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_and_softcap(device, reduction, options, chunk_size):
    # PaLM's z-loss and Gemma 2's logit softcap on the LM head's logits, as
    # fused_ce.cross_entropy defines them, with class weights and ignored rows.
    x, w, b = _inputs(device=device)
    t = _class_target(N, V, device=device, ignore_index=-100)
    weight = make_weight(V, torch.float64, device)
    check(x, w, b, t, weight=weight, reduction=reduction, chunk_size=chunk_size, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_and_softcap_probability_targets_and_bfloat16(device, reduction):
    x, w, b = _inputs(device=device)
    t = make_prob_target((N, V), torch.float64, device)
    check(x, w, b, t, reduction=reduction, chunk_size=7, z_loss=1e-2, softcap=2.0)
    x, w, b = _inputs(device=device, dtype=torch.bfloat16)
    t = _class_target(N, V, device=device, ignore_index=-100)
    check(x, w, b, t, reduction=reduction, z_loss=1e-2, softcap=2.0)


def test_z_loss_and_softcap_reference_path():
    # A K-dimensional linear weight takes the materialising reference path: same options.
    n, h, v, d = 6, 5, 4, 3
    x, _, _ = _inputs(n=n, h=h, v=v)
    w = torch.randn(v, d, h, dtype=torch.float64)
    t = torch.randint(0, v, (n, d))
    ours = linear_cross_entropy(x, w, t, z_loss=1e-2, softcap=2.0)
    logits = F.linear(x, w.reshape(v * d, h)).reshape(n, v, d)
    ref, _ = ref_llm(logits, t, z_loss=1e-2, softcap=2.0)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("options", [dict(z_loss=-1.0), dict(z_loss=math.inf), dict(softcap=0.0),
                                     dict(softcap=-1.0)], ids=lambda o: str(o))
def test_bad_z_loss_and_softcap(options):
    x, w, b = _inputs()
    with pytest.raises(ValueError, match="z_loss|softcap"):
        linear_cross_entropy(x, w, _class_target(N, V), **options)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["class", "prob", "z_loss+softcap"])
def test_gradcheck(reduction, kind):
    n, h, v = 5, 3, 4
    x, w, b = (u.requires_grad_() for u in _inputs(n=n, h=h, v=v))
    if kind == "prob":
        t = make_prob_target((n, v), torch.float64)
        kw = dict(label_smoothing=0.2)
    else:
        t = torch.tensor([0, 3, -100, 1, 2])
        kw = dict(weight=make_weight(v, torch.float64), label_smoothing=0.2)
        if kind == "z_loss+softcap":
            kw.update(z_loss=1e-2, softcap=2.0)

    def fn(x_, w_, b_):
        return linear_cross_entropy(x_, w_, t, linear_bias=b_, reduction=reduction, chunk_size=2, **kw)

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- fallbacks and errors


def test_k_dimensional_weight_falls_back():
    n, h, v, d = 6, 5, 4, 3
    x, _, _ = _inputs(n=n, h=h, v=v)
    w = torch.randn(v, d, h, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n, d))
    x.requires_grad_()
    ours = linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    theirs = _torch_linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    for a, r in zip(torch.autograd.grad(ours, (x, w, b)), torch.autograd.grad(theirs, (x, w, b))):
        torch.testing.assert_close(a, r)


def test_probability_target_requiring_grad_falls_back():
    x, w, b = _inputs()
    t = make_prob_target((N, V), torch.float64).requires_grad_()
    t_ref = t.detach().clone().requires_grad_()
    ours = linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    theirs = F.cross_entropy(F.linear(x, w, b), t_ref, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(t.grad, t_ref.grad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func and forward_ad script helpers
def test_torch_func_and_forward_mode_fall_back(device):
    # The chunks' Function has no setup_context and no jvp: these calls take the
    # reference path. Forward-mode AD used to drop the tangent silently.
    import torch.autograd.forward_ad as fwAD

    x, w, b = _inputs(device=device)
    t = _class_target(N, V, device, ignore_index=-100)
    kwargs = dict(linear_bias=b, label_smoothing=0.1)

    def transforms(loss_fn):
        loss_of_weight = lambda weight: loss_fn(x, weight, t, **kwargs)  # noqa: E731
        per_row = lambda row, row_target: loss_fn(row, w, row_target, **kwargs)  # noqa: E731
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(loss_fn(x, fwAD.make_dual(w, w_direction), t, **kwargs)).tangent
        return (torch.func.grad(loss_of_weight)(w),
                torch.func.vmap(torch.func.grad(per_row))(x, t.clamp(min=0)),
                torch.func.jvp(loss_of_weight, (w,), (w_direction,))[1],
                tangent)

    w_direction = torch.randn_like(w)
    for got, want in zip(transforms(linear_cross_entropy), transforms(_torch_linear_cross_entropy)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return type(exc), str(exc).splitlines()[0]
    return None


def _error_cases():
    x, w, b = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    t = torch.randint(0, V, (N,))
    return {
        "input 3-d": ((torch.randn(2, N, H), w, t), {}),
        "input 0-d": ((torch.tensor(1.0), w, t), {}),
        "weight 1-d": ((x, torch.randn(H), t), {}),
        "in_features": ((x, torch.randn(V, H + 1), t), {}),
        "bias shape": ((x, w, t), dict(linear_bias=torch.randn(V + 1))),
        "batch size": ((x, w, t[:3]), {}),
        "0-d target": ((x, w, t[0]), {}),
        "multi-target": ((x, w, torch.zeros(N, 2, dtype=torch.long)), {}),
        "int32 target": ((x, w, t.int()), {}),
        "float target, wrong shape": ((x, w, torch.rand(N, V + 1)), {}),
        "unbatched target size": ((x[0], w, t[:2]), {}),
        "weight shape": ((x, w, t), dict(weight=torch.rand(V + 1))),
        "weight dtype": ((x, w, t), dict(weight=torch.rand(V, dtype=torch.float64))),
        "reduction": ((x, w, t), dict(reduction="average")),
        "label_smoothing": ((x, w, t), dict(label_smoothing=1.5)),
        "dtype mismatch": ((x.double(), w, t), {}),
        "K-dim unbatched": ((x[0], torch.randn(V, 2, H), t), {}),
        "target out of range": ((x, w, torch.full((N,), V)), {}),
        "ignore_index with probabilities": ((x, w, torch.rand(N, V)), dict(ignore_index=3)),
        "ignore_index -100 with probabilities": ((x, w, torch.rand(N, V)), dict(ignore_index=-100)),
        "float ignore_index": ((x, w, t), dict(ignore_index=2.0)),
        "bool ignore_index": ((x, w, t), dict(ignore_index=True)),
        "str label_smoothing": ((x, w, t), dict(label_smoothing="0.1")),
        "list weight": ((x, w, t), dict(weight=[1.0] * V)),
        "unbatched 2-d target": ((x[0], w, torch.zeros(2, 3, dtype=torch.long)), {}),
        "unbatched float target": ((x[0], w, torch.rand(3)), {}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_errors_like_torch(case):
    args, kwargs = _error_cases()[case]
    ours = _error_of(linear_cross_entropy, *args, **kwargs)
    if not hasattr(F, "linear_cross_entropy"):
        # Before torch 2.13 there is no message to match (the GPU machine runs torch 2.11):
        # the case must still be refused, with a message.
        assert ours is not None and ours[1], f"{case}: accepted"
        return
    expected = _error_of(F.linear_cross_entropy, *args, **kwargs)
    assert expected is not None, "torch accepts this case; the test is wrong"
    assert ours == expected


def test_errors_and_results_match_torch_over_a_sweep():
    """8 inputs x 5 linear weights x 4 biases x 8 targets x 3 class weights x 4 option sets (15360
    calls, most with one or several faults): the exception type PyTorch raises (for several faults,
    that of the one it reports first: the logits' dtype mismatch, then the target, then the class
    weight), or the same loss. Against F.linear_cross_entropy (torch 2.13 on), or before it against
    F.linear + F.cross_entropy where both take the arguments (1-D and 2-D inputs and weights)."""
    g = torch.Generator().manual_seed(7)
    h, c = 8, 5
    inputs = {"(N, H)": torch.randn(3, h, generator=g), "(H)": torch.randn(h, generator=g),
              "(N, H) float64": torch.randn(3, h, generator=g, dtype=torch.float64),
              "(N, H + 1)": torch.randn(3, h + 1, generator=g), "(0, H)": torch.randn(0, h),
              "(N, H) int64": torch.ones(3, h, dtype=torch.long), "(B, N, H)": torch.randn(2, 3, h, generator=g),
              "0-d": torch.tensor(1.0)}
    linear_weights = {"(C, H)": torch.randn(c, h, generator=g), "(C, H + 1)": torch.randn(c, h + 1, generator=g),
                      "(C)": torch.randn(c, generator=g), "(C, H) float64": torch.randn(c, h, generator=g, dtype=torch.float64),
                      "(C, 2, H)": torch.randn(c, 2, h, generator=g)}
    biases = {"none": None, "(C)": torch.randn(c, generator=g), "(C + 1)": torch.randn(c + 1, generator=g),
              "(C, 2)": torch.randn(c, 2, generator=g)}
    targets = {"(3)": torch.tensor([0, 1, 4]), "(3) >= C": torch.tensor([0, 9, 1]), "(2)": torch.tensor([0, 1]),
               "0-d": torch.tensor(1), "(3, C) probabilities": torch.rand(3, c, generator=g).softmax(1),
               "(3) int32": torch.tensor([0, 1, 2], dtype=torch.int32), "(3, 2)": torch.randint(0, c, (3, 2), generator=g),
               "(C) probabilities": torch.rand(c, generator=g).softmax(0)}
    class_weights = {"none": None, "(C)": torch.rand(c, generator=g) + 0.5, "(C - 1)": torch.rand(c - 1, generator=g)}
    options = [{}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"ignore_index": 1}]
    native = getattr(F, "linear_cross_entropy", None)
    mismatches = []
    for (xn, x), (wn, w), (bn, b), (tn, t), (cn, cw), opts in itertools.product(
            inputs.items(), linear_weights.items(), biases.items(), targets.items(), class_weights.items(), options):
        if native is not None:
            theirs = outcome(native, x, w, t, linear_bias=b, weight=cw, **opts)
        elif x.dim() <= 2 and w.dim() == 2:
            theirs = outcome(lambda: F.cross_entropy(F.linear(x, w, b), t, weight=cw, **opts))
        else:
            continue
        ours = outcome(linear_cross_entropy, x, w, t, linear_bias=b, weight=cw, **opts)
        case = f"input {xn}, linear weight {wn}, bias {bn}, target {tn}, weight {cn}, {opts}"
        if isinstance(theirs, Exception) or isinstance(ours, Exception):
            if type(ours) is not type(theirs):
                mismatches.append(f"{case}: torch {theirs!r}, fused_ce {ours!r}")
        elif ours.shape != theirs.shape or not torch.allclose(ours.double(), theirs.double(), rtol=1e-2, atol=1e-3,
                                                               equal_nan=True):
            mismatches.append(f"{case}: torch {theirs}, fused_ce {ours}")
    assert not mismatches, f"{len(mismatches)} differ, e.g.\n" + "\n".join(mismatches[:10])


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_bad_chunk_size(chunk_size):
    x, w, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, _class_target(N, V), chunk_size=chunk_size)


@pytest.mark.parametrize("supported", ["in place", "new tensor", "neither"])
def test_weight_gradient_accumulates_in_float32_in_place_where_torch_can(monkeypatch, supported):
    # The CUDA forms of "float32 grad_W += 16-bit grad^T @ x" differ between torch versions
    # (aten::addmm.dtype_out takes a float32 accumulator in newer ones): each chunk takes the
    # first form torch accepts, in place when it can, and a refused form is not asked again.
    # Stand-ins for the two dtype variants, which have no CPU kernels:
    calls = []

    class FakeAddmm:
        @staticmethod
        def dtype_out(acc, a, b, out_dtype, out):
            calls.append("in place")
            if supported != "in place":
                raise RuntimeError("self and mat2 must have the same dtype")
            return out.add_(a.to(out_dtype) @ b.to(out_dtype))

        @staticmethod
        def dtype(acc, a, b, out_dtype):
            calls.append("new tensor")
            if supported == "neither":  # as an older torch without the overload
                raise AttributeError("'_OpNamespace' 'aten.addmm' object has no attribute 'dtype'")
            if supported != "new tensor":
                raise NotImplementedError("no kernel")
            return acc + a.to(out_dtype) @ b.to(out_dtype)

    monkeypatch.setattr(linear_mod, "_REFUSED_ACCUMULATIONS", set())
    monkeypatch.setattr(linear_mod, "_aten_addmm", FakeAddmm)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 4, generator=g).bfloat16(), torch.randn(4, 3, generator=g).bfloat16()
    exact = a.double() @ b.double()
    acc = torch.zeros(6, 3)
    for _ in range(3):
        result = linear_mod._add_matmul(acc, a, b)
        assert (result.data_ptr() == acc.data_ptr()) == (supported != "new tensor")
        acc = result
    tolerance = 1e-5 if supported != "neither" else 3e-2  # the last form rounds each product to bfloat16
    torch.testing.assert_close(acc.double(), 3 * exact, rtol=tolerance, atol=tolerance)
    first = {"in place": ["in place"], "new tensor": ["in place", "new tensor"],
             "neither": ["in place", "new tensor"]}[supported]
    assert calls[:len(first)] == first
    # Later chunks go straight to the accepted form.
    assert calls[len(first):] == ([] if supported == "neither" else first[-1:] * 2)


@pytest.mark.parametrize("into", [False, True], ids=["new", "into"])
@pytest.mark.parametrize("supported", [True, False], ids=["mm.dtype", "no mm.dtype"])
def test_float32_products_of_16_bit_chunks(monkeypatch, supported, into):
    """The first chunk's weight gradient is a new float32 GEMM output (aten::mm.dtype), not a
    zero-filled accumulator read and added to, and the input gradient's rows are written by a
    float32 GEMM output (aten::mm.dtype_out); without those overloads, the 16-bit product
    widened (and the refusal remembered)."""
    calls = []

    def fake(a, b, out_dtype, out=None):
        calls.append(out is not None)
        if not supported:
            raise RuntimeError("expected mat1 and mat2 to have the same dtype")
        product = a.to(out_dtype) @ b.to(out_dtype)
        return product if out is None else out.copy_(product)

    class FakeMm:  # the dtype variants have no CPU kernel for 16-bit operands
        dtype = staticmethod(fake)
        dtype_out = staticmethod(fake)

    monkeypatch.setattr(linear_mod, "_REFUSED_ACCUMULATIONS", set())
    monkeypatch.setattr(linear_mod, "_aten_mm", FakeMm)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 40, generator=g).bfloat16(), torch.randn(40, 3, generator=g).bfloat16()
    exact = a.double() @ b.double()
    for _ in range(2):
        out = torch.full((6, 3), math.nan) if into else None
        product = linear_mod._wide_matmul(a, b, torch.float32, out=out)
        assert product.dtype == torch.float32
        assert (product.data_ptr() == out.data_ptr()) if into else product is not out
        tolerance = 1e-5 if supported else 3e-2  # the fallback rounds the product to bfloat16
        torch.testing.assert_close(product.double(), exact, rtol=tolerance, atol=tolerance)
    assert calls == [into] * (2 if supported else 1)  # a refusal is not asked again
    same = torch.randn(6, 40, dtype=torch.float64, generator=g)
    assert torch.equal(linear_mod._wide_matmul(same, same.t(), torch.float64), same @ same.t())


def test_scaling_and_rounding_in_one_pass_match_two():
    """The mean's scaling folded into the cast to the parameter's dtype gives the bits of a
    scaling followed by a cast (float32 accumulator, bfloat16 weight), and scales in place
    when the dtypes agree."""
    g = torch.Generator().manual_seed(11)
    grad = torch.randn(33, 17, generator=g) * 100
    scale = torch.rand((), generator=g) + 1e-3
    like = torch.empty(0, dtype=torch.bfloat16)
    assert torch.equal(linear_mod._scaled_cast(grad, scale, like), (grad * scale).to(torch.bfloat16))
    rows = (torch.rand(33, generator=g) > 0.3).float().mul(scale).unsqueeze(1)
    assert torch.equal(linear_mod._scaled_cast(grad, rows, like), (grad * rows).to(torch.bfloat16))
    assert torch.equal(linear_mod._scaled_cast(grad, None, like), grad.to(torch.bfloat16))
    expected = grad * scale
    same = linear_mod._scaled_cast(grad, scale, torch.empty(0))
    assert same.data_ptr() == grad.data_ptr() and torch.equal(same, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batched_upstream_gradients(reduction):
    """torch.autograd.grad(..., is_grads_batched=True): one upstream gradient per batch
    element, each giving its multiple of the gradient (the product is formed out of place)."""
    x, w, b = _inputs()
    t = _class_target(N, V, ignore_index=-100)
    _, ref = _reference(x, w, b, t, reduction=reduction, label_smoothing=0.1)
    xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
    loss = linear_cross_entropy(xl, wl, t, linear_bias=bl, reduction=reduction, label_smoothing=0.1,
                                chunk_size=7)
    upstream = torch.tensor([1.0, -2.5, 0.0], dtype=torch.float64)
    grads = torch.autograd.grad(loss, (xl, wl, bl), grad_outputs=upstream, is_grads_batched=True)
    for got, r in zip(grads, ref):
        for k, u in enumerate(upstream):
            assert_close_ref(got[k], u * r, torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_chunk_has_no_pass_over_the_weight_gradient(reduction):
    """All rows in one chunk: the kernel gives the gradient of the mean (or sum) itself, so
    after the GEMM that produces the V x H weight gradient nothing touches it (no scaling, no
    accumulation, no rounding); over several chunks the later GEMMs accumulate into it and the
    mean is scaled once at the end. Values: the parity tests (CHUNKINGS and others)."""
    n, h, v = 64, 8, 96
    x, w, _ = _inputs(n=n, h=h, v=v, dtype=torch.float32)
    t = _class_target(n, v, ignore_index=-100)

    def weight_gradient_ops(chunk_size):
        wl = w.clone().requires_grad_()
        with AllocationMonitor() as mon:
            linear_cross_entropy(x, wl, t, reduction=reduction, chunk_size=chunk_size).backward()
        # (Autograd's detaches of the weight and its gradient return the shape too.)
        return [op for op, shape in zip(mon.ops, mon.shapes) if shape == (v, h) and "detach" not in op]

    assert weight_gradient_ops(None) == ["aten.mm.default"]
    several = weight_gradient_ops(16)
    assert several[0] == "aten.mm.default" and several.count("aten.addmm_.default") == 3
    assert ("aten.mul_.Tensor" in several) == (reduction == "mean")


@CHUNKINGS
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bfloat16_gemms_as_on_cuda(monkeypatch, reduction, chunk_size):
    """The path a GPU takes, run on the CPU: bfloat16 GEMMs (not staged in float32), with
    float32 outputs where several chunks accumulate (the dtype overloads of aten::mm and
    aten::addmm, which have no CPU kernels, stood in for by float32 products) and bfloat16
    outputs in one chunk; against the float32 reference."""
    def wide(a, b, out_dtype):
        return a.to(out_dtype) @ b.to(out_dtype)

    class FakeMm:
        dtype = staticmethod(wide)
        dtype_out = staticmethod(lambda a, b, out_dtype, out: out.copy_(wide(a, b, out_dtype)))

    class FakeAddmm:
        dtype_out = staticmethod(lambda acc, a, b, out_dtype, out: out.add_(wide(a, b, out_dtype)))
        dtype = staticmethod(lambda acc, a, b, out_dtype: acc + wide(a, b, out_dtype))

    monkeypatch.setattr(linear_mod, "_staged", lambda dtype, device: False)
    monkeypatch.setattr(linear_mod, "_REFUSED_ACCUMULATIONS", set())
    monkeypatch.setattr(linear_mod, "_aten_mm", FakeMm)
    monkeypatch.setattr(linear_mod, "_aten_addmm", FakeAddmm)
    x, w, b = _inputs(n=64, h=32, v=100, dtype=torch.bfloat16)
    t = _class_target(64, 100, ignore_index=-100)
    check(x, w, b, t, reduction=reduction, label_smoothing=0.1, chunk_size=chunk_size, ref_dtype=torch.float32,
          rtol=3e-2, atol_scale=2e-2, what=f"bf16 GEMMs {reduction}")
    assert not linear_mod._REFUSED_ACCUMULATIONS


@pytest.mark.compile
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["class", "prob"])
def test_torch_compile_keeps_the_chunks(device, reduction, kind):
    """Under torch.compile(fullgraph=True) the chunks are custom operators in the traced graph,
    not the logits' GEMM: for the mean and the sum fused_ce::linear_cross_entropy_chunks (its
    backward scales the gradients it returned; here by 3), for the per-row losses
    fused_ce::linear_cross_entropy_chunk_losses (its backward recomputes the chunks); with the
    eager values and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, b = _inputs(device=device)
    t = (make_prob_target((N, V), torch.float64, device) if kind == "prob"
         else _class_target(N, V, device, ignore_index=-100))

    def loss_of(x, w, b):
        loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                    z_loss=1e-3, chunk_size=7)
        return 3 * loss.sum()

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    compiled = torch.compile(loss_of, backend=backend, fullgraph=True)(*leaves)
    compiled.backward()
    ref_leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    expected = loss_of(*ref_leaves)
    expected.backward()
    assert_close_ref(compiled, expected, torch.float64)
    for got, ref in zip(leaves, ref_leaves):
        assert_close_ref(got.grad, ref.grad, torch.float64)
    code = backend.graphs[0].code
    operator = "linear_cross_entropy_chunk_losses" if reduction == "none" else "linear_cross_entropy_chunks"
    assert operator in code and "torch.mm" not in code and "linear(" not in code, code


def test_opcheck_the_compiled_operators():
    """The operators torch.compile traces: their schemas, fake kernels and autograd
    registrations (torch.library.opcheck), class and probability targets, with and without a
    bias."""
    x, w, b = _inputs()
    options = (-100, 0.1, 1e-3, 0.0)
    for target, bias in ((_class_target(N, V, ignore_index=-100), b), (make_prob_target((N, V), torch.float64), None)):
        for reduction in (1, 2):
            args = (x.clone().requires_grad_(), w.clone().requires_grad_(),
                    None if bias is None else bias.clone().requires_grad_(), target, None, *options, reduction, 7,
                    True, True, bias is not None, torch.float64)
            torch.library.opcheck(torch.ops.fused_ce.linear_cross_entropy_chunks.default, args)
        leaves = (x.clone().requires_grad_(), w.clone().requires_grad_(),
                  None if bias is None else bias.clone().requires_grad_())
        torch.library.opcheck(torch.ops.fused_ce.linear_cross_entropy_chunk_losses.default,
                              (*leaves, target, None, *options, 7, torch.float64))
        row_grad = torch.rand(N, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fused_ce.linear_cross_entropy_chunk_gradients.default,
                              (x, w, bias, target, None, *options, 7, row_grad, True, True, bias is not None))
