"""Value and gradient parity of fused_ce.cross_entropy with torch.nn.functional.cross_entropy.

Every case compares against F.cross_entropy evaluated in float64 on copies of the same inputs
(see conftest.check_against_torch): loss values, dtype and shape, grad w.r.t. the input (with a
random upstream gradient), grad w.r.t. soft targets when they require grad, and that the inputs
are left untouched.
"""

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    FLOAT_DTYPES,
    REDUCTIONS,
    TARGET_WALK_LAYOUTS,
    assert_close_ref,
    check_against_torch,
    dtype_id,
    make_class_target,
    make_logits,
    make_prob_target,
    make_target_in_walk_layout,
    make_weight,
    ref_llm,
)

import fused_ce  # an ImportError must fail the module, not skip it


# --------------------------------------------------------------------------
# 1. The option grid: reduction x weight x ignore_index x label_smoothing, class-index targets.
#    C=10 runs the tile (few-classes) kernel, C=67 the vectorised row kernel with a tail.

IGNORE_CASES = {
    "default_absent": dict(kw={}, present=None),
    "default_present": dict(kw={}, present=-100),
    "custom2_present": dict(kw={"ignore_index": 2}, present=2),
}


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", list(IGNORE_CASES))
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [10, 67])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_option_grid_class_targets(device, dtype, C, reduction, use_weight, ignore, label_smoothing):
    N = 23
    case = IGNORE_CASES[ignore]
    x = make_logits((N, C), dtype, device)
    t = make_class_target((N,), C, device, ignore_index=case["present"])
    if case["present"] == 2:
        # 2 is a valid class index: make sure it also appears as "the ignored class"
        assert (t == 2).any()
    w = make_weight(C, dtype, device) if use_weight else None
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=label_smoothing,
                        what=f"C={C} {reduction} w={use_weight} {ignore} ls={label_smoothing}", **case["kw"])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("use_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [10, 67])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_option_grid_prob_targets(device, dtype, C, reduction, use_weight, label_smoothing):
    N = 19
    x = make_logits((N, C), dtype, device)
    t = make_prob_target((N, C), dtype, device)
    w = make_weight(C, dtype, device) if use_weight else None
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=label_smoothing,
                        target_grad=True, what=f"soft C={C} {reduction} w={use_weight} ls={label_smoothing}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_prob_targets_unnormalised_and_only_target_grad(device, dtype, reduction):
    # Targets that do not sum to 1 (torch does not require it); grad only w.r.t. the target.
    x = make_logits((11, 7, 3), dtype, device)
    t = make_prob_target((11, 7, 3), dtype, device, normalized=False)
    w = make_weight(7, dtype, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.2, input_grad=False,
                        target_grad=True, what="soft, target grad only")
    check_against_torch(fused_ce, x, t, None, reduction=reduction, input_grad=True, target_grad=False,
                        what="soft, input grad only")
    check_against_torch(fused_ce, x, t, None, reduction=reduction, input_grad=False, target_grad=False,
                        what="soft, forward only")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [5, 300])
def test_forward_only_no_grad(device, reduction, C):
    x = make_logits((17, C), torch.float32, device)
    t = make_class_target((17,), C, device, ignore_index=-100)
    w = make_weight(C, torch.float32, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, input_grad=False, label_smoothing=0.05)
    with torch.no_grad():
        xg = x.clone().requires_grad_()
        out = fused_ce.cross_entropy(xg, t, w, reduction=reduction, label_smoothing=0.05)
        assert not out.requires_grad
        ref = F.cross_entropy(x.double().cpu(), t.cpu(), w.double().cpu(), reduction=reduction,
                              label_smoothing=0.05)
        assert_close_ref(out, ref, torch.float32, what="no_grad forward")


# --------------------------------------------------------------------------
# 2. Shapes x class counts x dtypes (class-index targets), fixed but non-trivial options.

SHAPE_KINDS = ["unbatched", "2d", "3d", "4d"]


def _shape(kind, C):
    big = C >= 1000
    if kind == "unbatched":
        return (C,)
    if kind == "2d":
        return (9 if C >= 3000 else 37, C)
    if kind == "3d":
        return (3 if big else 5, C, 4 if big else 7)
    return (2 if big else 3, C, 3, 2 if big else 5)


