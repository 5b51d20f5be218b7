"""Bad inputs raise what torch raises: same exception type, message containing torch's key words.

Each case runs torch's F.cross_entropy first (so the expectation is re-derived from the installed
torch, not hard-coded) and then fused_ce.cross_entropy; after every error the library must still
produce correct results.
"""

import itertools
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_ce
from conftest import (
    TARGET_WALK_LAYOUTS,
    assert_close_ref,
    make_class_target,
    make_logits,
    make_prob_target,
    make_target_in_walk_layout,
    make_weight,
    outcome,
    unbatched_reference_target,
)


def _capture(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _still_works(device):
    x = make_logits((6, 5), torch.float32, device)
    t = make_class_target((6,), 5, device, ignore_index=-100)
    xl = x.clone().requires_grad_()
    out = fused_ce.cross_entropy(xl, t, label_smoothing=0.1)
    out.backward()
    x64 = x.double().cpu().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), label_smoothing=0.1)
    ref.backward()
    assert_close_ref(out, ref, torch.float32, what="call after an error")
    assert_close_ref(xl.grad, x64.grad, torch.float32, what="grad after an error")


def _check_same_error(device, make_args, keywords, exc_type=None, torch_raises=True, torch_device=None):
    """make_args(device) -> (args, kwargs) for cross_entropy. keywords: substrings/regexes of the message.
    torch_device: where torch's own error is taken from when it is not ``device`` (torch's messages
    differ between backends, and fused_ce gives the clearer one everywhere)."""
    args, kwargs = make_args(torch_device or device)
    torch_exc = _capture(lambda: F.cross_entropy(*args, **kwargs))
    if torch_raises:
        assert torch_exc is not None, "test premise broken: torch accepted these arguments"
        expected_type = exc_type or type(torch_exc)
        for kw in keywords:  # the key words come from torch's own message
            assert re.search(kw, str(torch_exc)), f"premise: {kw!r} not in torch's message {str(torch_exc)!r}"
    else:
        expected_type = exc_type
    args, kwargs = make_args(device)
    ours = _capture(lambda: fused_ce.cross_entropy(*args, **kwargs))
    assert ours is not None, f"fused_ce accepted arguments torch rejects with {torch_exc!r}"
    assert isinstance(ours, expected_type), (
        f"fused_ce raised {type(ours).__name__}({ours}), torch raises {type(torch_exc).__name__}({torch_exc})")
    for kw in keywords:
        assert re.search(kw, str(ours)), f"{kw!r} not in fused_ce's message {str(ours)!r} (torch: {str(torch_exc)!r})"
    _still_works(device)


# Out-of-range targets are detected on the host only on the CPU; on CUDA the
# kernels assert on the device (test_cuda_out_of_range_target_asserts_on_the_device)
# or validate=True checks first. These tests take the CPU in place of the
# device fixture's two devices.
on_the_cpu_only = pytest.mark.parametrize("device", ["cpu"])


# --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["C", "C+2", -1, -101])
@pytest.mark.parametrize("kind", ["2d", "kdim", "rowkernel", "reduction_none", "smoothing", "weight", "unbatched"])
@on_the_cpu_only
def test_target_out_of_bounds(device, kind, bad):
    C = 70 if kind == "rowkernel" else 5
    value = {"C": C, "C+2": C + 2}.get(bad, bad)

    def make(dev):
        if kind == "unbatched":
            return (make_logits((C,), device=dev), torch.tensor(value, device=dev)), {}
        shape = (4, C, 3) if kind == "kdim" else (4, C)
        t = make_class_target((4, 3) if kind == "kdim" else (4,), C, dev)
        t.view(-1)[-1] = value
        kw = {}
        if kind == "reduction_none":
            kw["reduction"] = "none"
        if kind == "smoothing":
            kw["label_smoothing"] = 0.1
        if kind == "weight":
            kw["weight"] = make_weight(C, device=dev)
        return (make_logits(shape, device=dev), t), kw

    _check_same_error(device, make, [rf"Target {value} is out of bounds"], IndexError)


