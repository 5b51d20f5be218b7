"""Property-based parity with F.cross_entropy over random configurations.

Hypothesis draws shapes (unbatched, 2-D, K-dim, empty), class counts on both sides of the row-kernel
threshold, float32/float64, reductions, weights, label smoothing, class-index or probability targets
(with target gradients), ignore_index sprinkled into the targets, and non-contiguous layouts
(permuted buffers, stepped slices, expanded targets).  Every example is checked against torch in
float64 (conftest.check_against_torch).  The chunked ``linear_cross_entropy`` gets its own random
configurations (chunk sizes, bias, z_loss, softcap).  database=None: nothing is written outside tests/.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_ce
from conftest import DEVICES, check_against_torch, identical

SETTINGS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def configs(draw):
    ndim_extra = draw(st.sampled_from([-1, 0, 0, 1, 2]))  # -1: unbatched (C,)
    C = draw(st.one_of(st.integers(1, 12), st.integers(13, 80), st.sampled_from([63, 64, 65, 127, 129, 257, 1000])))
    big = C > 100
    N = draw(st.integers(0 if not big else 1, 3 if big else 9))
    spatial = tuple(draw(st.lists(st.integers(1 if big else 0, 3 if big else 4), min_size=max(ndim_extra, 0),
                                  max_size=max(ndim_extra, 0))))
    soft = draw(st.booleans())
    cfg = dict(
        unbatched=ndim_extra == -1,
        N=N,
        C=C,
        spatial=spatial,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        use_weight=draw(st.booleans()),
        label_smoothing=draw(st.one_of(st.just(0.0), st.sampled_from([0.05, 0.5, 1.0]),
                                       st.floats(0.0, 1.0, allow_nan=False))),
        soft=soft,
        target_grad=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([-100, -100, 0, 1, -1, 7])),
        ignore_frac=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
        permute=draw(st.booleans()),
        step=draw(st.sampled_from([1, 1, 2])),
        expand_target=draw(st.booleans()),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0, 15.0])),
        normalized=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return cfg


def _build(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    C, N, spatial, dtype = cfg["C"], cfg["N"], cfg["spatial"], cfg["dtype"]
    shape = (C,) if cfg["unbatched"] else (N, C) + spatial
    tshape = () if cfg["unbatched"] else (N,) + spatial
    step = cfg["step"]
    # logits leaf: a buffer of a (maybe permuted, maybe larger) shape, viewed into `shape`
    if cfg["permute"] and len(shape) >= 2:
        perm = list(range(len(shape)))[::-1]  # reversed buffer, then permuted back
        buf_shape = [shape[p] for p in perm]
        buf_shape[0] *= step
        x = (torch.randn(buf_shape, generator=g, dtype=torch.float64) * cfg["scale"]).to(dtype).to(device)
        inv = [perm.index(i) for i in range(len(shape))]

        def view(a, inv=inv, step=step):
            return a[::step].permute(*inv)
    else:
        buf_shape = list(shape)
        buf_shape[-1] *= step
        x = (torch.randn(buf_shape, generator=g, dtype=torch.float64) * cfg["scale"]).to(dtype).to(device)

        def view(a, step=step):
            return a[..., ::step]

    assert tuple(view(x).shape) == tuple(shape)
    target_view = None
    if cfg["soft"]:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        cdim = 0 if cfg["unbatched"] else 1
        t = t.softmax(cdim) if cfg["normalized"] else torch.rand(shape, generator=g, dtype=torch.float64)
        t = t.to(dtype).to(device)
        ignore_kw = {}
    else:
        t = torch.randint(0, C, tshape, generator=g)
        ii = cfg["ignore_index"]
        if cfg["ignore_frac"] > 0 and t.numel():
            mask = torch.rand(tshape, generator=g) < cfg["ignore_frac"]
            t = torch.where(mask, torch.full_like(t, ii), t)
        t = t.to(device)
        ignore_kw = {"ignore_index": ii}
        if cfg["expand_target"] and not cfg["unbatched"] and N > 0:
            t = t[:1].clone()

            def target_view(b, N=N, tshape=tshape):
                return b.expand(*tshape)

    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.1).to(dtype).to(device) if cfg["use_weight"] else None
    return x, t, w, view, target_view, ignore_kw


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(cfg=configs())
def test_random_configs_match_torch(device, cfg):
    x, t, w, view, target_view, ignore_kw = _build(cfg, device)
    target_grad = cfg["soft"] and cfg["target_grad"]
    check_against_torch(fused_ce, x, t, w, reduction=cfg["reduction"], label_smoothing=cfg["label_smoothing"],
                        target_grad=target_grad, view=view, target_view=target_view, what=str(cfg), **ignore_kw)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=configs(), half=st.sampled_from([torch.bfloat16, torch.float16]))
def test_random_configs_half_precision(device, cfg, half):
    # the same random configurations in bfloat16 / float16 (against the float64 reference)
    cfg = dict(cfg, dtype=half, scale=min(cfg["scale"], 4.0))
    x, t, w, view, target_view, ignore_kw = _build(cfg, device)
    target_grad = cfg["soft"] and cfg["target_grad"]
    check_against_torch(fused_ce, x, t, w, reduction=cfg["reduction"], label_smoothing=cfg["label_smoothing"],
                        target_grad=target_grad, view=view, target_view=target_view, what=str(cfg), **ignore_kw)


def _transforms(loss_fn, x, t, w, kwargs, per_sample):
    """jvp (tangents on the logits, and on probability targets), a Hessian when it
    is small, and per-sample gradients (vmap over grad) when the rows are plain
    (N, C) ones; everything that fused_ce computes off its plain path."""
    gen = torch.Generator().manual_seed(0)
    x_tangent = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    results = []
    if t.is_floating_point():
        t_tangent = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
        results += torch.func.jvp(lambda a, b: loss_fn(a, b, w, **kwargs), (x, t), (x_tangent, t_tangent))
    else:
        results += torch.func.jvp(lambda a: loss_fn(a, t, w, **kwargs), (x,), (x_tangent,))
    if 0 < x.numel() <= 60:  # (PyTorch's own Hessian of an empty batch raises)
        results.append(torch.func.hessian(lambda a: loss_fn(a, t, w, **kwargs).sum())(x))
    if per_sample:
        results.append(torch.func.vmap(torch.func.grad(lambda a, b: loss_fn(a, b, w, **kwargs).sum()))(x, t))
    return results


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=configs())
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func scripts a helper
def test_random_configs_under_transforms(device, cfg):
    # forward mode, Hessians and vmap (composite_cross_entropy and the batching rules)
    cfg = dict(cfg, dtype=torch.float64)
    x, t, w, view, target_view, ignore_kw = _build(cfg, device)
    x = view(x)
    t = target_view(t) if target_view else t
    kwargs = dict(reduction=cfg["reduction"], label_smoothing=cfg["label_smoothing"], **ignore_kw)
    per_sample = x.dim() == 2 and x.shape[0] > 0
    got = _transforms(fused_ce.cross_entropy, x, t, w, kwargs, per_sample)
    want = _transforms(torch.nn.functional.cross_entropy, x, t, w, kwargs, per_sample)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r.cpu(), rtol=1e-7, atol=1e-9, equal_nan=True, msg=lambda m: f"{cfg}: {m}")


@st.composite
def linear_configs(draw):
    return dict(
        N=draw(st.one_of(st.just(None), st.integers(0, 23))),  # None: an unbatched (H,) input
        H=draw(st.integers(1, 9)),
        V=draw(st.one_of(st.integers(1, 12), st.sampled_from([63, 64, 65, 130]))),
        bias=draw(st.booleans()),
        chunk_size=draw(st.sampled_from([None, 1, 3, 8])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        soft=draw(st.booleans()),
        use_weight=draw(st.booleans()),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, None, 2.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@SETTINGS
@given(cfg=linear_configs())
def test_random_linear_cross_entropy_configs(cfg):
    # The chunked LM head against F.linear + the loss in float64: chunk boundaries
    # anywhere, ignored rows, weights, probability targets and the LLM options.
    from test_linear_cross_entropy import check

    torch.manual_seed(cfg["seed"])
    n, h, v = cfg["N"], cfg["H"], cfg["V"]
    x = torch.randn((h,) if n is None else (n, h), dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64)
    b = torch.randn(v, dtype=torch.float64) if cfg["bias"] else None
    rows = () if n is None else (n,)
    if cfg["soft"]:
        t = torch.rand(rows + (v,), dtype=torch.float64).softmax(-1)
        weight = None  # (class weights with probability targets: the reference path, tested elsewhere)
    else:
        t = torch.randint(0, v, rows)
        t = torch.where(torch.rand(rows) < cfg["ignore_frac"], torch.full_like(t, -100), t)
        weight = torch.rand(v, dtype=torch.float64) + 0.1 if cfg["use_weight"] else None
    options = {k: cfg[k] for k in ("z_loss", "softcap") if cfg[k]}
    check(x, w, b, t, weight=weight, reduction=cfg["reduction"], label_smoothing=cfg["label_smoothing"],
          chunk_size=cfg["chunk_size"], what=str(cfg), **options)


@st.composite
def plain_calls(draw):
    """A call that cross_entropy hands straight to the C++ node (functional._plain_call): (N, C)
    logits of any floating dtype, possibly strided, an int64 target, any weight, options and
    reduction it allows, with and without gradients."""
    C = draw(st.one_of(st.integers(1, 80), st.sampled_from([127, 1000, 4099])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    requires_grad = draw(st.booleans())
    grad_enabled = draw(st.booleans())
    reductions = ["mean", "sum"] + ([] if requires_grad and grad_enabled else ["none"])
    return dict(
        N=draw(st.integers(0, 9)), C=C, dtype=dtype, requires_grad=requires_grad, grad_enabled=grad_enabled,
        layout=draw(st.sampled_from(["contiguous", "stepped", "transposed"])),
        use_weight=draw(st.booleans()), ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        kwargs=dict(
            reduction=draw(st.sampled_from(reductions)),
            ignore_index=draw(st.sampled_from([-100, 0, 2, -1])),
            label_smoothing=draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0, allow_nan=False))),
            z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3])),
            softcap=draw(st.sampled_from([None, None, 3.0])),
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(call=plain_calls())
def test_plain_calls_match_the_full_path_bitwise(device, call):
    # Skipping the checks changes nothing: the same loss, gradient and graph node bit for bit as
    # when every check and routing decision runs (functional._plain_call forced to None).
    from unittest import mock

    from fused_ce import functional

    torch.manual_seed(call["seed"])
    n, c, dtype = call["N"], call["C"], call["dtype"]
    buffer = (torch.randn(n, 2 * c) * 4).to(dtype).to(device)
    x = {"contiguous": buffer[:, :c].contiguous(), "stepped": buffer[:, ::2],
         "transposed": buffer[:, :c].t().contiguous().t()}[call["layout"]]
    x.requires_grad_(call["requires_grad"])
    t = torch.randint(0, c, (n,))
    t = torch.where(torch.rand(n) < call["ignore_frac"], torch.full_like(t, call["kwargs"]["ignore_index"]), t)
    weight = (torch.rand(c) + 0.1).to(dtype).to(device) if call["use_weight"] else None

    def run():
        with torch.set_grad_enabled(call["grad_enabled"]):
            loss = fused_ce.cross_entropy(x, t.to(device), weight, **call["kwargs"])
        grad = torch.autograd.grad(loss, x)[0] if loss.requires_grad else None
        return loss, grad

    with mock.patch.object(functional, "check_loss_options", side_effect=AssertionError("the checks ran")):
        plain_loss, plain_grad = run()
    with mock.patch.object(functional, "_plain_call", return_value=None):
        full_loss, full_grad = run()
    assert identical(plain_loss, full_loss), (plain_loss, full_loss)
    assert (plain_grad is None) == (full_grad is None)
    if plain_grad is not None:
        assert identical(plain_grad, full_grad)