def _target_shape(shape):
    if len(shape) == 1:
        return ()
    return (shape[0],) + tuple(shape[2:])


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [1, 3, 10, 33, 64, 67, 1000, 1001, 3000])
@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_shapes_classes_dtypes(device, kind, C, dtype, reduction):
    shape = _shape(kind, C)
    x = make_logits(shape, dtype, device)
    tshape = _target_shape(shape)
    # sprinkle ignore_index=-100 (not in the unbatched case: a single ignored element is its own test)
    t = make_class_target(tshape, C, device, ignore_index=-100 if kind != "unbatched" else None, ignore_frac=0.2)
    w = make_weight(C, dtype, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1,
                        what=f"{kind} shape={shape} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [3, 1001])
@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_shapes_plain_sum(device, kind, C, dtype):
    # the most common call: no weight, no smoothing, reduction sum (forward-with-grad path on CPU)
    shape = _shape(kind, C)
    x = make_logits(shape, dtype, device)
    t = make_class_target(_target_shape(shape), C, device)
    check_against_torch(fused_ce, x, t, None, reduction="sum", what=f"{kind} {shape} {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [1, 3, 67, 1001])
@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_shapes_prob_targets(device, kind, C, dtype):
    shape = _shape(kind, C)
    x = make_logits(shape, dtype, device)
    t = make_prob_target(shape, dtype, device)
    w = make_weight(C, dtype, device)
    for reduction, ls, weight in (("mean", 0.1, w), ("none", 0.0, None)):
        check_against_torch(fused_ce, x, t, weight, reduction=reduction, label_smoothing=ls, target_grad=True,
                            what=f"soft {kind} {shape} {dtype} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("C", [3, 2048])
def test_large_logit_scale(device, C, dtype):
    # logits spread over +-60: exercises the max subtraction and exp range
    x = make_logits((16, C), dtype, device, scale=20.0)
    t = make_class_target((16,), C, device)
    check_against_torch(fused_ce, x, t, None, reduction="none", label_smoothing=0.3, what="scale 20")


def test_many_rows_parallel(device):
    # enough rows to be split across threads; mean over many elements
    C = 129
    x = make_logits((2048, C), torch.float32, device)
    t = make_class_target((2048,), C, device, ignore_index=-100, ignore_frac=0.1)
    w = make_weight(C, torch.float32, device)
    check_against_torch(fused_ce, x, t, w, reduction="mean", label_smoothing=0.1)
    x = make_logits((64, 5, 40), torch.float32, device)
    t = make_class_target((64, 40), 5, device, ignore_index=-100, ignore_frac=0.1)
    check_against_torch(fused_ce, x, t, None, reduction="mean")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [3, 10, 15, 16, 21, 33, 63])
@pytest.mark.parametrize("first_row", [0, 1], ids=["aligned", "offset"])
def test_short_rows_in_whole_tiles(device, C, dtype, first_row):
    # (N, C) rows of fewer than 64 classes go through the CPU's tile kernel, 16 (or 8) rows at a
    # time; a whole tile's gradient (and soft-target gradient) is one contiguous run, streamed
    # where it covers whole cache lines (all C in float32; even C in the 16-bit types under
    # AVX-512). 87 rows: whole tiles and a partial one; the row offset moves the logits off a
    # line boundary (the gradients are fresh tensors).
    x = make_logits((87 + first_row, C), dtype, device)[first_row:]
    t = make_class_target((87,), C, device, ignore_index=-100, ignore_frac=0.1)
    w = make_weight(C, dtype, device)
    check_against_torch(fused_ce, x, t, w, reduction="mean", label_smoothing=0.1,
                        what=f"{C} classes {dtype} from row {first_row}")
    p = make_prob_target((87 + first_row, C), dtype, device)[first_row:]
    check_against_torch(fused_ce, x, p, None, reduction="sum", target_grad=True,
                        what=f"soft {C} classes {dtype} from row {first_row}")


# --------------------------------------------------------------------------
# 3. ignore_index variants.


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-1, 0, 4, 7, 12345, -(2**40)])
@pytest.mark.parametrize("C", [8, 80])
def test_ignore_index_values(device, C, ignore_index, reduction, label_smoothing):
    # ignore_index inside [0, C), negative, == C-ish and far outside, each present in the targets
    N = 30
    x = make_logits((N, C, 2), torch.float64, device)
    t = make_class_target((N, 2), C, device, ignore_index=ignore_index, ignore_frac=0.3)
    w = make_weight(C, torch.float64, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, ignore_index=ignore_index,
                        label_smoothing=label_smoothing, what=f"ignore_index={ignore_index}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_not_present(device, reduction):
    x = make_logits((12, 6), torch.float64, device)
    t = make_class_target((12,), 6, device)
    t[t == 3] = 4
    check_against_torch(fused_ce, x, t, None, reduction=reduction, ignore_index=3)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("C", [4, 100])
def test_all_ignored_batch(device, C, use_weight, label_smoothing):
    # every element ignored: mean -> NaN (0/0) and zero gradient, like torch; sum -> 0; none -> zeros
    x = make_logits((6, C), torch.float32, device)
    t = torch.full((6,), -100, dtype=torch.long, device=device)
    w = make_weight(C, torch.float32, device) if use_weight else None
    for reduction in REDUCTIONS:
        loss, gi, _, (ref_loss, ref_gi, _) = check_against_torch(
            fused_ce, x, t, w, reduction=reduction, label_smoothing=label_smoothing,
            what=f"all ignored {reduction}")
        if reduction == "mean":
            assert torch.isnan(loss).item() and torch.isnan(ref_loss).item()
        assert torch.equal(torch.isnan(gi).cpu(), torch.isnan(ref_gi))
    # the same with a K-dim input and a custom ignore index
    x = make_logits((2, C, 3, 2), torch.float64, device)
    t = torch.full((2, 3, 2), 1, dtype=torch.long, device=device)
    check_against_torch(fused_ce, x, t, w.double() if w is not None else None, reduction="mean",
                        ignore_index=1, label_smoothing=label_smoothing, what="all ignored K-dim")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3)], ids=["2d", "3d"])
def test_targets_of_class_weight_zero_only(device, shape, label_smoothing):
    # Every counted target has class weight 0, so the mean's total weight is 0: PyTorch's mean is
    # NaN, also with label smoothing, whose own term (positive here) it divides by the total
    # weight apart from the NLL term (0 / 0).
    x = make_logits(shape, torch.float64, device)
    t = torch.full((shape[0],) + shape[2:], 1, dtype=torch.long, device=device)
    t[0].fill_(-100)
    w = make_weight(shape[1], torch.float64, device)
    w[1] = 0.0
    loss, *_ = check_against_torch(fused_ce, x, t, w, reduction="mean", label_smoothing=label_smoothing,
                                   what="zero total weight")
    assert torch.isnan(loss).item()
    check_against_torch(fused_ce, x, t, w, reduction="sum", label_smoothing=label_smoothing, what="sum")


def test_unbatched_ignored_element(device):
    x = make_logits((7,), torch.float64, device)
    t = torch.tensor(-100, device=device)
    for reduction in REDUCTIONS:
        check_against_torch(fused_ce, x, t, None, reduction=reduction, what=f"unbatched ignored {reduction}")


# --------------------------------------------------------------------------
# 4. Empty batches.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 70), (0, 4, 3), (2, 4, 0), (0, 3, 2, 2), (3, 6, 2, 0)])
def test_empty_batch_class_targets(device, shape, reduction):
    x = make_logits(shape, torch.float32, device)
    t = make_class_target(_target_shape(shape), shape[1], device)
    check_against_torch(fused_ce, x, t, make_weight(shape[1], torch.float32, device), reduction=reduction,
                        what=f"empty {shape}")
    check_against_torch(fused_ce, x, t, None, reduction=reduction, label_smoothing=0.2, what=f"empty {shape} ls")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 4, 3), (2, 4, 0)])
