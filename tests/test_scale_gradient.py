"""The scale_gradient_ operator: the backward of a gradient computed in the forward.

grad *= scale in place, and nothing at all when scale is exactly 1 (on CUDA the
kernel decides on the device, so autograd's loss.backward() costs no pass over
the gradient and no host synchronisation).
"""

import math

import pytest
import torch

import fused_ce  # noqa: F401  (registers the operators)
from conftest import FLOAT_DTYPES, dtype_id, make_logits

ops = torch.ops.fused_ce


def _expected(grad, scale):
    """What the operator must produce: each element times the scale in the accumulate type,
    rounded once to the gradient's dtype."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.to(acc) * torch.tensor(scale, dtype=acc, device=grad.device)).to(grad.dtype)


@pytest.mark.parametrize("scale", [2.5, -0.75, 0.0, 1e-3, math.nan, math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scales_every_element(device, dtype, scale):
    # 4099 elements: vector body plus a tail of every dtype's vector width
    grad = make_logits((4099,), dtype, device)
    upstream = torch.tensor(scale, dtype=dtype, device=device)  # autograd's: the loss's dtype
    want = _expected(grad, upstream.item())
    ops.scale_gradient_(grad, upstream)
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_one_leaves_the_gradient_untouched(device, dtype):
    grad = make_logits((37, 129), dtype, device)
    before = grad.clone()
    pointer = grad.data_ptr()
    for scale_dtype in (dtype, torch.float32, torch.float64):
        ops.scale_gradient_(grad, torch.ones((), dtype=scale_dtype, device=device))
    assert grad.data_ptr() == pointer
    assert torch.equal(grad, before)


@pytest.mark.parametrize("layout", ["offset_by_one", "permuted", "one_element", "empty"])
def test_layouts(device, layout):
    # any dense tensor: misaligned start (scalar path on CUDA), permuted strides, tiny or empty
    if layout == "offset_by_one":
        base = make_logits((1 + 3 * 1000,), torch.bfloat16, device)
        grad = base[1:].view(3, 1000)
    elif layout == "permuted":
        grad = make_logits((40, 7, 33), torch.float32, device).permute(2, 0, 1)
    elif layout == "one_element":
        grad = make_logits((1,), torch.float16, device)
    else:
        grad = torch.empty((0, 5), device=device)
    want = _expected(grad, -3.0)
    ops.scale_gradient_(grad, torch.tensor([-3.0], device=device))
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_rejects_bad_arguments(device):
    grad = make_logits((8, 6), torch.float32, device)
    with pytest.raises(RuntimeError, match="dense"):
        ops.scale_gradient_(grad[:, ::2], torch.tensor(2.0, device=device))
    with pytest.raises(RuntimeError, match="one-element scale"):
        ops.scale_gradient_(grad, torch.tensor([2.0, 3.0], device=device))
    with pytest.raises(RuntimeError, match="floating point"):
        ops.scale_gradient_(torch.ones(4, dtype=torch.long, device=device), torch.tensor(2.0, device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="scale is on cpu"):
            ops.scale_gradient_(grad, torch.tensor(2.0))


def test_opcheck(device):
    grad = make_logits((16, 10), torch.float32, device)
    torch.library.opcheck(ops.scale_gradient_, (grad, torch.tensor(0.5, device=device)))