@on_the_cpu_only
def test_target_out_of_bounds_with_grad(device):
    x = make_logits((4, 5), device=device).requires_grad_()
    t = torch.tensor([0, 1, 9, 2], device=device)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        fused_ce.cross_entropy(x, t)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        fused_ce.cross_entropy(x, t, reduction="none")
    _still_works(device)


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("position", ["first", "middle_block", "last"])
@pytest.mark.parametrize("layout", TARGET_WALK_LAYOUTS)
@on_the_cpu_only
def test_target_out_of_bounds_in_every_walk(device, layout, position, with_weight):
    C = 6

    def make(dev):
        t, shape = make_target_in_walk_layout(layout, C, dev)
        flat_index = {"first": 0, "middle_block": 20000, "last": t.numel() - 1}[position]
        t[(flat_index // t.shape[1], flat_index % t.shape[1]) if t.dim() == 2 else flat_index] = C + 3
        kw = {"weight": make_weight(C, device=dev)} if with_weight else {}
        return (make_logits(shape, device=dev), t), kw

    _check_same_error(device, make, [rf"Target {C + 3} is out of bounds"], IndexError)


def _TARGET_DTYPE_MESSAGE(name):
    """The key words of torch's message for a class-index target of dtype ``name``, in the
    wording of torch 2.13 ("expected target dtype to be Long or Byte, but got Int") and of
    the torch releases before it ("expected scalar type Long but found Int")."""
    return [r"expected (target dtype to be|scalar type) Long", rf"(got|found) {name}"]


@pytest.mark.parametrize("tdtype,name", [(torch.int32, "Int"), (torch.int16, "Short"), (torch.int8, "Char"),
                                         (torch.bool, "Bool")])
def test_target_integer_dtype(device, tdtype, name):
    def make(dev):
        return (make_logits((3, 5), device=dev), torch.tensor([0, 1, 2], device=dev).to(tdtype)), {}

    # torch's CUDA message names a kernel ("nll_loss_forward_reduce_cuda_kernel_2d_index" not
    # implemented for 'Int'); its CPU one names the problem, and fused_ce gives that on every device
    # (torch 2.13's wording; before, torch said "expected scalar type Long but found Int").
    _check_same_error(device, make, _TARGET_DTYPE_MESSAGE(name), torch_device="cpu")


def test_float_class_index_target(device):
    # a float target with the shape of a class-index target is not a probability target
    def make(dev):
        return (make_logits((3, 5), device=dev), torch.tensor([0.0, 1.0, 2.0], device=dev)), {}

    _check_same_error(device, make, _TARGET_DTYPE_MESSAGE("Float"), torch_device="cpu")


@pytest.mark.parametrize("tdtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_target_with_the_input_shape(device, tdtype):
    # a target with the input's shape holds class probabilities, so it must be floating point
    def make(dev):
        return (make_logits((3, 5), device=dev), torch.randint(0, 2, (3, 5), device=dev).to(tdtype)), {}

    name = {torch.int64: "Long", torch.uint8: "Byte", torch.bool: "Bool"}[tdtype]
    _check_same_error(device, make, [f"^Expected floating point type for target with class probabilities, got {name}$"],
                      RuntimeError)


@pytest.mark.parametrize("red", ["foo", "avg", "Mean", ""])
def test_bad_reduction(device, red):
    def make(dev):
        return (make_logits((3, 5), device=dev), make_class_target((3,), 5, dev)), {"reduction": red}

    _check_same_error(device, make, [rf"{re.escape(red)} is not a valid value for reduction"], ValueError)


def test_batch_size_mismatch(device):
    def make(dev):
        return (make_logits((4, 5), device=dev), make_class_target((3,), 5, dev)), {}

    _check_same_error(device, make, [re.escape("Expected input batch_size (4) to match target batch_size (3).")],
                      ValueError)


def test_batch_size_mismatch_kdim(device):
    def make(dev):
        return (make_logits((4, 5, 2), device=dev), make_class_target((3, 2), 5, dev)), {}

    _check_same_error(device, make, [re.escape("Expected input batch_size (4) to match target batch_size (3).")],
                      ValueError)


def test_spatial_shape_mismatch(device):
    def make(dev):
        return (make_logits((3, 5, 2), device=dev), make_class_target((3, 3), 5, dev)), {}

    _check_same_error(device, make, [re.escape("Expected target size [3, 2], got [3, 3]")], RuntimeError)


def test_multi_target_2d(device):
    # (N, C) input with a (N, k) integer target: torch: "0D or 1D target tensor expected, multi-target not supported"
    def make(dev):
        return (make_logits((3, 5), device=dev), make_class_target((3, 1), 5, dev)), {}

    _check_same_error(device, make, [r"multi-target not supported"], RuntimeError)


@pytest.mark.parametrize("shapes", [((3, 5), (3, 4)), ((6, 5), (5,)), ((6, 5, 2), (6, 5, 3)), ((6, 5, 2), (6, 3))],
                         ids=lambda s: f"{s[0]}-{s[1]}")
def test_float_target_wrong_shape(device, shapes):
    # A floating target whose shape differs from the input's takes the
    # class-index path, where PyTorch checks the shape before the dtype: its
    # shape error (of whichever type), not the dtype's.
    input_shape, target_shape = shapes

    def make(dev):
        return (make_logits(input_shape, device=dev), make_prob_target(target_shape, device=dev)), {}

    args, _ = make("cpu")
    message = str(_capture(lambda: F.cross_entropy(*args))).splitlines()[0]
    assert "dtype" not in message, "test premise broken: torch reports the dtype first"
    _check_same_error(device, make, [re.escape(message)])


@pytest.mark.parametrize("wshape", [(4,), (6,), (5, 1), (1, 5), ()])
def test_weight_wrong_shape(device, wshape):
    def make(dev):
        return (make_logits((3, 5), device=dev), make_class_target((3,), 5, dev)), {"weight": torch.rand(wshape, device=dev)}

    _check_same_error(device, make, [r"weight tensor should be defined either for all 5 classes or no classes"],
                      RuntimeError)


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("in_dtype,w_dtype,names", [
    (torch.float32, torch.float64, ("Float", "Double")),
    (torch.float64, torch.float32, ("Double", "Float")),
    (torch.float16, torch.float32, ("Half", "Float")),
    (torch.bfloat16, torch.float32, ("BFloat16", "Float")),
])
def test_weight_dtype_mismatch(device, in_dtype, w_dtype, names, reduction):
    def make(dev):
        return (make_logits((3, 5), in_dtype, dev), make_class_target((3,), 5, dev)), \
            {"weight": make_weight(5, w_dtype, dev), "reduction": reduction}

    _check_same_error(device, make, [rf"expected scalar type {names[0]} but found {names[1]}"], RuntimeError)


@pytest.mark.parametrize("ls", [1.5, 1.0000001, 2.0, float("inf"), float("nan")])
def test_label_smoothing_above_one(device, ls):
    def make(dev):
        return (make_logits((3, 5), device=dev), make_class_target((3,), 5, dev)), {"label_smoothing": ls}

    args, kwargs = make(device)
    torch_exc = _capture(lambda: F.cross_entropy(*args, **kwargs))
    ours = _capture(lambda: fused_ce.cross_entropy(*args, **kwargs))
    if torch_exc is None:
        # torch accepts it (e.g. NaN compares false); the spec does not require rejecting it, only parity
        assert ours is None or isinstance(ours, RuntimeError)
    else:
        assert isinstance(ours, RuntimeError), f"fused raised {ours!r}, torch {torch_exc!r}"
        assert "label_smoothing must be between 0.0 and 1.0" in str(ours)
        if ls == 1.5:
            assert "Got: 1.5" in str(ours)
    _still_works(device)


@pytest.mark.parametrize("ls", [-0.5, -1e-3])
def test_label_smoothing_negative_rejected(device, ls):
    # deliberate deviation (spec): torch accepts negative smoothing, fused_ce rejects it
    x = make_logits((3, 5), device=device)
    t = make_class_target((3,), 5, device)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
        fused_ce.cross_entropy(x, t, label_smoothing=ls)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0 and 1\.0"):
        fused_ce.CrossEntropyLoss(label_smoothing=ls)(x, t)
    _still_works(device)


BAD_ARGUMENT_TYPES = [
    ("ignore_index", -100.0, "int", "float"),
    ("ignore_index", 2.5, "int", "float"),
    ("ignore_index", True, "int", "bool"),
    ("ignore_index", None, "int", "NoneType"),
    ("ignore_index", np.float64(2.0), "int", "numpy.float64"),
    ("label_smoothing", "0.1", "float", "str"),
    ("label_smoothing", None, "float", "NoneType"),
    ("label_smoothing", [0.1], "float", "list"),
    ("label_smoothing", torch.tensor(0.1, requires_grad=True), "float", "Tensor"),
    ("label_smoothing", torch.tensor([0.1, 0.2]), "float", "Tensor"),
    ("weight", [1.0, 2.0, 3.0, 4.0, 5.0], "Tensor", "list"),
    ("weight", (1.0, 2.0, 3.0, 4.0, 5.0), "Tensor", "tuple"),
]


@pytest.mark.parametrize("name,value,wanted,given", BAD_ARGUMENT_TYPES,
                         ids=[f"{c[0]}-{c[3]}" for c in BAD_ARGUMENT_TYPES])
def test_argument_of_the_wrong_type(device, name, value, wanted, given):
    # PyTorch's argument parser rejects these with a TypeError (a float
    # ignore_index is not rounded, a string is not parsed).
    def make(dev):
        return (make_logits((3, 5), device=dev), make_class_target((3,), 5, dev)), {name: value}

    _check_same_error(device, make, [re.escape(f"argument '{name}' (position "), f"must be {wanted}, not {given}"],
                      TypeError)


# Two bad arguments at once: PyTorch reports the reduction first (F.cross_entropy converts it before
# the call), then the first bad argument in the order of aten::cross_entropy_loss's parameters.
TWO_BAD_ARGUMENTS = {
    "input and ignore_index": (lambda x, t: (([1.0, 2.0], t), {"ignore_index": "i"})),
    "target and weight": (lambda x, t: ((x, [0, 1, 2]), {"weight": "w"})),
    "weight and ignore_index": (lambda x, t: ((x, t), {"weight": "w", "ignore_index": "i"})),
    "ignore_index and label_smoothing": (lambda x, t: ((x, t), {"ignore_index": 1.5, "label_smoothing": "s"})),
    "weight and label_smoothing's range": (lambda x, t: ((x, t), {"weight": "w", "label_smoothing": 2.0})),
    "input and reduction": (lambda x, t: ((x.tolist(), t), {"reduction": "bogus"})),
}


@pytest.mark.parametrize("case", sorted(TWO_BAD_ARGUMENTS))
def test_the_first_of_two_bad_arguments_is_reported(device, case):
    def make(dev):
        return TWO_BAD_ARGUMENTS[case](make_logits((3, 5), device=dev), make_class_target((3,), 5, dev))

    args, kwargs = make("cpu")
    torch_message = str(_capture(lambda: F.cross_entropy(*args, **kwargs)))
    _check_same_error(device, make, ["^" + re.escape(torch_message) + "$"])


ACCEPTED_ARGUMENT_FORMS = [
    ("ignore_index", np.int64(2)),
    ("ignore_index", torch.tensor(2)),
    ("ignore_index", torch.tensor([2])),
    ("label_smoothing", True),
    ("label_smoothing", np.float32(0.25)),
    ("label_smoothing", torch.tensor(0.25)),
    ("reduction", "elementwise_mean"),
]


@pytest.mark.parametrize("name,value", ACCEPTED_ARGUMENT_FORMS,
                         ids=[f"{c[0]}-{type(c[1]).__name__}" for c in ACCEPTED_ARGUMENT_FORMS])
def test_argument_forms_that_pytorch_accepts(device, name, value):
    # ...and takes these as the ints and floats they stand for ("elementwise_mean"
    # is the deprecated name of "mean", with PyTorch's warning).
    x = make_logits((6, 5), device=device)
    t = torch.tensor([2, 0, 2, 1, 4, 2], device=device)
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        ref = F.cross_entropy(x.double().cpu(), t.cpu(), **{name: value})
    with warnings.catch_warnings(record=True) as our_warnings:
        warnings.simplefilter("always")
        ours = fused_ce.cross_entropy(x, t, **{name: value})
    assert_close_ref(ours, ref, torch.float32, what=f"{name}={value!r}")
    assert [str(w.message) for w in our_warnings] == [str(w.message) for w in torch_warnings]


@pytest.mark.parametrize("ignore_index", [0, 1, 4, 255])
def test_ignore_index_with_prob_target(device, ignore_index):
    def make(dev):
        return (make_logits((3, 5), device=dev), make_prob_target((3, 5), device=dev)), {"ignore_index": ignore_index}

    _check_same_error(device, make, [r"ignore_index is not supported for floating point target"], RuntimeError)


@pytest.mark.parametrize("ignore_index", [-1, -5, -1000])
def test_negative_ignore_index_with_prob_target_accepted(device, ignore_index):
    # torch only rejects ignore_index >= 0 for probability targets (TORCH_CHECK(ignore_index < 0)); any
    # negative value is accepted and has no effect.
    x = make_logits((3, 5), device=device)
    t = make_prob_target((3, 5), device=device)
    ref = F.cross_entropy(x.double().cpu(), t.double().cpu(), ignore_index=ignore_index)
    ours = fused_ce.cross_entropy(x, t, ignore_index=ignore_index)
    assert_close_ref(ours, ref, torch.float32, what=f"soft target, ignore_index={ignore_index}")


@pytest.mark.parametrize("in_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input(device, in_dtype):
    # torch raises NotImplementedError (a RuntimeError subclass); the spec promises a RuntimeError
    def make(dev):
        return (torch.randint(0, 2, (3, 5), device=dev).to(in_dtype), make_class_target((3,), 5, dev)), {}

    _check_same_error(device, make, [], RuntimeError)


def test_complex_input(device):
    def make(dev):
        return (torch.randn(3, 5, dtype=torch.complex64, device=dev), make_class_target((3,), 5, dev)), {}

    _check_same_error(device, make, [], RuntimeError)


def test_zero_dim_input(device):
    def make(dev):
        return (torch.tensor(0.5, device=dev), torch.tensor(0, device=dev)), {}

    _check_same_error(device, make, [], RuntimeError)


def test_unbatched_target_with_batch_dim_of_two(device):
    # (C,) input with a (2,) target: torch rejects
    def make(dev):
        return (make_logits((5,), device=dev), torch.tensor([0, 1], device=dev)), {}

    args, kwargs = make(device)
    torch_exc = _capture(lambda: F.cross_entropy(*args, **kwargs))
    ours = _capture(lambda: fused_ce.cross_entropy(*args, **kwargs))
    assert torch_exc is not None
    assert ours is not None and isinstance(ours, (RuntimeError, ValueError)), repr(ours)
    _still_works(device)


UNBATCHED_TARGETS = {
    "float (3,)": lambda dev: torch.rand(3, device=dev),
    "int64 (3,)": lambda dev: torch.tensor([0, 1, 2], device=dev),
    "int64 (0,)": lambda dev: torch.zeros(0, dtype=torch.long, device=dev),
    "float (2, 5)": lambda dev: torch.rand(2, 5, device=dev),
    "int64 (2, 3)": lambda dev: torch.zeros(2, 3, dtype=torch.long, device=dev),
    "int64 (1, 1)": lambda dev: torch.zeros(1, 1, dtype=torch.long, device=dev),
    "int32 (3,)": lambda dev: torch.zeros(3, dtype=torch.int32, device=dev),
}


@pytest.mark.parametrize("target", list(UNBATCHED_TARGETS))
def test_unbatched_target_errors_in_pytorch_order(device, target):
    # A (C,) input: a target of more than one dimension is a shape error, then
    # the dtype is checked, then the size of a 1-D target (PyTorch's order,
    # which decides which of its messages a wrong target gets).
    def make(dev):
        return (make_logits((5,), device=dev), UNBATCHED_TARGETS[target](dev)), {}

    args, _ = make("cpu")
    message = str(_capture(lambda: F.cross_entropy(*args))).splitlines()[0]
    _check_same_error(device, make, [re.escape(message)], torch_device="cpu")


SPATIAL_TARGETS = {
    "long (2, 2, 3)": lambda dev: torch.zeros(2, 2, 3, dtype=torch.long, device=dev),
    "long (2, 3, 3)": lambda dev: torch.zeros(2, 3, 3, dtype=torch.long, device=dev),
    "long (2, 2)": lambda dev: torch.zeros(2, 2, dtype=torch.long, device=dev),
    "long (2, 2, 2, 1)": lambda dev: torch.zeros(2, 2, 2, 1, dtype=torch.long, device=dev),
    "float (2, 2, 3)": lambda dev: torch.rand(2, 2, 3, device=dev),
    "float (2, 2)": lambda dev: torch.rand(2, 2, device=dev),
    "int32 (2, 3, 3)": lambda dev: torch.zeros(2, 3, 3, dtype=torch.int32, device=dev),
    "long (3, 2, 2)": lambda dev: torch.zeros(3, 2, 2, dtype=torch.long, device=dev),
}


@pytest.mark.parametrize("target", list(SPATIAL_TARGETS))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_spatial_target_errors_in_pytorch_order(device, target, label_smoothing):
    # An (N, C, H, W) input takes PyTorch's nll_loss2d path, with its own order
    # (batch, dimensions, then dtype and spatial size in the installed torch's
    # order: test_target_size_and_dtype_order_of_older_torch) and words.
    def make(dev):
        return (make_logits((2, 5, 2, 2), device=dev), SPATIAL_TARGETS[target](dev)), \
            {"label_smoothing": label_smoothing}

    args, kwargs = make("cpu")
    message = str(_capture(lambda: F.cross_entropy(*args, **kwargs))).splitlines()[0]
    _check_same_error(device, make, [re.escape(message)], torch_device="cpu")


def test_target_size_and_dtype_order_of_older_torch(monkeypatch):
    # torch 2.11 reports the size of an unbatched input's 1-D target, or of an
    # (N, C, H, W) input's target, before its dtype; 2.13 the dtype first;
    # 2.4-2.5 the size first too, an unbatched input's in nll_loss's words.
    # fused_ce asks the installed torch which (the two tests above compare
    # with it). Every generation, whichever torch runs this:
    import fused_ce.functional as functional

    x, t = make_logits((5,)), torch.rand(3)
    torch_error = str(_capture(lambda: F.cross_entropy(x, t)))
    assert functional._torch_checks_target_dtype_first() == ("dtype" in torch_error)
    assert functional._unbatched_size_as_mismatch == torch_error.startswith("size mismatch")
    x4, t4 = make_logits((2, 5, 2, 2)), torch.zeros(2, 3, 3, dtype=torch.int32)
    size_4d = re.escape("size mismatch (got input: [2, 5, 2, 2] , target: [2, 3, 3]")
    unbatched_sizes = {False: (ValueError, "1D target must have size 1, but got target size: 3"),
                       True: (RuntimeError, re.escape("size mismatch (got input: [5], target: [3])"))}
    for dtype_first, as_mismatch in ((True, False), (False, False), (False, True)):
        monkeypatch.setattr(functional, "_target_dtype_first", dtype_first)
        monkeypatch.setattr(functional, "_unbatched_size_as_mismatch", as_mismatch)
        size_type, size_message = unbatched_sizes[as_mismatch]
        if dtype_first:
            with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Float"):
                fused_ce.cross_entropy(x, t)
            with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte, but got Int"):
                fused_ce.cross_entropy(x4, t4)
        else:
            with pytest.raises(size_type, match=size_message):
                fused_ce.cross_entropy(x, t)
            with pytest.raises(RuntimeError, match=size_4d):
                fused_ce.cross_entropy(x4, t4)
        # A size fault alone is one whatever the order.
        with pytest.raises(size_type, match=size_message):
            fused_ce.cross_entropy(x, torch.tensor([0, 1, 2]))
        with pytest.raises(RuntimeError, match=size_4d):
            fused_ce.cross_entropy(x4, t4.long())


@pytest.mark.parametrize("weight_shape", [(1, 5), (5, 1)])
@pytest.mark.parametrize("input_shape", [(3, 5, 4), (2, 5, 3, 3)], ids=["3d", "4d"])
def test_k_dimensional_input_takes_a_weight_of_c_elements_in_any_shape(device, input_shape, weight_shape):
    # PyTorch's K-dimensional path checks the weight's element count only; with
    # label smoothing (another path) both refuse it.
    x = make_logits(input_shape, device=device)
    t = make_class_target((input_shape[0],) + input_shape[2:], 5, device, ignore_index=-100)
    w = torch.rand(weight_shape, device=device) + 0.1
    for reduction in ("mean", "sum"):
        ref = F.cross_entropy(x.double().cpu(), t.cpu(), weight=w.double().cpu(), reduction=reduction)
        ours = fused_ce.cross_entropy(x, t, weight=w, reduction=reduction)
        assert_close_ref(ours, ref, torch.float32, what=f"weight {weight_shape}, {reduction}")
    assert _capture(lambda: F.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu(), label_smoothing=0.1)) is not None
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        fused_ce.cross_entropy(x, t, weight=w, label_smoothing=0.1)


def test_class_target_with_requires_grad_weight(device):
    # torch: "The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'."
    def make(dev):
        return (make_logits((3, 5), device=dev).requires_grad_(), make_class_target((3,), 5, dev)), \
            {"weight": make_weight(5, device=dev).requires_grad_()}

    _check_same_error(device, make, [r"not differentiable with respect to argument 'weight'"], RuntimeError)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_prob_target_with_requires_grad_weight_gets_pytorchs_gradients(device, reduction, label_smoothing):
    # PyTorch differentiates the loss of probability targets with respect to the class weights
    # (built from torch operations here, the kernels giving no weight gradient): the loss and the
    # gradients of logits, targets and weights, against float64.
    C = 5
    x = make_logits((3, C, 2), device=device).requires_grad_()
    t = make_prob_target((3, C, 2), device=device).requires_grad_()
    w = make_weight(C, device=device).requires_grad_()
    upstream = torch.rand((3, 2) if reduction == "none" else (), dtype=torch.float64)
    leaves64 = [v.detach().double().cpu().requires_grad_() for v in (x, t, w)]
    ref = F.cross_entropy(*leaves64[:2], weight=leaves64[2], reduction=reduction, label_smoothing=label_smoothing)
    ref_grads = torch.autograd.grad(ref, leaves64, upstream)
    out = fused_ce.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(out, (x, t, w), upstream.to(out.dtype).to(device))
    assert_close_ref(out, ref, torch.float32, what="loss", floor=1.0)
    for name, g, r in zip(("logits", "target", "weight"), grads, ref_grads):
        assert_close_ref(g, r, torch.float32, what=f"gradient of the {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
def test_device_mismatch():
    x = make_logits((3, 5), device="cuda")
    with pytest.raises(RuntimeError):
        fused_ce.cross_entropy(x, make_class_target((3,), 5, "cpu"))
    with pytest.raises(RuntimeError):
        fused_ce.cross_entropy(x, make_class_target((3,), 5, "cuda"), weight=make_weight(5, device="cpu"))
    with pytest.raises(RuntimeError):
        fused_ce.cross_entropy(x.cpu(), make_class_target((3,), 5, "cuda"))
    _still_works("cuda")


def test_module_errors_match_functional(device):
    x = make_logits((4, 5), device=device)
    t = make_class_target((3,), 5, device)
    with pytest.raises(ValueError, match=re.escape("Expected input batch_size (4) to match target batch_size (3).")):
        fused_ce.CrossEntropyLoss()(x, t)
    with pytest.raises(RuntimeError, match="weight tensor should be defined either for all 5 classes"):
        fused_ce.CrossEntropyLoss(weight=torch.rand(3, device=device))(x, make_class_target((4,), 5, device))
    m = fused_ce.CrossEntropyLoss(reduction="bogus")  # torch also only complains at call time
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        m(x, make_class_target((4,), 5, device))
    _still_works(device)


def test_legacy_args_warn_like_torch(device):
    x = make_logits((4, 5), device=device)
    t = make_class_target((4,), 5, device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fused_ce.cross_entropy(x, t, size_average=False)
    assert any("size_average and reduce args will be deprecated" in str(w.message) for w in rec)


# --------------------------------------------------------------------------
# Inputs torch accepts (quirks): fused_ce must accept them as well and agree.


def test_uint8_kdim_targets(device):
    # torch rejects uint8 targets for K-dim inputs ("expected scalar type Long but found Byte"), although
    # it accepts them for (N, C). Accepting them (with int64 semantics) is an improvement we allow.
    x = make_logits((3, 5, 2), device=device)
    t = make_class_target((3, 2), 5, device, dtype=torch.uint8)
    ours = _capture(lambda: fused_ce.cross_entropy(x, t))
    if ours is None:
        out = fused_ce.cross_entropy(x, t, reduction="none")
        ref = F.cross_entropy(x.double().cpu(), t.long().cpu(), reduction="none")
        assert_close_ref(out, ref, torch.float32, what="uint8 K-dim targets")
    else:
        assert isinstance(ours, RuntimeError)


def test_unbatched_input_with_one_element_target(device):
    # torch accepts a (C,) input with a (1,) class-index target (returns a 0-d loss; before 2.11
    # it refused it: conftest.unbatched_reference_target)
    x = make_logits((5,), device=device)
    t = torch.tensor([3], device=device)
    for reduction in ("none", "mean", "sum"):
        ref = F.cross_entropy(x.double().cpu(), unbatched_reference_target(t.cpu()), reduction=reduction)
        out = fused_ce.cross_entropy(x, t, reduction=reduction)
        assert_close_ref(out, ref, torch.float32, what=f"(C,) input with (1,) target, {reduction}")


# --------------------------------------------------------------------------
# validate=True: the host-side target check (opt-in; it synchronises on CUDA).


@pytest.mark.parametrize("bad", ["C", "C+2", -1, -101])
@pytest.mark.parametrize("kind", ["2d", "kdim", "unbatched", "module"])
def test_validate_reports_out_of_range_targets(device, kind, bad):
    # PyTorch's CPU error on every device, before any kernel runs (CUDA would assert instead)
    C = 5
    value = {"C": C, "C+2": C + 2}.get(bad, bad)
    if kind == "unbatched":
        x, t = make_logits((C,), device=device), torch.tensor(value, device=device)
    else:
        shape, tshape = ((4, C, 3), (4, 3)) if kind == "kdim" else ((4, C), (4,))
        x, t = make_logits(shape, device=device), make_class_target(tshape, C, device, ignore_index=-100)
        t.view(-1)[1] = value
    loss = fused_ce.CrossEntropyLoss(validate=True) if kind == "module" else None
    with pytest.raises(IndexError, match=rf"Target {value} is out of bounds"):
        if loss is not None:
            loss(x, t)
        else:
            fused_ce.cross_entropy(x, t, validate=True)
    _still_works(device)


def test_validate_accepts_valid_targets(device):
    # ignore_index anywhere (inside [0, C) too) and every class: the usual results
    x = make_logits((40, 6), torch.float64, device)
    for ignore_index in (-100, 3):
        t = make_class_target((40,), 6, device, ignore_index=ignore_index)
        out = fused_ce.cross_entropy(x, t, ignore_index=ignore_index, validate=True, reduction="none")
        ref = F.cross_entropy(x.cpu(), t.cpu(), ignore_index=ignore_index, reduction="none")
        assert_close_ref(out, ref, torch.float64, what=f"validate=True, ignore_index={ignore_index}", floor=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
def test_cuda_out_of_range_target_asserts_on_the_device():
    # Without validate, an out-of-range target on CUDA is a device-side assertion (as in PyTorch):
    # the process gets an error, not a crash or a silent result. Run apart: it ruins the CUDA context.
    code = (
        "import torch, fused_ce\n"
        "x = torch.randn(64, 7, device='cuda')\n"
        "t = torch.zeros(64, dtype=torch.long, device='cuda'); t[5] = 9\n"
        "try:\n"
        "    fused_ce.cross_entropy(x, t).item()\n"
        "    print('NO ERROR')\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, str(e).splitlines()[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR" in proc.stdout and "assert" in proc.stdout.lower(), proc.stdout + proc.stderr[-2000:]


def test_validate_check_itself(device):
    # the host-side check that validate=True adds (on the CPU the operator would catch these too)
    from fused_ce.functional import _check_targets_in_range

    t = torch.tensor([[0, 4, -100], [3, 2, 1]], device=device)
    _check_targets_in_range(t, 5, -100)  # all valid
    for value, ignore_index in ((5, -100), (-1, -100), (-100, 2)):
        bad = t.clone()
        bad[1, 1] = value
        with pytest.raises(IndexError, match=rf"^Target {value} is out of bounds\.$"):
            _check_targets_in_range(bad, 5, ignore_index)


def _rows_4x5(device):
    """The canonical (N, C, D) = (4, 5, 1) arguments of a direct operator call."""
    return make_logits((4, 5, 1), torch.float32, device), make_class_target((4, 1), 5, device)


# Direct calls of the operators with one bad argument each, and the whole first line of the error.
# The messages carry integers, shapes and floating point numbers, which the extension formats
# itself (csrc/error_message.h): on the GPU machine every message that std::ostream had to format
# a number for crashed the process instead of raising. Each expectation is what c10's stream would
# print; the CPU and CUDA bindings word some checks differently.
_OPERATOR_ERRORS = {
    "weight of 4 for 5 classes": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t, torch.ones(4, device=x.device),
                                                              -100, 0.0, 0.0, 0.0),
        {"cpu": "fused_ce: weight must have shape (5), got [4]",
         "cuda": "weight tensor should be defined either for all 5 classes or no classes but got weight tensor "
                 "of shape: [4]"}),
    "target of shape (3, 1)": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t[:3], None, -100, 0.0, 0.0, 0.0),
        {"cpu": "fused_ce: class-index target must have shape (4, 1), got [3, 1]",
         "cuda": "fused_ce::cross_entropy_forward: expected a class-index target of shape [4, 1], got [3, 1]"}),
    "label_smoothing 1.5": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t, None, -100, 1.5, 0.0, 0.0),
        {"cpu": "fused_ce: label_smoothing must be in [0, 1], got 1.5",
         "cuda": "label_smoothing must be between 0.0 and 1.0. Got: 1.5"}),
    "z_loss -0.25": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t, None, -100, 0.0, -0.25, 0.0),
        "fused_ce: z_loss must be finite and >= 0, got -0.25"),
    "softcap -1e-7 (%g's exponent form)": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t, None, -100, 0.0, 0.0, -1e-7),
        "fused_ce: softcap must be finite and > 0 (or 0 for none), got -1e-07"),
    "softcap inf": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward(x, t, None, -100, 0.0, 0.0, float("inf")),
        "fused_ce: softcap must be finite and > 0 (or 0 for none), got inf"),
    "forward_with_grad, reduction 0": (
        lambda x, t: torch.ops.fused_ce.cross_entropy_forward_with_grad(x, t, None, -100, 0.0, 0.0, 0.0, 0),
        {"cpu": "fused_ce: forward_with_grad needs reduction 1 (mean) or 2 (sum), got 0",
         "cuda": "fused_ce::cross_entropy_forward_with_grad: reduction must be 1 (mean) or 2 (sum), got 0"}),
    "scale_gradient_, two-element scale": (
        lambda x, t: torch.ops.fused_ce.scale_gradient_(x, torch.tensor([2.0, 3.0], device=x.device)),
        "fused_ce: scale_gradient_ needs a one-element scale, got 2 elements"),
    "reduce_loss, reduction -7": (
        lambda x, t: torch.ops.fused_ce.reduce_loss(x.flatten(), torch.tensor(4.0, device=x.device), -7,
                                                    torch.float32),
        "fused_ce: reduce_loss needs reduction 1 (mean) or 2 (sum), got -7"),
    "reduce_loss, total_weight of 3 elements": (
        lambda x, t: torch.ops.fused_ce.reduce_loss(x.flatten(), torch.ones(3, device=x.device), 1,
                                                    torch.float32),
        "fused_ce: reduce_loss needs a one-element Float total_weight, got 3 elements of Float"),
}