def test_empty_batch_prob_targets(device, shape, reduction):
    x = make_logits(shape, torch.float32, device)
    t = make_prob_target(shape, torch.float32, device)
    check_against_torch(fused_ce, x, t, None, reduction=reduction, target_grad=True, what=f"empty soft {shape}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (0,)])
def test_zero_classes(device, shape, reduction):
    # No classes: PyTorch's formulas give 0 per element (NaN with label
    # smoothing), a NaN mean and an empty gradient; fused_ce gives the same.
    x = make_logits(shape, torch.float32, device)
    t = torch.full(_target_shape(shape) if len(shape) > 1 else (), -100, dtype=torch.long, device=device)
    w = torch.rand(0, device=device)
    for smoothing in (0.0, 0.3):
        check_against_torch(fused_ce, x, t, None, reduction=reduction, label_smoothing=smoothing,
                            what=f"no classes {shape} ls {smoothing}")
    check_against_torch(fused_ce, x, t, w, reduction=reduction, what=f"no classes {shape} weight")
    check_against_torch(fused_ce, x, make_prob_target(shape, torch.float32, device), None, reduction=reduction,
                        target_grad=True, what=f"no classes {shape} soft")


def test_zero_classes_errors(device):
    x = make_logits((3, 0), torch.float32, device)
    ignored = torch.full((3,), -100, device=device)
    # (PyTorch's CUDA kernel would assert on the device; fused_ce raises PyTorch's CPU error.)
    with pytest.raises(IndexError, match="Target 0 is out of bounds"):
        fused_ce.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(IndexError, match="Target 0 is out of bounds"):
        fused_ce.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device), validate=True)
    for options in ({"z_loss": 1e-4}, {"softcap": 30.0}, {"return_lse": True}):
        with pytest.raises(ValueError, match="need at least one class"):
            fused_ce.cross_entropy(x, ignored, **options)


def test_zero_classes_linear_cross_entropy(device):
    # An LM head with no vocabulary: PyTorch's F.linear + F.cross_entropy results.
    h = make_logits((3, 4), torch.float32, device).requires_grad_()
    w = torch.randn(0, 4, device=device, requires_grad=True)
    t = torch.full((3,), -100, device=device)
    for reduction in REDUCTIONS:
        loss = fused_ce.linear_cross_entropy(h, w, t, reduction=reduction)
        ref = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        (grad_h,) = torch.autograd.grad(loss.sum(), h)
        torch.testing.assert_close(grad_h, torch.zeros_like(h))


# --------------------------------------------------------------------------
# 5. Non-contiguous inputs.

LAYOUTS = ["transposed", "sliced", "expanded_input", "expanded_target", "channels_last", "permuted_3d",
           "class_last_3d", "class_sliced", "offset_rows"]


def _layout_case(layout, C, dtype, device):
    """Returns (x_leaf, target_leaf, view, target_view)."""
    if layout == "transposed":  # (N, C) with stride (1, N)
        x = make_logits((C, 21), dtype, device)
        t = make_class_target((21,), C, device, ignore_index=-100)
        return x, t, lambda a: a.t(), None
    if layout == "sliced":  # batch and classes with steps
        x = make_logits((40, 2 * C + 3), dtype, device)
        t = make_class_target((60,), C, device, ignore_index=-100)
        return x, t, lambda a: a[::2, 1 : 2 * C + 1 : 2], lambda b: b[::3]
    if layout == "expanded_input":  # stride 0 in the batch dim
        x = make_logits((1, C, 3), dtype, device)
        t = make_class_target((9, 3), C, device, ignore_index=-100)
        return x, t, lambda a: a.expand(9, C, 3), None
    if layout == "expanded_target":
        x = make_logits((8, C, 5), dtype, device)
        t = make_class_target((1, 5), C, device)
        return x, t, None, lambda b: b.expand(8, 5)
    if layout == "channels_last":  # class stride 1, spatial stride C
        x = make_logits((3, C, 4, 5), dtype, device)
        t = make_class_target((3, 4, 5), C, device, ignore_index=-100)
        return x, t, lambda a: a.contiguous(memory_format=torch.channels_last), None
    if layout == "permuted_3d":  # (N, C, d) built from a (d, N, C) buffer
        x = make_logits((6, 5, C), dtype, device)
        t = make_class_target((6, 5), C, device, ignore_index=-100)
        return x, t, lambda a: a.permute(1, 2, 0), lambda b: b.t()
    if layout == "class_last_3d":  # F.cross_entropy(logits.transpose(1, 2), y) of (N, d, C) logits
        x = make_logits((4, 7, C), dtype, device)
        t = make_class_target((4, 7), C, device, ignore_index=-100)
        return x, t, lambda a: a.transpose(1, 2), None
    if layout == "class_sliced":  # negative-free but odd class stride with spatial dims
        x = make_logits((4, 3 * C, 6), dtype, device)
        t = make_class_target((4, 3), C, device, ignore_index=-100)
        return x, t, lambda a: a[:, ::3, ::2], None
    if layout == "offset_rows":  # class stride 1 but rows start at odd (unaligned) offsets
        x = make_logits((13, C + 3), dtype, device)
        t = make_class_target((13,), C, device, ignore_index=-100)
        return x, t, lambda a: a[:, 1 : C + 1], None
    raise AssertionError(layout)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [10, 67, 1000])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_class_targets(device, layout, C, dtype, reduction):
    x, t, view, tview = _layout_case(layout, C, dtype, device)
    xv = view(x) if view else x
    if layout in ("transposed", "sliced", "channels_last", "permuted_3d", "class_last_3d", "class_sliced",
                  "expanded_input", "offset_rows"):
        assert not xv.is_contiguous()
    if layout == "channels_last":
        assert xv.stride(1) == 1
    w = make_weight(C, dtype, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1, view=view, target_view=tview,
                        what=f"{layout} C={C}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [5, 70])
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced", "expanded"])
def test_noncontiguous_prob_targets(device, layout, C, dtype):
    if layout == "transposed":
        x = make_logits((C, 9), dtype, device)
        t = make_prob_target((C, 9), dtype, device)  # columns are not normalised: fine for torch
        view, tview = (lambda a: a.t()), (lambda b: b.t())
    elif layout == "channels_last":
        x = make_logits((2, C, 3, 4), dtype, device)
        t = make_prob_target((2, C, 3, 4), dtype, device)
        view = lambda a: a.to(memory_format=torch.channels_last)  # noqa: E731
        tview = lambda b: b.to(memory_format=torch.channels_last)  # noqa: E731
    elif layout == "sliced":
        x = make_logits((10, 2 * C, 4), dtype, device)
        t = make_prob_target((5, C, 8), dtype, device)
        view = lambda a: a[::2, ::2]  # noqa: E731
        tview = lambda b: b[:, :, ::2]  # noqa: E731
    else:  # target expanded along the batch dim (stride 0)
        x = make_logits((6, C), dtype, device)
        t = make_prob_target((1, C), dtype, device)
        view, tview = None, (lambda b: b.expand(6, C))
    for reduction in REDUCTIONS:
        check_against_torch(fused_ce, x, t, make_weight(C, dtype, device), reduction=reduction, label_smoothing=0.1,
                            target_grad=True, view=view, target_view=tview, what=f"soft {layout} {reduction}")


def test_noncontiguous_weight(device):
    C = 12
    x = make_logits((9, C), torch.float32, device)
    t = make_class_target((9,), C, device, ignore_index=-100)
    w_big = make_weight(2 * C, torch.float32, device)
    w = w_big[::2]
    assert not w.is_contiguous()
    for reduction in REDUCTIONS:
        check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1)


