"""The reduce_loss operator: the loss of a call from its per-element losses.

Its sum, or for the mean its sum over the total weight, as a 0-dim tensor of
the input's dtype, summed in an order fixed by the element count (so the bits
do not depend on threads); both autograd paths reduce with it. CUDA's two
launch shapes (one block up to 4096 elements, partials beyond) also run on
the CPU emulator (tests/test_cuda_emulated.py).
"""

import math

import pytest
import torch

import fused_ce
from conftest import FLOAT_DTYPES, NATIVE_NODE, dtype_id, make_class_target, make_logits, reduced_loss_reference

ops = torch.ops.fused_ce
REDUCTION_CODE = {"mean": 1, "sum": 2}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _losses(n, dtype, device, signed=False):
    """Per-element losses in the accumulate type of ``dtype``: positive like most losses,
    or of both signs (label smoothing with soft targets can give either)."""
    values = torch.rand(n, dtype=torch.float64) * 5
    if signed:
        values = values - 2.5
    return values.to(_acc(dtype)).to(device)


def _reduce(loss, total_weight, reduction, dtype):
    return ops.reduce_loss(loss, total_weight, REDUCTION_CODE[reduction], dtype)


# n: one element, a partial block, exactly one CUDA block, one more (two
# stages), several CPU chunks of 32768.
@pytest.mark.parametrize("n", [0, 1, 37, 4096, 4097, 65536, 100_003])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_matches_the_float64_sum(device, dtype, reduction, n):
    loss = _losses(n, dtype, device)
    total_weight = torch.tensor(0.75 * n + 0.5, dtype=_acc(dtype), device=device)
    got = _reduce(loss, total_weight, reduction, dtype)
    want = reduced_loss_reference(loss, total_weight, reduction, dtype)
    assert got.shape == () and got.dtype == dtype and got.device == want.device
    # Rounded to the accumulate type, divided there, rounded to dtype: a couple of its ulps.
    rtol = 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_cancelling_signs(device, dtype):
    loss = _losses(50_001, dtype, device, signed=True)
    total_weight = torch.tensor(3.0, dtype=dtype, device=device)
    got = _reduce(loss, total_weight, "sum", dtype)
    want = reduced_loss_reference(loss, total_weight, "sum", dtype)
    # The error of a sum scales with the sum of magnitudes, not with the (small) result.
    scale = loss.double().abs().sum().item()
    assert abs(got.item() - want.item()) <= scale * (1e-14 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_special_values(device, dtype):
    def reduce(values, total, reduction="mean"):
        loss = torch.tensor(values, dtype=dtype, device=device)
        return _reduce(loss, torch.tensor(total, dtype=dtype, device=device), reduction, dtype).item()

    assert math.isnan(reduce([1.0, math.nan, 2.0] * 3000, 5.0))
    assert reduce([1.0, math.inf] * 3000, 5.0) == math.inf
    assert math.isnan(reduce([math.inf, 1.0, -math.inf] * 2000, 5.0, "sum"))
    # A total weight of 0 is NaN whatever the sum (label smoothing over targets of class weight 0
    # has a positive one): PyTorch's mean divides its NLL term, 0 there, by it apart.
    assert math.isnan(reduce([1.0, 2.0], 0.0))
    assert math.isnan(reduce([1.0, 2.0] * 3000, 0.0))
    assert reduce([1.0, 2.0], 0.0, "sum") == 3.0
    # An empty or all-ignored batch: PyTorch's mean is 0 / 0 = NaN, its sum 0.
    assert math.isnan(reduce([], 0.0))
    assert math.isnan(reduce([0.0] * 10, 0.0))
    assert reduce([], 0.0, "sum") == 0.0


def test_same_bits_for_any_thread_count_and_layout():
    loss = _losses(300_001, torch.float32, "cpu")
    total_weight = torch.tensor(1234.5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_reduce(loss, total_weight, "mean", torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    # A strided view of the same values in the same order: the same bits.
    spread = torch.zeros(300_001, 2)
    spread[:, 0] = loss
    assert torch.equal(_reduce(spread[:, 0], total_weight, "mean", torch.float32), results[0])


def test_repeated_calls_give_the_same_bits(device):
    loss = _losses(70_001, torch.float32, device)
    total_weight = torch.tensor(7.0, device=device)
    first = _reduce(loss, total_weight, "sum", torch.bfloat16)
    for _ in range(3):
        assert torch.equal(_reduce(loss, total_weight, "sum", torch.bfloat16), first)


def test_rejects_bad_arguments(device):
    loss = torch.rand(10, device=device)
    total = torch.tensor(4.0, device=device)
    with pytest.raises(RuntimeError, match="reduction 1 \\(mean\\) or 2 \\(sum\\), got 0"):
        ops.reduce_loss(loss, total, 0, torch.float32)
    with pytest.raises(RuntimeError, match="floating point dtype"):
        ops.reduce_loss(loss, total, 1, torch.int64)
    with pytest.raises(RuntimeError, match="Double loss for dtype Double"):
        ops.reduce_loss(loss, total, 1, torch.float64)
    with pytest.raises(RuntimeError, match="Float loss for dtype Half"):
        ops.reduce_loss(loss.half(), total, 1, torch.float16)
    with pytest.raises(RuntimeError, match="one-element Float total_weight"):
        ops.reduce_loss(loss, torch.ones(2, device=device), 1, torch.float32)
    with pytest.raises(RuntimeError, match="one-element Float total_weight"):
        ops.reduce_loss(loss, total.double(), 2, torch.float32)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="total_weight is on cpu"):
            ops.reduce_loss(loss, torch.tensor(4.0), 1, torch.float32)
    # The library keeps working after the errors.
    assert ops.reduce_loss(loss, total, 2, torch.float32).item() == pytest.approx(loss.sum().item(), rel=1e-6)


def test_opcheck(device):
    loss = torch.rand(9, 3, device=device)
    torch.library.opcheck(ops.reduce_loss, (loss, torch.tensor(5.0, device=device), 1, torch.bfloat16))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_both_autograd_paths_give_the_same_bits(device, dtype, reduction):
    # The C++ node (a plain call) and the Python Function (return_lse=True)
    # reduce with the same operator.
    x = make_logits((300, 17, 3), dtype, device).requires_grad_()
    t = make_class_target((300, 3), 17, device, ignore_index=-100)
    native = fused_ce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    python, _ = fused_ce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, return_lse=True)
    assert native.grad_fn.name() == NATIVE_NODE and python.grad_fn.name() != NATIVE_NODE
    assert torch.equal(native, python)
    with torch.no_grad():
        assert torch.equal(fused_ce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1), native)
