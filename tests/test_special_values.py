"""Special values: NaN / +inf / -inf logits, huge finite logits, float16 near its max, C == 1.

float32/float64 are compared with torch's own computation in the same dtype.  float16/bfloat16 are
compared with torch's float64 computation rounded to the storage dtype (torch's own half computation
overflows in intermediate half sums, e.g. the label-smoothing term near 65504, which a float32
accumulator rightly does not).  NaN and +-inf positions of the loss and of the gradients must be
identical, finite values close (element-wise relative tolerance).
"""

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from conftest import assert_same_special, make_logits, make_prob_target, make_weight

NAN, INF = float("nan"), float("inf")

TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1.6e-2, 8e-3)}


def _both(x, t, device, target_grad=False, **kw):
    """Loss and grads (input [, target]) from torch (CPU, same dtype) and fused_ce (device)."""
    res = []
    half = x.dtype in (torch.float16, torch.bfloat16)
    for impl, dev in ((F.cross_entropy, "cpu"), (fused_ce.cross_entropy, device)):
        ref64 = half and impl is F.cross_entropy
        xl = x.detach().clone().to(dev)
        tl = t.detach().clone().to(dev)
        if ref64:
            xl = xl.double()
            tl = tl.double() if tl.dtype.is_floating_point else tl
        xl.requires_grad_()
        if target_grad:
            tl.requires_grad_()
        w = kw.get("weight")
        kwd = dict(kw, weight=None if w is None else w.to(dev, xl.dtype))
        loss = impl(xl, tl, **kwd)
        go = torch.ones_like(loss)
        inputs = (xl, tl) if target_grad else (xl,)
        grads = torch.autograd.grad(loss, inputs, go)
        if ref64:
            loss = loss.to(x.dtype)
            grads = tuple(g.to(i.dtype) for g, i in zip(grads, (x, t)))
        res.append((loss.detach(), grads))
    return res


def _compare(x, t, device, what, target_grad=False, **kw):
    (l_ref, g_ref), (l_out, g_out) = _both(x, t, device, target_grad=target_grad, **kw)
    rtol, atol = TOL[x.dtype]
    assert l_out.dtype == l_ref.dtype
    assert_same_special(l_out, l_ref, what=f"{what}: loss", rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(g_out, g_ref)):
        assert_same_special(a, b, what=f"{what}: grad[{i}]", rtol=rtol, atol=atol)


REDUCTIONS = ["none", "mean", "sum"]


# --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [3, 10, 100])
@pytest.mark.parametrize("where", ["other_class", "target_class"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "posinf"])
def test_nan_and_posinf_logits(device, value, where, C, reduction):
    N = 6
    x = make_logits((N, C), torch.float32)
    t = torch.randint(0, C, (N,))
    row = 2
    col = int(t[row]) if where == "target_class" else (int(t[row]) + 1) % C
    x[row, col] = value
    _compare(x, t, device, f"{value} at {where}", reduction=reduction)
    _compare(x, t, device, f"{value} at {where} ls", reduction=reduction, label_smoothing=0.1,
             weight=make_weight(C))


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [5, 70])
def test_neginf_masked_classes(device, C, reduction, ls):
    # attention-style masking: -inf on some classes (never the target), plus -inf AT the target in one row
    N = 8
    x = make_logits((N, C), torch.float32)
    t = torch.randint(0, C, (N,))
    mask = torch.rand(N, C) < 0.3
    mask[torch.arange(N), t] = False
    x[mask] = -INF
    _compare(x, t, device, "-inf masked (not target)", reduction=reduction, label_smoothing=ls)
    x[3, t[3]] = -INF  # -inf at the target: loss +inf, finite gradient
    _compare(x, t, device, "-inf at target", reduction=reduction, label_smoothing=ls)
    _compare(x, t, device, "-inf at target, weight", reduction=reduction, label_smoothing=ls, weight=make_weight(C))


@pytest.mark.parametrize("C", [4, 80])
def test_row_all_neginf(device, C):
    x = make_logits((4, C), torch.float32)
    x[1] = -INF
    t = torch.randint(0, C, (4,))
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"row of -inf {reduction}", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 10), (4, 1000), (2, 10, 3), (2, 1000, 3)])
def test_lse_of_a_row_of_neginf_is_neginf(device, shape, dtype):
    # torch.logsumexp's -inf, where the CPU kernels gave NaN (exp(-inf - -inf) in the sum); the loss
    # stays NaN (or 0 where ignored), as PyTorch's.
    x = make_logits(shape, dtype, device)
    x[1] = -INF
    t = torch.zeros((shape[0],) + shape[2:], dtype=torch.long, device=device)
    t[0] = -100
    loss, lse = fused_ce.cross_entropy(x, t, reduction="none", return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(x.float() if dtype != torch.float64 else x, 1))
    assert torch.isnan(loss[1]).all() and (loss[0] == 0).all()