def test_grad_output_noncontiguous_none_reduction(device):
    # upstream gradient for reduction='none' that is non-contiguous / expanded
    C = 20
    x = make_logits((5, C, 4), torch.float32, device)
    t = make_class_target((5, 4), C, device, ignore_index=-100)
    xl = x.clone().requires_grad_()
    loss = fused_ce.cross_entropy(xl, t, reduction="none", label_smoothing=0.1)
    go = torch.rand(4, 5, dtype=torch.float32, device=device).t()  # transposed
    (g,) = torch.autograd.grad(loss, xl, go, retain_graph=True)
    x64 = x.double().cpu().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), reduction="none", label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, x64, go.double().cpu(), retain_graph=True)
    assert_close_ref(g, gr, torch.float32, what="grad with transposed grad_output")
    go2 = torch.tensor(1.7, device=device).expand(5, 4)  # stride 0
    (g2,) = torch.autograd.grad(loss, xl, go2)
    (gr2,) = torch.autograd.grad(ref, x64, go2.double().cpu())
    assert_close_ref(g2, gr2, torch.float32, what="grad with expanded grad_output")


# --------------------------------------------------------------------------
# 6. Target dtypes and promotion.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [5, 200])
def test_uint8_targets(device, C, reduction):
    x = make_logits((17, C), torch.float32, device)
    t = make_class_target((17,), C, device, dtype=torch.uint8)
    w = make_weight(C, torch.float32, device)
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1, ref_target=t.long(),
                        what="uint8 targets")
    if reduction != "mean":  # torch itself fails on uint8 + weight + label_smoothing + mean (gather index dtype)
        check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1, what="uint8 targets")
    # uint8 with an ignore_index in its range (255) present
    t2 = t.clone()
    t2[::4] = 255
    check_against_torch(fused_ce, x, t2, None, reduction=reduction, ignore_index=255, what="uint8 ignore 255")
    # and the unbatched case
    check_against_torch(fused_ce, x[0], t[0], None, reduction=reduction, what="uint8 unbatched")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "in_dtype,t_dtype",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
    ],
    ids=lambda d: dtype_id(d),
)
def test_prob_target_dtype_promotion(device, in_dtype, t_dtype, reduction):
    # torch promotes: float32 input + float64 target -> float64 loss (and float64 computation)
    x = make_logits((13, 9, 2), in_dtype, device)
    t = make_prob_target((13, 9, 2), t_dtype, device)
    loss, gi, gt, _ = check_against_torch(fused_ce, x, t, None, reduction=reduction, label_smoothing=0.1,
                                          target_grad=True, what=f"promotion {in_dtype}+{t_dtype}")
    assert loss.dtype == torch.promote_types(in_dtype, t_dtype)
    assert gi.dtype == in_dtype and gt.dtype == t_dtype


def test_prob_target_float64_weight_float32_input(device):
    # torch accepts a float64 weight with a float32 input for probability targets (promotes to float64)
    C = 6
    x = make_logits((8, C), torch.float32, device)
    t = make_prob_target((8, C), torch.float32, device)
    w = make_weight(C, torch.float64, device)
    for reduction in REDUCTIONS:
        check_against_torch(fused_ce, x, t, w, reduction=reduction, target_grad=True, what="soft fp64 weight")


# --------------------------------------------------------------------------
# 7. Autograd plumbing: repeated backward, grad accumulation, legacy args.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [6, 130])
def test_backward_twice_and_accumulation(device, C, reduction):
    x = make_logits((10, C), torch.float32, device)
    t = make_class_target((10,), C, device, ignore_index=-100)
    xl = x.clone().requires_grad_()
    loss = fused_ce.cross_entropy(xl, t, reduction=reduction, label_smoothing=0.1)
    go = torch.ones_like(loss) * 0.75
    loss.backward(go, retain_graph=True)
    g1 = xl.grad.clone()
    loss.backward(go * 2)
    x64 = x.double().cpu().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), reduction=reduction, label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, x64, go.double().cpu())
    assert_close_ref(g1, gr, torch.float32, what="first backward")
    assert_close_ref(xl.grad, 3 * gr, torch.float32, what="accumulated backward (1x + 2x)")


def test_loss_used_twice_in_graph(device):
    # loss participates twice (and grad_output is not 1): scaling must be applied in backward
    x = make_logits((7, 90), torch.float32, device)
    t = make_class_target((7,), 90, device)
    xl = x.clone().requires_grad_()
    loss = fused_ce.cross_entropy(xl, t)
    (loss * 3 + loss**2).backward()
    x64 = x.double().cpu().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu())
    (ref * 3 + ref**2).backward()
    assert_close_ref(xl.grad, x64.grad, torch.float32, what="grad of 3L + L^2")


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, True),
                                                 (True, None), (None, True)])