@pytest.mark.parametrize("case", sorted(_OPERATOR_ERRORS))
def test_operator_errors_spell_numbers_and_shapes_like_c10(device, case):
    call, expected = _OPERATOR_ERRORS[case]
    if isinstance(expected, dict):
        expected = expected[device]
    error = _capture(lambda: call(*_rows_4x5(device)))
    assert isinstance(error, RuntimeError), f"{case}: expected a RuntimeError, got {error!r}"
    assert str(error).splitlines()[0] == expected
    _still_works(device)


def test_extension_sources_raise_through_fused_ce_check():
    # The guard behind the test above: a plain TORCH_CHECK in the extension would hand its numbers
    # to std::ostream again (csrc/error_message.h says why that crashed).
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")
    offenders = []
    for folder, _, files in os.walk(csrc):
        for name in files:
            if name == "error_message.h" or not name.endswith((".cpp", ".h", ".cu", ".cuh")):
                continue
            with open(os.path.join(folder, name)) as source:
                for number, line in enumerate(source, 1):
                    if re.search(r"\b(TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|TORCH_WARN\w*)\s*\(", line):
                        offenders.append(f"{os.path.relpath(os.path.join(folder, name), csrc)}:{number}")
    assert not offenders, "use FUSED_CE_CHECK (csrc/error_message.h) at " + ", ".join(offenders)