@pytest.mark.parametrize("C", [10, 2000])
def test_lse_gradient_of_ignored_rows_with_tied_huge_maxima(device, C):
    # Only the lse's gradient reaches ignored rows: softmax, 1/2 at each of two tied maxima of 1e30.
    # From exp(x - lse), lse rounded to the maxima's magnitude, each got 1 on the CPU's long rows.
    x = make_logits((4, C), torch.float32, device)
    x[:, 1:3] = 1e30
    x.requires_grad_()
    _, lse = fused_ce.cross_entropy(x, torch.full((4,), -100, device=device), reduction="none", return_lse=True)
    (grad,) = torch.autograd.grad(lse.sum(), x)
    torch.testing.assert_close(grad, torch.softmax(x.detach().double(), 1).float())


@pytest.mark.parametrize("C", [4, 80])
def test_neginf_kdim_and_channels_last(device, C):
    x = make_logits((2, C, 3, 2), torch.float32)
    x[:, 1] = -INF  # class 1 masked everywhere
    t = torch.randint(0, C, (2, 3, 2))
    t[t == 1] = 0
    x = x.contiguous(memory_format=torch.channels_last)
    _compare(x, t, device, "-inf masked class, channels_last", reduction="none")
    _compare(x, t, device, "-inf masked class, channels_last, mean", reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("C", [3, 67])
def test_neginf_with_prob_targets(device, C):
    # 0 * -inf: torch gives NaN loss (finite gradient); p > 0 on a -inf class gives +inf loss
    x = make_logits((4, C), torch.float32)
    t = make_prob_target((4, C), torch.float32)
    x[0, 1] = -INF
    t[0, 1] = 0.0  # zero probability on the masked class -> NaN (0 * -inf) in torch
    x[2, 0] = -INF  # positive probability on a masked class -> +inf
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"soft -inf {reduction}", reduction=reduction, target_grad=True)


@pytest.mark.parametrize("C", [3, 70])
def test_nan_in_ignored_row(device, C):
    # torch: the loss of an ignored row is 0 even if the row contains NaN; the mean is finite.
    x = make_logits((5, C), torch.float32)
    t = torch.randint(0, C, (5,))
    t[1] = -100
    x[1, 0] = NAN
    for reduction in REDUCTIONS:
        (l_ref, _), (l_out, _) = _both(x, t, device, reduction=reduction)
        assert_same_special(l_out, l_ref, what=f"ignored NaN row loss {reduction}")


@pytest.mark.parametrize("C", [3, 70])
def test_nan_in_ignored_row_gradient_matches_torch(device, C):
    # torch's gradient for an ignored row containing NaN is NaN (log_softmax_backward: 0 - p * 0)
    x = make_logits((5, C), torch.float32)
    t = torch.randint(0, C, (5,))
    t[1] = -100
    x[1, 0] = NAN
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"ignored NaN row {reduction}", reduction=reduction)


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("C", [3, 70])
def test_huge_float32_logits(device, C, ls):
    x = make_logits((6, C), torch.float32)
    x[0, 0], x[0, 1] = 1e30, -1e30
    x[1, :2] = 1e30  # two maxima tie
    x[2] = 1e30  # the whole row at 1e30
    x[3, 1] = -3e38
    x[4, 2 % C] = 3e38
    t = torch.tensor([1, 0, 1 % C, 0, 1 % C, 0])
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"1e30 logits {reduction}", reduction=reduction, label_smoothing=ls)


@pytest.mark.parametrize("C", [3, 70])
def test_float16_near_max(device, C):
    x = make_logits((5, C), torch.float16)
    x[0, 0], x[0, 1] = 65504.0, -65504.0  # loss overflows float16 -> inf (torch too)
    x[1, 0], x[1, 1] = 65000.0, 65504.0
    x[2] = 65504.0
    x[3, 0] = -65504.0
    t = torch.tensor([1, 2 % C, 0, 0, 1])
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.2):
            _compare(x, t, device, f"fp16 near max {reduction} ls={ls}", reduction=reduction, label_smoothing=ls)