def test_legacy_size_average_reduce(device, size_average, reduce):
    x = make_logits((9, 4), torch.float32, device)
    t = make_class_target((9,), 4, device)
    with pytest.warns(UserWarning):
        ref = F.cross_entropy(x.double().cpu(), t.cpu(), size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fused_ce.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    assert_close_ref(out, ref, torch.float32, what=f"size_average={size_average} reduce={reduce}")


def test_positional_arguments_match_torch_signature(device):
    # cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    C = 5
    x = make_logits((8, C), torch.float64, device)
    t = make_class_target((8,), C, device, ignore_index=1)
    w = make_weight(C, torch.float64, device)
    out = fused_ce.cross_entropy(x, t, w, None, 1, None, "sum", 0.2)
    ref = F.cross_entropy(x.cpu(), t.cpu(), w.cpu(), None, 1, None, "sum", 0.2)
    assert_close_ref(out, ref, torch.float64, what="positional args")


# --------------------------------------------------------------------------
# 8. Weights with zeros / negatives, autocast, inference mode, determinism, the autograd.Function.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("C", [4, 90])
def test_zero_and_negative_weights(device, C, reduction):
    x = make_logits((12, C), torch.float64, device)
    t = make_class_target((12,), C, device, ignore_index=-100)
    w = make_weight(C, torch.float64, device)
    w[::3] = 0.0
    w[1::5] = -0.7
    check_against_torch(fused_ce, x, t, w, reduction=reduction, label_smoothing=0.1, what="zero/negative weights")
    # every non-ignored target has weight 0: mean is 0/0 = NaN and torch's gradient is NaN too
    w0 = torch.zeros(C, dtype=torch.float64, device=device)
    w0[-1] = 1.0
    t0 = make_class_target((12,), C - 1, device, ignore_index=-100)
    check_against_torch(fused_ce, x, t0, w0, reduction=reduction, what="zero total weight")


def _autocast_case(device):
    if device == "cpu":
        return torch.bfloat16
    return torch.float16


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast(device, reduction, use_weight):
    # Under autocast torch runs cross_entropy in float32 (it is on autocast's fp32 list): a float32
    # loss, and a float32 weight buffer is fine although the logits come out of a matmul in half.
    lp_dtype = _autocast_case(device)
    torch.manual_seed(3)
    C = 70
    lin = torch.nn.Linear(16, C).to(device)
    data = torch.randn(10, 16, device=device)
    t = make_class_target((10,), C, device, ignore_index=-100)
    w = make_weight(C, torch.float32, device) if use_weight else None
    with torch.autocast(device_type=device, dtype=lp_dtype):
        logits = lin(data)
        assert logits.dtype == lp_dtype
        ref = F.cross_entropy(logits, t, weight=w, reduction=reduction, label_smoothing=0.1)
        out = fused_ce.cross_entropy(logits, t, weight=w, reduction=reduction, label_smoothing=0.1)
    assert out.dtype == ref.dtype, f"autocast: fused_ce gives {out.dtype}, torch {ref.dtype}"
    ref64 = F.cross_entropy(logits.detach().double().cpu(), t.cpu(), weight=None if w is None else w.double().cpu(),
                            reduction=reduction, label_smoothing=0.1)
    assert_close_ref(out, ref64, torch.float32, what="autocast loss")
    # gradients into the Linear's parameters agree with torch's autocast run
    go = torch.rand(ref.shape, device=device, dtype=ref.dtype)
    g_ref = torch.autograd.grad(ref, lin.weight, go, retain_graph=True)[0]
    g_out = torch.autograd.grad(out, lin.weight, go)[0]
    torch.testing.assert_close(g_out, g_ref, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_probability_target(device, reduction):
    # Under autocast the class probabilities go to float32 with the logits (cross_entropy is on
    # autocast's fp32 list), whatever their dtype, and so does the loss.
    lp_dtype = _autocast_case(device)
    torch.manual_seed(4)
    C = 33
    lin = torch.nn.Linear(16, C).to(device)
    data = torch.randn(10, 16, device=device)
    target = make_prob_target((10, C), lp_dtype, device)
    with torch.autocast(device_type=device, dtype=lp_dtype):
        logits = lin(data)
        ref = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        out = fused_ce.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    assert out.dtype == ref.dtype == torch.float32
    ref64 = F.cross_entropy(logits.detach().double().cpu(), target.double().cpu(), reduction=reduction,
                            label_smoothing=0.1)
    assert_close_ref(out, ref64, torch.float32, what="autocast loss, probability target")
    go = torch.rand(ref.shape, device=device, dtype=ref.dtype)
    g_ref = torch.autograd.grad(ref, lin.weight, go, retain_graph=True)[0]
    g_out = torch.autograd.grad(out, lin.weight, go)[0]
    torch.testing.assert_close(g_out, g_ref, rtol=2e-2, atol=2e-3)


def test_autocast_module_with_weight_buffer(device):
    lp_dtype = _autocast_case(device)
    C = 8
    m = fused_ce.CrossEntropyLoss(weight=make_weight(C, torch.float32, device))
    lin = torch.nn.Linear(4, C).to(device)
    data = torch.randn(6, 4, device=device)
    t = make_class_target((6,), C, device)
    with torch.autocast(device_type=device, dtype=lp_dtype):
        out = m(lin(data), t)
        ref = torch.nn.CrossEntropyLoss(weight=m.weight)(lin(data), t)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_inference_mode(device):
    x = make_logits((9, 70, 2), torch.float32, device)
    t = make_class_target((9, 2), 70, device, ignore_index=-100)
    with torch.inference_mode():
        for reduction in REDUCTIONS:
            out = fused_ce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.2)
            ref = F.cross_entropy(x.double().cpu(), t.cpu(), reduction=reduction, label_smoothing=0.2)
            assert_close_ref(out, ref, torch.float32, what=f"inference_mode {reduction}", floor=1.0)


@pytest.mark.parametrize("C", [10, 300])
def test_deterministic_across_calls_and_threads(device, C):
    x = make_logits((257, C), torch.float32, device)
    t = make_class_target((257,), C, device, ignore_index=-100)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, max(2, old), 1):
            torch.set_num_threads(threads)
            xl = x.clone().requires_grad_()
            loss = fused_ce.cross_entropy(xl, t, reduction="none", label_smoothing=0.1)
            loss.sum().backward()
            results.append((loss.detach(), xl.grad))
    finally:
        torch.set_num_threads(old)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]), "per-element loss differs between runs / thread counts"
        assert torch.equal(grad, results[0][1]), "gradient differs between runs / thread counts"


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 3), (2, 6, 3, 2)])
@pytest.mark.parametrize("reduction_int,reduction", [(0, "none"), (1, "mean"), (2, "sum")])
def test_cross_entropy_function_apply(device, reduction_int, reduction, shape):
    # The public autograd.Function on batched arguments of any rank.
    C = shape[1]
    x = make_logits(shape, torch.float64, device)
    t = make_class_target((shape[0],) + shape[2:], C, device, ignore_index=1)
    w = make_weight(C, torch.float64, device)
    xl = x.clone().requires_grad_()
    out = fused_ce.CrossEntropyFunction.apply(xl, t, w, 1, 0.1, reduction_int)
    x64 = x.cpu().clone().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), w.cpu(), ignore_index=1, label_smoothing=0.1, reduction=reduction)
    assert out.shape == ref.shape
    assert_close_ref(out, ref, torch.float64, what="CrossEntropyFunction.apply", floor=1.0)
    # The (N, C, D) view is taken inside the Function: the input's gradient
    # comes straight from its node, with no reshape node in between.
    assert out.grad_fn.next_functions[0][0].__class__.__name__ == "AccumulateGrad"
    go = torch.rand(ref.shape, dtype=torch.float64)
    out.backward(go.to(device))
    ref.backward(go)
    assert_close_ref(xl.grad, x64.grad, torch.float64, what="CrossEntropyFunction.apply grad")