def _sweep_inputs():
    g = torch.Generator().manual_seed(5)
    inputs = {
        "(C)": torch.randn(5, generator=g), "(N, C)": torch.randn(3, 5, generator=g),
        "(N, C, H)": torch.randn(3, 5, 4, generator=g), "(N, C, H, W)": torch.randn(3, 5, 2, 2, generator=g),
        "(0, C)": torch.randn(0, 5, generator=g), "(N, 0)": torch.randn(3, 0, generator=g), "0-d": torch.tensor(1.0),
        "(N, C) float64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "(N, C) bfloat16": torch.randn(3, 5, generator=g).bfloat16(), "(N, C) int64": torch.randint(0, 5, (3, 5)),
    }
    targets = {
        "0-d": torch.tensor(2), "(1)": torch.tensor([2]), "(3)": torch.tensor([0, 1, 4]),
        "(3) >= C": torch.tensor([0, 7, 1]), "(3) negative": torch.tensor([0, -1, 1]),
        "(3) float": torch.tensor([0.0, 1.0, 2.0]), "(3) int32": torch.tensor([0, 1, 2], dtype=torch.int32),
        "(3) uint8": torch.tensor([0, 1, 2], dtype=torch.uint8), "(2)": torch.tensor([0, 1]),
        "(3, 4)": torch.randint(0, 5, (3, 4)), "(3, 2, 2)": torch.randint(0, 5, (3, 2, 2)), "(3, 1)": torch.zeros(3, 1).long(),
        "(0)": torch.zeros(0).long(), "(3, 5) probabilities": torch.rand(3, 5, generator=g).softmax(1),
        "(3, 5) float64 probabilities": torch.rand(3, 5, generator=g, dtype=torch.float64).softmax(1),
        "(3, 5) bfloat16 probabilities": torch.rand(3, 5, generator=g).softmax(1).bfloat16(),
        "(5) probabilities": torch.rand(5, generator=g).softmax(0), "(3, 5, 4) probabilities": torch.rand(3, 5, 4, generator=g),
    }
    weights = {
        "no weight": None, "(5)": torch.rand(5, generator=g) + 0.5, "(4)": torch.rand(4, generator=g),
        "(5) float64": torch.rand(5, generator=g, dtype=torch.float64), "(1, 5)": torch.rand(1, 5, generator=g),
        "(5) int64": torch.ones(5, dtype=torch.long),
    }
    options = [{}, {"ignore_index": 1}, {"label_smoothing": 0.2}, {"reduction": "none"},
               {"reduction": "sum", "ignore_index": -1}]
    return inputs, targets, weights, options