@pytest.mark.parametrize("shape", [(60_000, 10), (70_000, 10), (1, 10, 70_000)], ids=str)
def test_float16_mean_of_more_elements_than_float16_counts(device, shape):
    # The float16 mean's sum (about 2.7 per element) and, past 65504 elements, its total weight
    # overflow float16: eager PyTorch returns inf or NaN here. fused_ce sums and divides in
    # float32 and rounds once, so its mean is the float64 mean rounded to float16; the sum
    # itself (about 190000) is inf in float16 for both.
    x = make_logits(shape, torch.float16)
    t = torch.randint(0, 10, shape[:1] + shape[2:])
    want = F.cross_entropy(x.double(), t)
    got = fused_ce.cross_entropy(x.to(device), t.to(device))
    assert got.dtype == torch.float16 and torch.isfinite(got)
    torch.testing.assert_close(got.cpu().double(), want, rtol=torch.finfo(torch.float16).eps, atol=0)
    total = fused_ce.cross_entropy(x.to(device), t.to(device), reduction="sum")
    assert F.cross_entropy(x.double(), t, reduction="sum") > 65504 and total.item() == INF


@pytest.mark.parametrize("C", [3, 70])
def test_bfloat16_huge(device, C):
    x = make_logits((4, C), torch.bfloat16)
    # +-1.5e38: the loss 3e38 still fits the float32 accumulator (and bfloat16)
    x[0, 0], x[0, 1] = 1.5e38, -1.5e38
    x[1, 0] = 1e30
    t = torch.tensor([1, 1, 0, 2 % C])
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"bf16 huge {reduction}", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [200, 1000])
def test_half_rows_at_any_offset(device, dtype, C):
    # The row kernel folds a half-type row's shift (its max) into the exp for |max| <= 2^24 and
    # takes 2^(x - max) beyond (see FoldedShiftedExp): rows centred from -1e30 to 1e30, across
    # both boundaries, with a spread of a few steps of the type at that magnitude so that many
    # classes keep a non-negligible probability, ties at the max included.
    finite_max = torch.finfo(dtype).max
    offsets = [0.0, -37.5, 90.0, -128.0, 129.0, 3000.0, -6e4, 2.0**24, -(2.0**24), 2.0**24 * 1.0078125,
               3e9, -1e30, 1e30]
    offsets = [o for o in offsets if abs(o) < finite_max]
    rows = []
    for offset in offsets:
        spacing = max(abs(offset), 1.0) * torch.finfo(dtype).eps
        row = offset + torch.randn(C, dtype=torch.float64) * 4 * spacing
        row[torch.randint(0, C, (3,))] = row.max()  # ties at the max
        rows.append(row)
    x = torch.stack(rows).to(dtype)
    t = torch.randint(0, C, (len(offsets),))
    t[1] = x[1].float().argmax()
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.1):
            _compare(x, t, device, f"{dtype} offsets {reduction} ls={ls}", reduction=reduction,
                     label_smoothing=ls)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_single_class(device, dtype):
    # C == 1: log_softmax is 0, loss 0, gradient 0 -- for class and soft targets, with smoothing
    x = make_logits((7, 1), dtype)
    t = torch.zeros(7, dtype=torch.long)
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.5, 1.0):
            _compare(x, t, device, f"C=1 {reduction} ls={ls}", reduction=reduction, label_smoothing=ls)
    t[2] = -100
    _compare(x, t, device, "C=1 with ignored", reduction="mean")
    ts = torch.rand(7, 1).to(dtype)
    _compare(x, ts, device, "C=1 soft", reduction="mean", target_grad=True)
    x3 = make_logits((3, 1, 4), dtype)
    _compare(x3, torch.zeros(3, 4, dtype=torch.long), device, "C=1 K-dim", reduction="none")


def test_single_class_unbatched(device):
    x = make_logits((1,), torch.float32)
    _compare(x, torch.tensor(0), device, "C=1 unbatched", reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_constant_rows(device, dtype):
    # all-equal rows (uniform softmax) at a large offset: loss log(C) exactly-ish
    C = 1000
    x = torch.full((3, C), 1e4, dtype=dtype)
    x[1] = -1e4
    t = torch.tensor([0, 5, C - 1])
    _compare(x, t, device, "constant rows", reduction="none")


def test_nan_soft_target(device):
    x = make_logits((3, 5), torch.float32)
    t = make_prob_target((3, 5), torch.float32)
    t[1, 2] = NAN
    for reduction in REDUCTIONS:
        _compare(x, t, device, f"NaN in soft target {reduction}", reduction=reduction, target_grad=True)