def test_cross_entropy_function_apply_soft_targets_and_lse(device):
    N, C, H, W = 2, 5, 3, 2
    x = make_logits((N, C, H, W), torch.float64, device).requires_grad_()
    t = make_prob_target((N, C, H, W), torch.float64, device).requires_grad_()
    loss, lse = fused_ce.CrossEntropyFunction.apply(x, t, None, -100, 0.0, 0, 0.0, 0.0, True)
    assert loss.shape == lse.shape == (N, H, W)
    x64, t64 = x.detach().cpu().requires_grad_(), t.detach().cpu().requires_grad_()
    ref = F.cross_entropy(x64, t64, reduction="none")
    ref_lse = torch.logsumexp(x64, dim=1)
    assert_close_ref(loss, ref, torch.float64, what="soft-target loss", floor=1.0)
    assert_close_ref(lse, ref_lse, torch.float64, what="lse", floor=1.0)
    go, go_lse = torch.rand(N, H, W, dtype=torch.float64), torch.rand(N, H, W, dtype=torch.float64)
    torch.autograd.backward((loss, lse), (go.to(device), go_lse.to(device)))
    torch.autograd.backward((ref, ref_lse), (go, go_lse))
    assert_close_ref(x.grad, x64.grad, torch.float64, what="grad_input")
    assert_close_ref(t.grad, t64.grad, torch.float64, what="grad_target")


def test_cross_entropy_function_inplace_needs_contiguous_input(device):
    x = make_logits((6, 4), torch.float32, device).t().requires_grad_()  # (4, 6), not contiguous
    t = make_class_target((4,), 6, device)
    with pytest.raises(ValueError, match="contiguous"):
        fused_ce.CrossEntropyFunction.apply(x, t, None, -100, 0.0, 1, 0.0, 0.0, False, True)


def test_label_smoothing_as_int_and_tensor_scalar_args(device):
    x = make_logits((5, 4), torch.float64, device)
    t = make_class_target((5,), 4, device)
    for ls in (0, 1):
        out = fused_ce.cross_entropy(x, t, label_smoothing=ls)
        ref = F.cross_entropy(x.cpu(), t.cpu(), label_smoothing=ls)
        assert_close_ref(out, ref, torch.float64, what=f"label_smoothing={ls!r}", floor=1.0)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FUSED_CE_TEST_LARGE") != "1",
                    reason="needs ~9 GB of memory; set FUSED_CE_TEST_LARGE=1 to run")
def test_int64_indexing_beyond_2_31_elements(device):
    # N * C > 2^31: element offsets of the last rows overflow int32 (DESIGN.md: 64-bit indexing)
    C = 32768
    N = (2**31) // C + 3
    x = torch.empty(N, C, dtype=torch.bfloat16, device=device)
    pattern = (torch.arange(C, device=device) % 97).to(torch.bfloat16) * 0.05
    x.copy_(pattern.expand(N, C))
    x[-3:] = make_logits((3, C), torch.bfloat16, device)
    t = torch.zeros(N, dtype=torch.long, device=device)
    t[-3:] = torch.tensor([5, C - 1, 12345], device=device)
    out = fused_ce.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x[-3:].double().cpu(), t[-3:].cpu(), reduction="none")
    assert_close_ref(out[-3:].float(), ref, torch.bfloat16, what="rows past 2^31 elements", floor=1.0)
    ref0 = F.cross_entropy(x[:2].double().cpu(), t[:2].cpu(), reduction="none")
    assert_close_ref(out[:2].float(), ref0, torch.bfloat16, what="first rows", floor=1.0)
    xl = x.requires_grad_()
    loss = fused_ce.cross_entropy(xl, t, reduction="sum")
    (g,) = torch.autograd.grad(loss, xl)
    x64 = x[-3:].detach().double().cpu().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(x64, t[-3:].cpu(), reduction="sum"), x64)
    assert_close_ref(g[-3:], gr, torch.bfloat16, what="grad rows past 2^31 elements")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("C", [5, 70])