def _loss_and_gradient(fn, x, t, w, opts):
    """fn's loss (or exception) and the gradient of the loss (or the backward's exception) for
    logits that require grad (floating point ones)."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    loss = outcome(fn, x, t, weight=w, **opts)
    if isinstance(loss, Exception) or not x.requires_grad:
        return loss, None
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss, outcome(lambda: torch.autograd.grad(loss, x, upstream)[0])


def _same(a, b):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=2e-2, atol=1e-3, equal_nan=True)


def test_error_types_and_results_match_pytorch_over_a_sweep():
    """Every combination of 10 inputs, 18 targets, 6 weights and 5 option sets (5400 calls, most of
    them bad in one or several ways): fused_ce raises the exception type PyTorch raises (for several
    faults, the type of the one PyTorch reports first), and where both compute, the same losses and
    gradients. Where PyTorch fails on valid arguments, fused_ce must compute what PyTorch gives for
    the equivalent arguments: an unbatched input's (1,) target (PyTorch's backward, and its label
    smoothing, break on it; a 0-d target is the same thing), uint8 targets with label smoothing
    (PyTorch's gather wants int64)."""
    inputs, targets, weights, options = _sweep_inputs()
    mismatches = []
    for (xn, x), (tn, t), (wn, w), opts in itertools.product(inputs.items(), targets.items(), weights.items(),
                                                             options):
        case = f"input {xn}, target {tn}, weight {wn}, {opts}"
        theirs, their_grad = _loss_and_gradient(F.cross_entropy, x, t, w, opts)
        ours, our_grad = _loss_and_gradient(fused_ce.cross_entropy, x, t, w, opts)
        if x.dim() == 1 and t.shape == (1,) and not isinstance(ours, Exception):
            theirs, their_grad = _loss_and_gradient(F.cross_entropy, x, t.reshape(()), w, opts)
        elif t.dtype == torch.uint8 and opts.get("label_smoothing") and not isinstance(ours, Exception):
            theirs, their_grad = _loss_and_gradient(F.cross_entropy, x, t.long(), w, opts)
        for what, a, b in (("loss", theirs, ours), ("gradient", their_grad, our_grad)):
            if isinstance(a, Exception) or isinstance(b, Exception):
                if type(a) is not type(b):
                    mismatches.append(f"{case}, {what}: torch {type(a).__name__}({a}), fused_ce "
                                      f"{type(b).__name__}({b})")
                break
            if (a is None) != (b is None) or (a is not None and not _same(a, b)):
                mismatches.append(f"{case}, {what}: torch {a}, fused_ce {b}")
    assert not mismatches, f"{len(mismatches)} of 5400 differ, e.g.\n" + "\n".join(mismatches[:10])


def test_integer_and_empty_logits_fail_as_in_pytorch():
    # Logits of an integer or bool dtype fail in PyTorch's log_softmax, which runs after the class
    # probabilities' checks and before the class indices' -- unless the logits are empty or 0-d,
    # where other checks (shape, weight, target dtype) come first and nll_loss refuses the dtype
    # last. Every combination below must raise PyTorch's exception type, or compute where it does.
    def outcome(fn, x, t, kwargs):
        error = _capture(lambda: fn(x, t, **kwargs))
        return "computes" if error is None else type(error).__name__

    differ = []
    for dtype in (torch.int32, torch.bool, torch.float32):
        for shape in ((), (0,), (3,), (0, 2), (2, 3), (0, 2, 3), (2, 3, 0), (1, 4, 0)):
            classes = shape[1] if len(shape) > 1 else (shape[0] if shape else 1)
            x = torch.zeros(shape, dtype=dtype)
            target_shapes = {(), (0,), (2,), shape, (shape[0],) + shape[2:] if len(shape) > 1 else ()}
            for target_shape in target_shapes:
                for target_dtype in (torch.long, torch.float32, torch.int32):
                    t = torch.zeros(target_shape, dtype=target_dtype)
                    for kwargs in ({}, {"weight": torch.rand(7)}, {"weight": torch.rand(max(classes, 1))},
                                   {"label_smoothing": 0.1}):
                        want, got = outcome(F.cross_entropy, x, t, kwargs), outcome(fused_ce.cross_entropy, x, t, kwargs)
                        if want != got:
                            differ.append(f"{dtype} {shape}, target {target_dtype} {target_shape}, "
                                          f"{sorted(kwargs)}: torch {want}, fused_ce {got}")
    assert not differ, f"{len(differ)} differ, e.g.\n" + "\n".join(differ[:10])