def test_channels_last_gradient_layout(device, C, reduction):
    # spec: grad_input is laid out like empty_like(input): a channels_last leaf gets a channels_last
    # gradient (torch itself is not consistent here: with label smoothing it returns a contiguous one)
    x = make_logits((2, C, 3, 4), torch.float32, device).contiguous(memory_format=torch.channels_last)
    t = make_class_target((2, 3, 4), C, device, ignore_index=-100)
    grads = []
    for impl in (F.cross_entropy, fused_ce.cross_entropy):
        xl = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        loss = impl(xl, t, reduction=reduction, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, xl, torch.ones_like(loss))
        grads.append(g)
    ref_g, g = grads
    assert g.is_contiguous(memory_format=torch.channels_last), f"gradient strides {g.stride()}"
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("C", [32000, 50257])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_language_model_vocab_sizes(device, C, dtype):
    # LM-style: few rows, huge odd vocabularies (vector tails), ignore_index padding, smoothing
    x = make_logits((6, C), dtype, device, scale=4.0)
    t = make_class_target((6,), C, device, ignore_index=-100, ignore_frac=0.2)
    check_against_torch(fused_ce, x, t, None, reduction="mean", label_smoothing=0.1, what=f"vocab {C}")
    check_against_torch(fused_ce, x, t, None, reduction="none", what=f"vocab {C} none")


# Long float32 rows that the CPU's row kernel does not take (probability targets, classes not
# contiguous) are summed over their classes by the tile kernel: one running sum per position lost
# about sqrt(C) ulp (2.5e-5 relative at 30000 classes, 2e-4 with full label smoothing, where
# PyTorch's float32 result is within 1e-7). Each case's loss and gradient must be within a few
# times PyTorch's own float32 error, measured on the same inputs against float64.
LONG_SUM_CASES = {
    "probabilities": dict(prob=True, label_smoothing=0.0, strided=False),
    "probabilities, full smoothing": dict(prob=True, label_smoothing=1.0, strided=False),
    "probabilities, classes strided": dict(prob=True, label_smoothing=0.0, strided=True),
    "class indices, classes strided": dict(prob=False, label_smoothing=1.0, strided=True),
}


@pytest.mark.parametrize("case", list(LONG_SUM_CASES))
def test_float32_sums_over_many_classes_keep_pytorchs_accuracy(case):
    spec, N, C = LONG_SUM_CASES[case], 4, 30000
    x = make_logits((N, C), torch.float32, scale=1.0)
    t = make_prob_target((N, C), torch.float32) if spec["prob"] else make_class_target((N,), C)
    if spec["strided"]:
        # (N, C) with class stride N: the transpose of a contiguous (C, N).
        x = x.t().contiguous().t()
        t = t.t().contiguous().t() if spec["prob"] else t
    x.requires_grad_()
    kwargs = dict(label_smoothing=spec["label_smoothing"], reduction="none")
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, t.double() if spec["prob"] else t, **kwargs)
    upstream = torch.rand(N, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream)

    def errors(fn):
        loss = fn(x, t, **kwargs)
        (grad,) = torch.autograd.grad(loss, x, upstream.float())
        return (((loss.double() - ref).abs() / ref.abs()).max().item(),
                (grad.double() - ref_grad).abs().max().item())

    (torch_loss_err, torch_grad_err), (loss_err, grad_err) = errors(F.cross_entropy), errors(fused_ce.cross_entropy)
    eps32 = torch.finfo(torch.float32).eps
    assert loss_err <= 4 * max(torch_loss_err, eps32), f"loss: {loss_err:.1e} relative, PyTorch {torch_loss_err:.1e}"
    assert grad_err <= 4 * max(torch_grad_err, eps32 / C), f"gradient: {grad_err:.1e}, PyTorch {torch_grad_err:.1e}"


# Many rows of 10 classes: the batch's total weight and its loss's sum over every row. On a GPU past
# 2048 rows (4096 losses) each is a sum of per-block partials, or (FUSED_CE_CUDA_WIDE_REDUCTIONS=1)
# one block of 1024 threads up to 65536; past that, partials either way.
@pytest.mark.parametrize("N", [2049, 65536, 65537])
def test_many_rows_of_few_classes(device, N):
    x = make_logits((N, 10), torch.float32, device, scale=4.0)
    t = make_class_target((N,), 10, device, ignore_index=-100, ignore_frac=0.2)
    w = make_weight(10, torch.float32, device)
    check_against_torch(fused_ce, x, t, w, reduction="mean", what=f"{N} rows")
    check_against_torch(fused_ce, x, t, None, reduction="sum", label_smoothing=0.1, what=f"{N} rows, sum")


# Rows that one block of 128 or more threads holds on a GPU, more of them than an H100 or H200 runs
# at once (132 SMs x one or two blocks of 512-1024 threads, 2-3 of 256, 7-9 of 128): a kernel whose
# blocks loop over rows (the prefetching one of FUSED_CE_CUDA_RESIDENT_PREFETCH=1) gives each block
# several, the next staged while the current one is written. Ignored rows, smoothing; class
# weights with sum; a gradient in place.
@pytest.mark.parametrize("N, C, dtype", [(300, 32000, torch.float32), (300, 16001, torch.float32),
                                         (300, 50257, torch.bfloat16), (300, 8000, torch.float64),
                                         (1500, 6000, torch.bfloat16), (3000, 2000, torch.float32)],
                         ids=["fp32-32000", "fp32-16001", "bf16-50257", "fp64-8000", "bf16-6000", "fp32-2000"])
def test_more_long_rows_than_the_gpu_runs_at_once(device, N, C, dtype):
    x = make_logits((N, C), dtype, device, scale=4.0)
    t = make_class_target((N,), C, device, ignore_index=-100, ignore_frac=0.2)
    check_against_torch(fused_ce, x, t, None, reduction="mean", label_smoothing=0.1, what=f"{C} rows")
    w = make_weight(C, dtype, device)
    check_against_torch(fused_ce, x, t, w, reduction="sum", what=f"{C} rows, weights")
    xl = x.detach().clone().requires_grad_()
    fused_ce.cross_entropy(xl, t, inplace_backward=True).backward()
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(x64, t.cpu()), x64)
    assert_close_ref(xl.grad, ref_grad, dtype, what=f"{C} rows: in-place gradient")


# --------------------------------------------------------------------------
# Segmentation layouts (N, C, H, W) with enough pixels for the CPU tile kernel's cache-line groups
# (several tiles of consecutive pixels loaded and stored together): power-of-two and odd pixel
# counts, aligned and misaligned storage, and every option that the grouped path computes.

SEGMENTATION_SPATIAL = [(16, 16), (12, 20), (9, 13)]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset1"])
@pytest.mark.parametrize("spatial", SEGMENTATION_SPATIAL, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", [3, 21])
def test_segmentation_layouts(device, C, dtype, spatial, offset):
    shape = (3, C) + spatial
    numel = math.prod(shape)
    # offset 1: the same layout one element into its storage, so no class run is line-aligned
    storage = make_logits((numel + offset,), dtype, device)
    t = make_class_target((3,) + spatial, C, device, ignore_index=255, ignore_frac=0.1)
    w = make_weight(C, dtype, device)
    for reduction in ("none", "mean"):
        check_against_torch(fused_ce, storage, t, w, reduction=reduction, ignore_index=255,
                            label_smoothing=0.1, view=lambda s: s[offset:].view(shape),
                            what=f"segmentation {shape} offset {offset}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_segmentation_llm_options_and_inplace(dtype):
    # z_loss, softcap and the in-place gradient through the grouped path, against plain PyTorch.
    shape = (2, 5, 16, 32)
    x = make_logits(shape, dtype, "cpu")
    t = make_class_target((2, 16, 32), 5, "cpu", ignore_index=-100, ignore_frac=0.1)
    x64 = x.double().requires_grad_()
    ref, _ = ref_llm(x64, t, z_loss=1e-2, softcap=4.0)
    ref.backward()
    for inplace in (False, True):
        xl = x.clone().requires_grad_()
        leaf = xl
        if inplace:
            xl = xl * 1  # in-place needs a non-leaf it may overwrite
        loss = fused_ce.cross_entropy(xl, t, z_loss=1e-2, softcap=4.0, inplace_backward=inplace)
        loss.backward()
        assert_close_ref(loss, ref.detach(), dtype, what=f"loss inplace={inplace}")
        assert_close_ref(leaf.grad, x64.grad, dtype, what=f"grad inplace={inplace}")


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("layout", TARGET_WALK_LAYOUTS)
def test_mean_denominator_in_every_target_walk(device, layout, with_weight):
    # The mean divides by the summed weights of the kept targets, which the
    # CPU adds up while checking them, block by block and in whichever walk
    # the target's strides allow. float64 makes one weight more or less
    # visible (a relative change of about 1 / 40000).
    C = 6
    t, shape = make_target_in_walk_layout(layout, C, device)
    x = make_logits(shape, torch.float64, device).requires_grad_()
    w = make_weight(C, torch.float64, device) if with_weight else None
    check_against_torch(fused_ce, x, t, w, reduction="mean", what=f"{layout}, weight={with_weight}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("C", [10, 1000], ids=["tile", "row"])
def test_half_gradient_is_the_float32_gradient_rounded_once(dtype, C):
    # The CPU kernels compute half inputs in float32 and round the gradient
    # once, to nearest as c10 does (AVX512_BF16's conversion included). The
    # same logits given as float32 take the same arithmetic but for the
    # exp, which is shorter for half types (relative difference < 7e-6). So
    # the half gradient must be the float32 gradient rounded, except for the
    # few elements whose value lies that close to a rounding boundary, and
    # those by one step. A truncating or twice-rounding conversion differs
    # in about half of the elements, which the tolerance of the parity tests
    # would let through. (Where the gradient's terms g p_c and g eps / C
    # nearly cancel, the exp's difference is magnified and may take more
    # steps: it is small next to the terms, not next to their difference.)
    eps = 0.1
    x = make_logits((67, C), dtype, "cpu")
    t = make_class_target((67,), C, "cpu", ignore_index=-100, ignore_frac=0.1)
    grads = []
    for logits in (x, x.float()):
        logits = logits.clone().requires_grad_()
        fused_ce.cross_entropy(logits, t, label_smoothing=eps).backward()
        grads.append(logits.grad)
    half_grad, float_grad = grads
    assert half_grad.dtype == dtype
    rounded = float_grad.to(dtype)
    differ = half_grad != rounded
    assert differ.float().mean().item() < 0.01, f"{differ.sum().item()} of {differ.numel()} differ"
    steps = (half_grad.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
    kept = t != -100
    g = kept.double() / kept.sum()
    terms = g[:, None] * (torch.softmax(x.double(), 1) + eps / C)
    cancelling = float_grad.double().abs() < 1e-3 * terms
    assert ((steps <= 1) | cancelling).all(), f"{steps[~cancelling].max().item()} steps"


@pytest.mark.parametrize("shift", [0.0, 7.3, -123.4, 1000.3])
@pytest.mark.parametrize("C", [2, 1000], ids=["tile", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_loss_of_a_certain_prediction(device, dtype, C, shift):
    # The target's logit 40 above every other: the exact loss is below 1e-14, PyTorch's 0. The
    # shorter exp of half types must not bias it (it gave 2.6e-6 in bfloat16 and -6e-8, a negative
    # cross-entropy, in float16): between 0 and a few float32 ulp of 1 (the losses are rounded to
    # the logits' dtype, which holds both).
    x = torch.full((5, C), shift - 40.0, dtype=torch.float64)
    t = torch.randint(0, C, (5,))
    x[torch.arange(5), t] = shift
    loss = fused_ce.cross_entropy(x.to(dtype).to(device), t.to(device), reduction="none").float()
    assert ((loss >= 0) & (loss <= 2.5e-7)).all(), loss.tolist()


# --------------------------------------------------------------------------
# Rows shorter than a SIMD vector, in every dtype: with AVX-512 each row is one masked load and
# store, and the batch sizes leave a partial tile whose last row ends the tensor.

@pytest.mark.parametrize("N", [1, 17, 45])
@pytest.mark.parametrize("C", [1, 3, 7, 10, 15])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_rows_shorter_than_a_vector(device, dtype, C, N):
    x = make_logits((N, C), dtype, device)
    check_against_torch(fused_ce, x, make_class_target((N,), C, device), label_smoothing=0.1,
                        what=f"class targets {N}x{C}")
    x = make_logits((N, C), dtype, device)
    check_against_torch(fused_ce, x, make_prob_target((N, C), dtype, device), target_grad=True,
                        what=f"probability targets {N}x{C}")
