"""The CUDA kernels and launchers, run on the CPU emulator (tests/cuda_emulator).

The same csrc/cuda sources that nvcc compiles, built as host C++ with every
CUDA thread a fiber, so that they run on machines without a GPU: each
launcher path (one thread per row, warp slices, register-resident blocks of
8 to 1024 threads per row, rows split over thread-block clusters of 8
blocks, the streaming kernels) against the float64 reference of the spec,
and the emulator's own checks (divergent or deadlocked collectives, warp
collectives over exited lanes, device-side assertions). What it cannot show
(timing, the memory model, register limits) stays for the GPU: see
tests/cuda_emulator/README.md.
"""

import fcntl
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_close_ref, dtype_id, make_class_target, make_logits, make_prob_target, make_weight,
                      reduced_loss_reference, ref_llm)
from cuda_emulator import build

REDUCTION_CODE = {"mean": 1, "sum": 2}


@pytest.fixture(scope="module")
def emu():
    if build.cuda_include_dir() is None:
        pytest.skip("the CUDA toolkit's headers (cuda_fp16.h) are not installed: the emulator compiles the "
                    "kernels against them")
    # scripts/sanitize_cuda_emulator.sh builds it with sanitizers.
    module = build.load(extra_cflags=os.environ.get("FUSED_CE_EMULATOR_CFLAGS", "").split())
    module.take_launch_log()
    return module


@pytest.fixture(autouse=True)
def _empty_launch_log(emu):
    """Each test reads the launches it made, not those left by the test before it."""
    emu.take_launch_log()


def _options(weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None):
    return dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap)


def _run_forward(emu, x3, t, mode, reduction="mean", **opts):
    o = _options(**opts)
    return emu.forward(x3, t, o["weight"], o["ignore_index"], o["label_smoothing"], o["z_loss"],
                       o["softcap"] or 0.0, REDUCTION_CODE[reduction], mode)


def _reference(x3, t, reduction, **opts):
    """float64 per-element loss, lse, total weight and the reduced loss's gradient."""
    o = _options(**opts)
    x = x3.detach().double().requires_grad_()
    w = None if o["weight"] is None else o["weight"].double()
    tt = t.double() if t.is_floating_point() else t
    loss, lse = ref_llm(x, tt, w, ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
                        z_loss=o["z_loss"], softcap=o["softcap"], reduction="none")
    if t.is_floating_point():
        total = torch.tensor(float(loss.numel()), dtype=torch.float64)
    else:
        valid = t != o["ignore_index"]
        w_i = torch.ones_like(loss) if w is None else w[torch.where(valid, t, 0)]
        total = torch.where(valid, w_i, torch.zeros_like(w_i)).sum()
    reduced = loss.sum() / total if reduction == "mean" else loss.sum()
    (grad,) = torch.autograd.grad(reduced, x)
    return loss.detach(), lse.detach(), total, grad


def _check_forward_with_grad(emu, x3, t, reduction="mean", mode="with_grad", **opts):
    ref_loss, ref_lse, ref_total, ref_grad = _reference(x3, t, reduction, **opts)
    loss, lse, total, grad = _run_forward(emu, x3, t, mode, reduction, **opts)
    dtype = x3.dtype
    assert_close_ref(loss, ref_loss, dtype, "loss", floor=1.0)
    assert_close_ref(lse, ref_lse, dtype, "lse", floor=1.0)
    assert_close_ref(total, ref_total, torch.float64 if dtype == torch.float64 else torch.float32, "total_weight")
    assert_close_ref(grad, ref_grad, dtype, "grad")
    return emu.take_launch_log()


# (C, dtype) -> the row kernel's launch for 3 rows: (blocks, threads per
# block, blocks per cluster). Register capacity: 8 slots of 16 bytes per
# thread; for 32- and 64-bit rows, clusters (the smallest that holds the row)
# past one block; for 16-bit rows, clusters of 2 blocks before one block and
# none past one block (cluster_plan in csrc/cuda/cross_entropy_kernels.cuh).
CONFIGURATIONS = [
    (10, torch.float32, (1, 256, 1)),         # 40-byte rows: one thread each (streamed)
    (50, torch.float32, (1, 256, 1)),         # 8 threads per row
    (200, torch.float32, (1, 256, 1)),        # a warp per row
    (2000, torch.float32, (3, 128, 1)),       # a block of 128 per row
    (8000, torch.float32, (3, 256, 1)),
    (16000, torch.float32, (3, 512, 1)),
    (32000, torch.float32, (3, 1024, 1)),
    (40000, torch.float32, (24, 256, 8)),     # clusters of 8 blocks of 256
    (80005, torch.float32, (24, 512, 8)),     # body slots not a multiple of the cluster
    (131072, torch.float32, (24, 512, 8)),    # the longest cluster rows
    (140000, torch.float32, (3, 768, 1)),     # too long: streamed by a block of 768
    (1000, torch.bfloat16, (1, 256, 1)),
    (20000, torch.bfloat16, (6, 256, 2)),     # clusters of 2 blocks rather than one of 512
    (50257, torch.bfloat16, (3, 896, 1)),     # GPT-2: the 896-thread block, odd C
    # past one block: streamed by a block of 384 through a ring of 72 KB in shared memory
    (60001, torch.bfloat16, (3, 384, 1, 73728)),
    (128256, torch.bfloat16, (3, 384, 1, 73728)),  # Llama 3
    (300001, torch.bfloat16, (3, 384, 1, 73728)),
    (777, torch.float16, (1, 256, 1)),
    (57344, torch.float16, (3, 896, 1)),
    (3000, torch.float64, (3, 256, 1)),
    (10000, torch.float64, (12, 256, 4)),
]


@pytest.mark.parametrize("C, dtype, launch", CONFIGURATIONS,
                         ids=[f"{c}-{dtype_id(d)}" for c, d, _ in CONFIGURATIONS])
def test_forward_with_grad_every_configuration(emu, C, dtype, launch):
    # Rows 12 apart: a block that reads past its row's end into the next
    # row changes the lse far beyond the tolerance.
    x = (make_logits((3, C, 1), torch.float64) + 12 * torch.arange(3.0).view(3, 1, 1)).to(dtype)
    t = make_class_target((3, 1), C, ignore_index=-100)
    log = _check_forward_with_grad(emu, x, t)
    assert log[-1] == launch, f"launches (blocks, threads, cluster): {log}"


# The rows forward_with_grad streams (reads twice: a thread's own short row
# again from L1, a long row past the on-chip limits mostly from L2); every
# other configuration above keeps the row on chip (a warp's, a block's or a
# cluster's registers) and reads it once.
READ_TWICE = {(10, torch.float32), (140000, torch.float32), (60001, torch.bfloat16), (128256, torch.bfloat16),
              (300001, torch.bfloat16)}


@pytest.fixture
def traffic(emu):
    """The emulator counting the bytes the kernels move into the logits and the gradient."""
    emu.watch_logits_and_gradients(True)
    yield emu
    emu.watch_logits_and_gradients(False)
    emu.take_traffic()


def _assert_reads(loaded, nbytes, times, rows, itemsize, what):
    # Beyond the row passes: at most the target logit and the reference logit
    # of each row, read on their own.
    assert times * nbytes <= loaded <= times * nbytes + 2 * rows * itemsize, (
        f"{what}: {loaded} bytes of the logits loaded, {loaded / nbytes:.3f} times their {nbytes} bytes; "
        f"expected {times}")


@pytest.mark.parametrize("C, dtype, launch", CONFIGURATIONS,
                         ids=[f"{c}-{dtype_id(d)}" for c, d, _ in CONFIGURATIONS])
def test_memory_traffic(traffic, C, dtype, launch):
    """What the roofline design promises, counted per byte by the emulator: forward_with_grad
    reads the logits once where the row stays on chip and twice where it streams (READ_TWICE),
    writes every gradient element once and reads none back, new or in place; the forward alone
    and the backward read the logits once."""
    rows = 3
    x = (make_logits((rows, C, 1), torch.float64) + 12 * torch.arange(3.0).view(3, 1, 1)).to(dtype)
    t = make_class_target((rows, 1), C)  # every row counts: ignored rows are not read twice
    nbytes, itemsize = x.numel() * x.element_size(), x.element_size()
    times = 2 if (C, dtype) in READ_TWICE else 1

    _run_forward(traffic, x, t, "with_grad")
    (logits_loaded, logits_stored), (grad_loaded, grad_stored) = traffic.take_traffic()
    assert traffic.take_launch_log()[-1] == launch
    _assert_reads(logits_loaded, nbytes, times, rows, itemsize, "forward_with_grad")
    assert (logits_stored, grad_loaded, grad_stored) == (0, 0, nbytes)

    _run_forward(traffic, x.clone(), t, "inplace")
    ((loaded, stored),) = traffic.take_traffic()
    _assert_reads(loaded, nbytes, times, rows, itemsize, "in place")
    assert stored == nbytes

    _, lse, _, _ = _run_forward(traffic, x, t, "forward")
    ((loaded, stored),) = traffic.take_traffic()
    _assert_reads(loaded, nbytes, 1, rows, itemsize, "forward")
    assert stored == 0

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    traffic.backward(torch.rand(rows, 1, dtype=acc), None, x, t, None, lse, -100, 0.0, 0.0, 0.0, True, False)
    (logits_loaded, logits_stored), (grad_loaded, grad_stored) = traffic.take_traffic()
    _assert_reads(logits_loaded, nbytes, 1, rows, itemsize, "backward")
    assert (logits_stored, grad_loaded, grad_stored) == (0, 0, nbytes)


# One configuration of each kind of kernel and collective: a warp slice, a
# block, a cluster, the streamed row; probabilities (the streamed kernels'
# other flavour) and the backward further down use the default order.
SCHEDULED = [(200, torch.float32), (2000, torch.bfloat16), (20000, torch.bfloat16), (140000, torch.float32)]


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("C, dtype", SCHEDULED, ids=[f"{c}-{dtype_id(d)}" for c, d in SCHEDULED])
def test_thread_order_does_not_matter(emu, C, dtype, order):
    """The threads of a block run in another order between collectives: a
    shared-memory value read before the barrier that publishes it, or
    overwritten before every reader has passed the next one, changes the result."""
    x = (make_logits((3, C, 1), torch.float64) + 12 * torch.arange(3.0).view(3, 1, 1)).to(dtype)
    t = make_class_target((3, 1), C, ignore_index=-100)
    emu.set_schedule(order, seed=C)
    try:
        _check_forward_with_grad(emu, x, t, weight=make_weight(C, dtype), label_smoothing=0.1)
    finally:
        emu.set_schedule("forward")


# Options on each kind of row kernel: tiny rows, register-resident, a
# cluster, streamed.
OPTION_SHAPES = [(10, torch.float32), (300, torch.bfloat16), (40000, torch.float32), (140000, torch.float32)]
OPTIONS = {
    "weight": dict(weight=True),
    "ignore-smoothing": dict(label_smoothing=0.2),
    "weight-smoothing": dict(weight=True, label_smoothing=0.1),
    "zloss-softcap": dict(z_loss=1e-3, softcap=15.0),
    "weight-zloss": dict(weight=True, z_loss=1e-2),
    "ignore-index-in-range": dict(ignore_index=1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("C, dtype", OPTION_SHAPES, ids=[f"{c}-{dtype_id(d)}" for c, d in OPTION_SHAPES])
def test_options(emu, C, dtype, option, reduction):
    N = 4
    opts = dict(OPTIONS[option])
    if opts.pop("weight", False):
        opts["weight"] = make_weight(C, dtype)
    ignore_index = opts.get("ignore_index", -100)
    x = make_logits((N, C, 1), dtype)
    t = make_class_target((N, 1), C, ignore_index=ignore_index)
    _check_forward_with_grad(emu, x, t, reduction, **opts)


@pytest.mark.parametrize("C, dtype", OPTION_SHAPES, ids=[f"{c}-{dtype_id(d)}" for c, d in OPTION_SHAPES])
def test_in_place(emu, C, dtype):
    x = make_logits((3, C, 1), dtype)
    t = make_class_target((3, 1), C, ignore_index=-100)
    ref_grad = _reference(x, t, "mean", label_smoothing=0.1)[3]
    _, _, _, grad = _run_forward(emu, x, t, "inplace", label_smoothing=0.1)
    assert grad.data_ptr() == x.data_ptr()
    assert_close_ref(x, ref_grad, dtype, "in-place grad")


@pytest.mark.parametrize("C, dtype", [(10, torch.float32), (1000, torch.bfloat16), (40000, torch.float32)])
def test_probability_targets(emu, C, dtype):
    x = make_logits((3, C, 1), dtype)
    t = make_prob_target((3, C, 1), dtype)
    _check_forward_with_grad(emu, x, t, label_smoothing=0.1)
    _check_forward_with_grad(emu, x, t, "sum", z_loss=1e-3, softcap=20.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_one_thread_rows_sum_probability_masses_in_blocks(emu, label_smoothing):
    """Class-strided rows of 30000 classes, one thread each: the thread's sums of the probability
    masses (V, and sum u_c (y_c - ref)) over the row. With full smoothing every mass is 1/C and a
    running float sum drifts one way: the loss was 3.3e-4 off and the gradient 2.9e-4 (of its
    largest element), in the forward and in the backward's V. In blocks: 2e-6 and 3e-5, the rest
    being the row's float sum of exps (PyTorch's CPU kernel is at 2e-6 and 2.9e-4 here)."""
    C = 30000
    x = make_logits((1, C, 2), torch.float32)
    t = make_prob_target((1, C, 2), torch.float32)
    ref_loss, _, _, ref_grad = _reference(x, t, "sum", label_smoothing=label_smoothing)
    loss, saved_lse, _, grad = _run_forward(emu, x, t, "with_grad", "sum", label_smoothing=label_smoothing)
    assert _relative_error(loss, ref_loss) < 2e-5
    assert _relative_error(grad, ref_grad) < 1e-4
    grad_input, _ = emu.backward(torch.ones(1, 2), None, x, t, None, saved_lse, -100, label_smoothing, 0.0, 0.0,
                                 True, False)
    assert _relative_error(grad_input, ref_grad) < 1e-4


def _relative_error(actual, ref):
    """Largest error, relative to the reference's largest magnitude."""
    return ((actual.double().reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("layout", ["class-strided", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(emu, layout, dtype):
    if layout == "class-strided":  # (N, C, H*W): one thread per position, classes D apart
        x = make_logits((2, 7, 33), dtype)
        t = make_class_target((2, 33), 7, ignore_index=-100)
    elif layout == "transposed":  # (N, C) with the class axis N elements apart
        x = make_logits((300, 6), dtype).t().unsqueeze(-1)
        t = make_class_target((6, 1), 300, ignore_index=-100)
    else:  # rows that start off a 16-byte boundary, one phase each
        x = make_logits((5, 1003), dtype)[:, 1:1002].unsqueeze(-1)
        t = make_class_target((5, 1), 1001, ignore_index=-100)
    _check_forward_with_grad(emu, x, t, weight=make_weight(x.shape[1], dtype), label_smoothing=0.05)


def _class_last(shape, dtype, prob=False):
    """An (N, C, D) view of a contiguous (N, D, C) tensor: F.cross_entropy(logits.transpose(1, 2), y)."""
    n, c, d = shape
    return (make_prob_target((n, d, c), dtype) if prob else make_logits((n, d, c), dtype)).transpose(1, 2)


def _as_rows(t3):
    """The (N * D, C, 1) problem of a class-last (N, C, D) view (class indices: (N * D, 1))."""
    if t3.dim() == 2:
        return t3.reshape(-1, 1)
    return t3.transpose(1, 2).reshape(-1, t3.shape[1], 1)


@pytest.mark.parametrize("C, dtype", [(100, torch.float32), (2000, torch.bfloat16), (40000, torch.float32),
                                      (5, torch.float16)])
def test_class_last_positions_run_as_rows(emu, C, dtype):
    """A class-contiguous (N, C, D) problem whose positions follow one another at one stride (class-last
    logits seen through a transpose) runs as the (N * D, C) problem it is (ce::fold_positions): the
    same launches as the 2-D call, where it took one thread per position before, and the gradient
    written as the rows it then is."""
    N, D = 2, 3
    x = _class_last((N, C, D), dtype)
    t = make_class_target((N, D), C, ignore_index=-100)
    opts = dict(weight=make_weight(C, dtype), label_smoothing=0.1)
    log = _check_forward_with_grad(emu, x, t, **opts)
    assert log == _check_forward_with_grad(emu, _as_rows(x), _as_rows(t), **opts)
    grad = _run_forward(emu, x, t, "with_grad", **opts)[3]
    assert grad.transpose(1, 2).is_contiguous()
    emu.take_launch_log()

    soft = _class_last((N, C, D), dtype, prob=True)
    log = _check_forward_with_grad(emu, x, soft, label_smoothing=0.1)
    assert log == _check_forward_with_grad(emu, _as_rows(x), _as_rows(soft), label_smoothing=0.1)


@pytest.mark.parametrize("soft", [False, True], ids=["class", "prob"])
def test_class_last_backward_runs_as_rows(emu, soft):
    N, C, D = 2, 3000, 4
    x = _class_last((N, C, D), torch.float32)
    t = _class_last((N, C, D), torch.float32, prob=True) if soft else make_class_target((N, D), C, ignore_index=-100)
    acc = torch.float32
    grad_loss = torch.randn(N, D, dtype=acc)
    grad_lse = torch.randn(N, D, dtype=acc)
    xr = x.detach().double().requires_grad_()
    tr = t.detach().double().requires_grad_() if soft else t
    loss, lse = ref_llm(xr, tr, None, label_smoothing=0.1, reduction="none")
    grads = torch.autograd.grad((loss * grad_loss.double()).sum() + (lse * grad_lse.double()).sum(),
                                (xr, tr) if soft else (xr,))
    saved_lse = _run_forward(emu, x, t, "forward", label_smoothing=0.1)[1]
    emu.take_launch_log()
    grad_input, grad_target = emu.backward(grad_loss, grad_lse, x, t, None, saved_lse, -100, 0.1, 0.0, 0.0,
                                           True, soft)
    log = emu.take_launch_log()
    assert_close_ref(grad_input, grads[0], torch.float32, "grad_input")
    assert grad_input.transpose(1, 2).is_contiguous()
    if soft:
        assert_close_ref(grad_target, grads[1], torch.float32, "grad_target")
    emu.backward(grad_loss.reshape(-1, 1), grad_lse.reshape(-1, 1), _as_rows(x), _as_rows(t), None,
                 saved_lse.reshape(-1, 1), -100, 0.1, 0.0, 0.0, True, soft)
    assert log == emu.take_launch_log()


@pytest.mark.parametrize("layout", ["positions out of sequence", "target out of sequence", "channels-last"])
def test_which_class_contiguous_layouts_fold(emu, layout):
    """Positions fold into rows only where every tensor they index steps through them at one stride;
    elsewhere one thread per position, right either way."""
    N, C, D = 3, 300, 4
    t = make_class_target((N, D), C, ignore_index=-100)
    if layout == "positions out of sequence":  # (D, N, C) logits seen as (N, C, D)
        x = make_logits((D, N, C), torch.float32).permute(1, 2, 0)
    elif layout == "target out of sequence":
        x = _class_last((N, C, D), torch.float32)
        t = make_class_target((D, N), C, ignore_index=-100).t()
    else:  # (N, C, 2, 2) channels-last images, as the autograd function reshapes them
        x = make_logits((N, C, 2, 2), torch.float32).to(memory_format=torch.channels_last).reshape(N, C, D)
    log = _check_forward_with_grad(emu, x, t)
    one_thread_per_position = [(1, 256, 1)]  # 12 positions, one block
    assert (log[-1:] == one_thread_per_position) == (layout != "channels-last"), log


@pytest.mark.parametrize("C, dtype", [(10, torch.float32), (1000, torch.bfloat16), (5000, torch.float64),
                                      (140000, torch.float32)])
def test_forward_only(emu, C, dtype):
    x = make_logits((4, C, 1), dtype)
    t = make_class_target((4, 1), C, ignore_index=-100)
    ref_loss, ref_lse, ref_total, _ = _reference(x, t, "mean", z_loss=1e-3)
    loss, lse, total, grad = _run_forward(emu, x, t, "forward", z_loss=1e-3)
    assert grad.numel() == 0
    assert_close_ref(loss, ref_loss, dtype, "loss", floor=1.0)
    assert_close_ref(lse, ref_lse, dtype, "lse", floor=1.0)
    assert_close_ref(total, ref_total, torch.float32, "total_weight")


@pytest.mark.parametrize("soft", [False, True], ids=["class", "prob"])
@pytest.mark.parametrize("C, dtype", [(10, torch.float32), (1000, torch.bfloat16), (40000, torch.float32)])
def test_backward(emu, C, dtype, soft):
    """The backward operator's kernels: upstream gradients of the loss (strided)
    and of the lse, weights and smoothing; the target's gradient for probabilities."""
    N = 4
    x = make_logits((N, C, 1), dtype)
    t = make_prob_target((N, C, 1), dtype) if soft else make_class_target((N, 1), C, ignore_index=-100)
    weight = None if soft else make_weight(C, dtype)
    opts = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=25.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_loss = torch.randn(N, 2, dtype=acc)[:, :1]  # a strided (N, 1) view
    grad_lse = torch.randn(N, 1, dtype=acc)
    xr = x.detach().double().requires_grad_()
    tr = t.detach().double().requires_grad_() if soft else t
    loss, lse = ref_llm(xr, tr, None if weight is None else weight.double(), label_smoothing=0.1, z_loss=1e-3,
                        softcap=25.0, reduction="none")
    grads = torch.autograd.grad((loss * grad_loss.double()).sum() + (lse * grad_lse.double()).sum(),
                                (xr, tr) if soft else (xr,))
    _, saved_lse, _, _ = _run_forward(emu, x, t, "forward", **opts)
    grad_input, grad_target = emu.backward(grad_loss, grad_lse, x, t, weight, saved_lse, -100, 0.1, 1e-3, 25.0,
                                           True, soft)
    assert_close_ref(grad_input, grads[0], dtype, "grad_input")
    if soft:
        assert_close_ref(grad_target, grads[1], dtype, "grad_target")


@pytest.mark.parametrize("C", [2, 100, 5000])
def test_target_gradient_of_rows_with_a_large_lse(emu, C):
    """Rows whose |lse| >= 128 have their statistics recomputed by the backward: the target's
    gradient, -g w_c (y_c - lse), takes y_c - lse from them too. From the saved lse (rounded to 6e-5
    at 1000) it was 2.5e-5 off; PyTorch's float32 is 9e-7."""
    x = make_logits((8, C, 1), torch.float32) + 1000
    q = torch.rand(8, C, 1)
    _, lse, _, _ = _run_forward(emu, x, q, "forward")
    _, grad_target = emu.backward(torch.ones(8, 1), None, x, q, None, lse, -100, 0.0, 0.0, 0.0, False, True)
    qr = q.double().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(x.double(), qr, reduction="sum"), qr)
    assert (grad_target.double() - ref).abs().max().item() < 4e-6


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows, weight_launches", [
    (4, [(1, 256, 1)]), (2048, [(1, 256, 1)]),  # one block sums the targets' weights and finishes
    (2049, [(2, 256, 1), (1, 256, 1)]), (65536, [(32, 256, 1), (1, 256, 1)]),  # partials, then one block
])
def test_total_weight_launches(emu, rows, weight_launches, reduction):
    """forward_with_grad computes total_weight and the gradient's scale before its row kernel:
    in one launch up to 2048 rows (a small batch's step costs launches more than work), in two
    (per-block partials, then their sum in index order) past that; right either way."""
    C = 10
    x = make_logits((rows, C, 1), torch.float32)
    t = make_class_target((rows, 1), C, ignore_index=-100)
    log = _check_forward_with_grad(emu, x, t, reduction, weight=make_weight(C, torch.float32))
    assert log[:-1] == weight_launches, log
    soft = make_prob_target((rows, C, 1), torch.float32)  # the total is N * D: no partials
    assert _check_forward_with_grad(emu, x, soft, reduction)[:-1] == [(1, 256, 1)]


def test_empty_and_all_ignored(emu):
    x = make_logits((0, 100, 1), torch.float32)
    loss, lse, total, grad = _run_forward(emu, x, torch.zeros(0, 1, dtype=torch.long), "with_grad")
    assert loss.shape == (0, 1) and grad.shape == (0, 100, 1) and total.item() == 0
    x = make_logits((3, 100, 1), torch.float32)
    t = torch.full((3, 1), -100)
    loss, lse, total, grad = _run_forward(emu, x, t, "with_grad", z_loss=1e-3)
    assert total.item() == 0 and torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))  # exact zeros although 1 / total is inf
    assert_close_ref(lse, torch.logsumexp(x.double(), 1), torch.float32, "lse", floor=1.0)


@pytest.mark.parametrize("C", [10, 300, 40000])
def test_out_of_range_target_is_a_device_assertion(emu, C):
    x = make_logits((3, C, 1), torch.float32)
    t = torch.tensor([[0], [C], [1]])
    with pytest.raises(RuntimeError, match="device-side assertion"):
        _run_forward(emu, x, t, "with_grad")
    # The assertion is reported by the launch that failed, not by the next
    # one (on a GPU the context would be unusable from here on).
    _check_forward_with_grad(emu, x, torch.tensor([[0], [C - 1], [1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("scale_dtype", ["accumulate", "gradient's", torch.float64])
def test_scale_gradient(emu, dtype, offset, scale_dtype):
    """grad *= scale in place, in the accumulation type, whatever the scale's dtype: one of the
    gradient's dtype (a bfloat16 loss's upstream gradient) is read as it is, any other converted
    first; a scale of 1 leaves the gradient untouched."""
    base = make_logits((2000 + offset,), dtype)
    grad = base[offset:]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale_dtype = {"accumulate": acc, "gradient's": dtype}.get(scale_dtype, scale_dtype)
    scale = torch.tensor(0.37, dtype=scale_dtype)
    expected = (grad.to(acc) * scale.to(acc)).to(dtype)  # as the kernel: in the accumulation type
    emu.scale_gradient(grad, scale)
    assert torch.equal(grad, expected)
    before = grad.clone()
    emu.scale_gradient(grad, torch.tensor([1.0], dtype=scale_dtype))
    assert torch.equal(grad, before)


# One block up to 4096 elements; beyond, one partial per block of about 4096
# (4097: two partials; 4096 * 1024 + 5: the cap of 1024 partials).
@pytest.mark.parametrize("n", [0, 1, 4096, 4097, 50_001, 4096 * 1024 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_reduce_loss(emu, dtype, n):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss = (torch.rand(n, dtype=torch.float64) * 5).to(acc)
    total_weight = torch.tensor(0.75 * n + 0.5, dtype=acc)
    for reduction in ("mean", "sum"):
        got = emu.reduce_loss(loss, total_weight, REDUCTION_CODE[reduction], dtype)
        want = reduced_loss_reference(loss, total_weight, reduction, dtype)
        # float32 sums in a tree of partials: a few float32 ulps, whatever n
        rtol = 1e-12 if dtype == torch.float64 else max(4e-6, 2 * torch.finfo(dtype).eps)
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert emu.take_launch_log() == ([(1, 256, 1)] * 2 if n <= 4096 else [(min(1024, -(-n // 4096)), 256, 1), (1, 256, 1)] * 2)
    # A total weight of 0: NaN, whether the losses sum to 0 (all ignored) or not (label smoothing
    # over targets of class weight 0), as PyTorch's mean.
    assert math.isnan(emu.reduce_loss(torch.zeros(n, dtype=acc), torch.tensor(0.0, dtype=acc), 1, dtype).item())
    assert math.isnan(emu.reduce_loss(loss, torch.tensor(0.0, dtype=acc), 1, dtype).item())
    emu.take_launch_log()


# A 10-class step's reductions under FUSED_CE_CUDA_WIDE_REDUCTIONS, in a process of its own:
# total_weight over R rows (weighted, some ignored) and reduce_loss over n losses, each checked
# against the reference; prints the launches of each.
_WIDE_REDUCTION_LAUNCHES = """
from conftest import make_weight, reduced_loss_reference
for rows in (2048, 2049, 65536, 65537):
    x = make_logits((rows, 10, 1), torch.float32)
    t = make_class_target((rows, 1), 10, ignore_index=-100)
    print("weights", rows, _check_forward_with_grad(emu, x, t, "mean", weight=make_weight(10, torch.float32))[:-1])
for n in (4096, 4097, 65536, 65537):
    loss = torch.rand(n, dtype=torch.float64).float() * 5
    total = torch.tensor(0.75 * n + 0.5)
    for reduction, code in (("mean", 1), ("sum", 2)):
        got = emu.reduce_loss(loss, total, code, torch.float32)
        torch.testing.assert_close(got, reduced_loss_reference(loss, total, reduction, torch.float32),
                                   rtol=4e-6, atol=0)
        launches = emu.take_launch_log()
    print("losses", n, launches)  # the sum's
"""


@pytest.mark.parametrize("setting", [None, "1", "2"])
def test_wide_reductions(emu, setting):
    """FUSED_CE_CUDA_WIDE_REDUCTIONS=1 (read once per process): total_weight over up to 65536
    rows and reduce_loss over up to 65536 losses take one block of 1024 threads each instead of
    partials and their sum (two launches fewer for a step of 65536 rows), and are right; past
    65536, and unset or any other value, the partials (one block of 256 up to 2048 rows and
    4096 losses, as ever)."""
    wide = setting == "1"
    lines = _launches_with("FUSED_CE_CUDA_WIDE_REDUCTIONS", setting, _WIDE_REDUCTION_LAUNCHES)
    one, wide_block = "[(1, 256, 1)]", "[(1, 1024, 1)]"
    assert lines == [
        f"2048 {one}",
        f"2049 {wide_block if wide else '[(2, 256, 1), (1, 256, 1)]'}",
        f"65536 {wide_block if wide else '[(32, 256, 1), (1, 256, 1)]'}",
        "65537 [(33, 256, 1), (1, 256, 1)]",
        f"4096 {one}",
        f"4097 {wide_block if wide else '[(2, 256, 1), (1, 256, 1)]'}",
        f"65536 {wide_block if wide else '[(16, 256, 1), (1, 256, 1)]'}",
        "65537 [(17, 256, 1), (1, 256, 1)]",
    ]


def test_results_match_the_cpu_operators(emu):
    """Kernel for kernel, the emulated CUDA path agrees with fused_ce's CPU
    operator (both checked against PyTorch above; here against each other)."""
    import fused_ce  # noqa: F401  (registers the operators)

    x = make_logits((6, 2000, 1), torch.float32)
    t = make_class_target((6, 1), 2000, ignore_index=-100)
    loss, lse, total, grad = _run_forward(emu, x, t, "with_grad", label_smoothing=0.1)
    cpu = torch.ops.fused_ce.cross_entropy_forward_with_grad(x, t, None, -100, 0.1, 0.0, 0.0, 1)
    torch.testing.assert_close(loss, cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, cpu[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, cpu[2])
    torch.testing.assert_close(grad, cpu[3], rtol=1e-4, atol=1e-7)


# Special values, as tests/test_special_values.py checks them for the
# operators, on each kind of row kernel (rows of 70 and 140001 classes start
# off a 16-byte boundary, so class 0 of row 1 is a head element): NaN and
# +-inf where PyTorch's float32 results have them, finite values close to
# its float64 results (the kernels accumulate more accurately than PyTorch's
# float32 over rows of 1e5 classes).
SPECIAL_CASES = ["nan-other", "nan-target", "posinf-other", "posinf-target", "neginf-masked",
                 "neginf-target", "row-all-neginf", "huge-ties", "near-float-max"]


def _special_logits(case, C):
    x = make_logits((4, C, 1), torch.float32)
    row = x[1, :, 0]  # the target of row 1 is class 1
    if case == "nan-other":
        row[0] = float("nan")
    elif case == "nan-target":
        row[1] = float("nan")
    elif case == "posinf-other":
        row[0] = float("inf")
    elif case == "posinf-target":
        row[1] = float("inf")
    elif case == "neginf-masked":
        row[2:] = float("-inf")
    elif case == "neginf-target":
        row[1] = float("-inf")
    elif case == "row-all-neginf":
        row[:] = float("-inf")
    elif case == "huge-ties":
        row[0] = row[1] = 1e30
        x[2, :, 0] = 1e30
    else:
        row[0], row[2] = 3e38, -3e38
    return x


def _assert_like_torch(actual, ref32, ref64, what):
    actual = actual.double()
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(special(actual), special(ref32)), (
            f"{what}: {special.__name__} at {special(actual).nonzero().tolist()[:6]}, "
            f"PyTorch's at {special(ref32).nonzero().tolist()[:6]}")
    finite = torch.isfinite(ref32)
    torch.testing.assert_close(actual[finite], ref64[finite], rtol=1e-5, atol=1e-6 * ref64[finite].abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("case", SPECIAL_CASES)
@pytest.mark.parametrize("C", [3, 70, 2000, 40000, 140001])
def test_special_values(emu, C, case, label_smoothing):
    x = _special_logits(case, C)
    t = torch.tensor([[0], [1], [2], [0]])
    refs = []
    for dtype in (torch.float32, torch.float64):
        xr = x[..., 0].to(dtype).requires_grad_()
        loss = F.cross_entropy(xr, t[:, 0], reduction="none", label_smoothing=label_smoothing)
        (grad,) = torch.autograd.grad(loss.mean(), xr)
        refs.append((loss.detach().double(), grad.double()))
    (loss32, grad32), (loss64, grad64) = refs
    loss, lse, total, grad = _run_forward(emu, x, t, "with_grad", label_smoothing=label_smoothing)
    _assert_like_torch(loss[:, 0], loss32, loss64, f"{case}: loss")
    _assert_like_torch(grad[..., 0], grad32, grad64, f"{case}: grad")
    # The backward from the saved lse (reduction="none", return_lse): the
    # same gradient, for an upstream gradient of 1 / N per element.
    grad_loss = torch.full((4, 1), 0.25)
    grad_input, _ = emu.backward(grad_loss, None, x, t, None, lse, -100, label_smoothing, 0.0, 0.0, True, False)
    _assert_like_torch(grad_input[..., 0], grad32, grad64, f"{case}: backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("C", [4, 2000])
def test_logits_spanning_more_than_the_range(emu, C, dtype):
    """A row whose logits span more than the type's range (3e38 and -3e38 in float32): the smoothing
    and probability sums, taken relative to the target's logit (or y_0), overflow to inf - inf. The
    loss is PyTorch's: +inf where the low logit's class has mass, NaN where it has none (0 * inf)."""
    big = torch.finfo(dtype).max * 0.9
    x = torch.zeros(3, C, 1, dtype=dtype)
    x[:, 0], x[:, 1] = big, -big
    t = torch.tensor([[1], [1], [2]])
    weight = torch.ones(C, dtype=dtype)
    weight[1] = 0  # rows 0 and 1: the target's class, at the low logit, has no weight
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for w, rows in ((None, 3), (weight, 2)):
        # (Row 2 under these weights: PyTorch's 0 * inf of class 1 is NaN, the kernel's sum inf; left.)
        loss = _run_forward(emu, x, t, "forward", label_smoothing=0.5, weight=w)[0]
        ref = F.cross_entropy(x[..., 0].to(acc), t[:, 0], None if w is None else w.to(acc), reduction="none",
                              label_smoothing=0.5)
        torch.testing.assert_close(loss[:rows, 0], ref[:rows], equal_nan=True)
    soft = torch.full((3, C, 1), 1.0 / C, dtype=dtype)
    soft[0, 0] = 0  # row 0: class 0 has no mass, so its -inf log-probability gives 0 * inf
    xs = torch.zeros(3, C, 1, dtype=dtype)
    xs[:, 0], xs[:, 1] = -big, big  # the low logit at class 0: y_0 is the probability sums' reference
    loss = _run_forward(emu, xs, soft, "forward")[0]
    ref = F.cross_entropy(xs[..., 0].to(acc), soft[..., 0].to(acc), reduction="none")
    torch.testing.assert_close(loss[:, 0], ref, equal_nan=True)


def _run_in_a_new_process(body: str, setup: str = "", env=None) -> list:
    """Runs ``body`` in a new Python process, with the emulator loaded as ``emu`` (after the
    ``setup`` lines) and this module's helpers imported; returns its lines of output.
    For what is decided once per process (the environment, the symbols loaded)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = "\n".join([
        "import os, sys, torch",
        setup,
        f"sys.path.insert(0, {tests!r})",
        "from cuda_emulator import build",
        "from conftest import make_logits, make_class_target",
        "from test_cuda_emulated import _check_forward_with_grad, _print_launches, _run_forward",
        'emu = build.load(extra_cflags=os.environ.get("FUSED_CE_EMULATOR_CFLAGS", "").split())',
        body,
    ])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def _print_launches(emu, rows, cases):
    """For the scripts of _launches_with: forward_with_grad (label smoothing 0.1) over ``rows``
    rows of each (C, dtype, mode, softcap) case, checked against the reference; prints C and the
    row kernel's launch."""
    for C, dtype, mode, softcap in cases:
        x = make_logits((rows, C, 1), dtype)
        t = make_class_target((rows, 1), C, ignore_index=-100)
        print(C, _check_forward_with_grad(emu, x, t, mode=mode, label_smoothing=0.1, softcap=softcap)[-1])


def _launches_with(variable, value, body, **more_variables):
    """The launch (blocks, threads, cluster) that each line of ``body`` prints after a label, run in
    a new process (the FUSED_CE_CUDA_* settings are read once per process) whose environment sets
    ``variable`` to ``value`` (None: unset), and so each of ``more_variables``."""
    settings = {variable: value, **more_variables}
    env = {key: val for key, val in os.environ.items() if key not in settings}
    env.update({key: val for key, val in settings.items() if val is not None})
    return [line.split(" ", 1)[1] for line in _run_in_a_new_process(body, env=env)]


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_load(emu):
    """torch's extension builder waits for as long as the file "lock" exists in the build folder,
    and a process killed while it builds leaves it there (an xdist worker past pytest's time
    limit, on the GPU machine): build.load() clears it under its own lock, an flock. (From torch
    2.15 the builder's "lock" is itself an flock, which the kernel releases when its holder dies,
    and the file stays after a build: then it must only be free.)"""
    stale = Path(emu.__file__).parent / "lock"
    stale.write_text("")
    assert _run_in_a_new_process("print('loaded')") == ["loaded"]
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "FileLock"):
        with open(stale) as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    else:
        assert not stale.exists()


_CLUSTER_MODE_LAUNCHES = """_print_launches(emu, 3, [
    (20000, torch.bfloat16, "with_grad", None), (50257, torch.bfloat16, "with_grad", None),
    (128256, torch.bfloat16, "with_grad", None), (40000, torch.float32, "with_grad", None)])"""


@pytest.mark.parametrize("mode, expected", [
    # unset: 16-bit rows in clusters of 2 before one block, none past one block; 32-bit rows in clusters past it
    (None, ["(6, 256, 2)", "(3, 896, 1)", "(3, 384, 1, 73728)", "(24, 256, 8)"]),
    ("1", ["(3, 1024, 1)", "(3, 896, 1)", "(24, 256, 8)", "(24, 256, 8)"]),  # clusters past one block
    ("all", ["(6, 256, 2)", "(12, 256, 4)", "(24, 256, 8)", "(24, 256, 8)"]),  # also from 16k 16-bit classes
    ("0", ["(3, 1024, 1)", "(3, 896, 1)", "(3, 384, 1, 73728)", "(3, 768, 1)"]),  # none: rows past one block streamed
], ids=["unset", "1", "all", "0"])
def test_cluster_modes(emu, mode, expected):
    """FUSED_CE_CUDA_CLUSTERS (read once per process, hence a new process)."""
    assert _launches_with("FUSED_CE_CUDA_CLUSTERS", mode, _CLUSTER_MODE_LAUNCHES) == expected


# 16-bit rows past one block in clusters (FUSED_CE_CUDA_CLUSTERS=1): fp16 and bf16, new and in
# place, softcapped; the last one too long for any cluster (streamed).
_CLUSTER_BLOCK_LAUNCHES = """_print_launches(emu, 3, [
    (60001, torch.float16, "with_grad", None), (128256, torch.bfloat16, "inplace", 30.0),
    (256000, torch.bfloat16, "with_grad", None), (300001, torch.bfloat16, "with_grad", None)])"""


@pytest.mark.parametrize("block, expected", [
    (None, ["(12, 256, 4)", "(24, 256, 8)", "(24, 512, 8)", "(3, 384, 1, 73728)"]),  # 256 x 8 slots (512 x 8 past them)
    ("1024", ["(6, 1024, 2)", "(12, 1024, 4)", "(24, 1024, 8)", "(3, 384, 1, 73728)"]),  # 1024 x 4 slots
], ids=["default", "1024"])
def test_cluster_block(emu, block, expected):
    """FUSED_CE_CUDA_CLUSTER_BLOCK (read once per process): 16-bit rows split over clusters take
    blocks of 1024 threads holding 4 slots each, in clusters of 2, 4 or 8, and are right."""
    assert _launches_with("FUSED_CE_CUDA_CLUSTER_BLOCK", block, _CLUSTER_BLOCK_LAUNCHES,
                          FUSED_CE_CUDA_CLUSTERS="1") == expected


# Streamed rows of forward_with_grad: bf16 new and in place (softcapped), float32 in place, float64.
_STREAMED_ROW_LAUNCHES = """_print_launches(emu, 5, [
    (128256, torch.bfloat16, "with_grad", None), (128256, torch.bfloat16, "inplace", 30.0),
    (200000, torch.float32, "inplace", None), (140000, torch.float64, "with_grad", None)])"""


def _ring_bytes(threads):
    """The dynamic shared memory of a streamed row's StepRing: 3 stages x 4 slots x 16 bytes a
    thread."""
    return 3 * 4 * threads * 16


# The streamed rows' launches by default: 16-bit rows in blocks of 384 threads through the
# shared-memory ring (the emulated SM keeps as many of those blocks as of the register version),
# float32 rows 768 and float64 rows 256 in registers (stream_row_block, stream_ring).
_DEFAULT_STREAMED_ROW_LAUNCHES = [f"(5, 384, 1, {_ring_bytes(384)})"] * 2 + ["(5, 768, 1)", "(5, 256, 1)"]


@pytest.mark.parametrize("reuse", [None, "none", "keep", "reverse", "both"])
def test_stream_reuse_modes(emu, reuse):
    """FUSED_CE_CUDA_STREAM_REUSE (read once per process): the streamed rows of forward_with_grad,
    new gradient and in place, are right whichever order the second pass walks a row in."""
    assert _launches_with("FUSED_CE_CUDA_STREAM_REUSE", reuse, _STREAMED_ROW_LAUNCHES) == _DEFAULT_STREAMED_ROW_LAUNCHES


@pytest.mark.parametrize("threads", [None, "256", "384", "768", "512"])
def test_stream_block_widths(emu, threads):
    """FUSED_CE_CUDA_STREAM_BLOCK (read once per process): the streamed class-target rows of
    forward_with_grad, new gradient and in place, softcapped or not, are right in blocks of 256,
    384 or 768 threads a row (16-bit rows through the ring at every width); unset or any other
    value gives the default widths, and float64 rows keep 256."""
    launches = _launches_with("FUSED_CE_CUDA_STREAM_BLOCK", threads, _STREAMED_ROW_LAUNCHES)
    if threads in ("256", "384", "768"):
        w = int(threads)
        assert launches == [f"(5, {w}, 1, {_ring_bytes(w)})"] * 2 + [f"(5, {w}, 1)", "(5, 256, 1)"]
    else:
        assert launches == _DEFAULT_STREAMED_ROW_LAUNCHES


@pytest.mark.parametrize("stages", [None, "3", "0", "2"])
@pytest.mark.parametrize("threads", [None, "256", "768"])
def test_stream_stages(emu, stages, threads):
    """FUSED_CE_CUDA_STREAM_STAGES: "3" reads the streamed class-target rows of forward_with_grad,
    float32 ones too, through a ring of three steps in dynamic shared memory (cp.async; the
    emulator performs a group's copies only when it is waited for), new gradient and in place,
    softcapped or not, in every block width; "0" keeps every row in registers; unset or any other
    value gives the default, the ring for 16-bit rows alone. Float64 rows keep their registers."""
    launches = _launches_with("FUSED_CE_CUDA_STREAM_STAGES", stages, _STREAMED_ROW_LAUNCHES,
                              FUSED_CE_CUDA_STREAM_BLOCK=threads)
    widths = [int(threads)] * 3 if threads else [384, 384, 768]
    ring = {"3": [True] * 3, "0": [False] * 3}.get(stages, [True, True, False])
    assert launches == [f"(5, {w}, 1, {_ring_bytes(w)})" if r else f"(5, {w}, 1)"
                        for w, r in zip(widths, ring)] + ["(5, 256, 1)"]


@pytest.mark.parametrize("shared_kb, ring", [("228", True), ("164", True), ("100", False)])
def test_stream_ring_only_where_no_block_is_lost(emu, shared_kb, ring):
    """By default 16-bit rows take the ring only where the SM holds as many of its blocks as of
    the register version (the emulated SM: 80 registers a thread, so 2 blocks of 384 threads; 72
    KB of ring each): an H100 or H200 (228 KB of shared memory per SM) and an A100 (164) do, a
    GPU with 100 KB per SM would hold one. FUSED_CE_CUDA_STREAM_STAGES=3 takes the ring even
    there."""
    default = _launches_with("FUSED_CE_EMULATED_SHARED_KB_PER_SM", shared_kb, _STREAMED_ROW_LAUNCHES)
    forced = _launches_with("FUSED_CE_EMULATED_SHARED_KB_PER_SM", shared_kb, _STREAMED_ROW_LAUNCHES,
                            FUSED_CE_CUDA_STREAM_STAGES="3")
    bf16 = f"(5, 384, 1, {_ring_bytes(384)})" if ring else "(5, 384, 1)"
    assert default == [bf16] * 2 + ["(5, 768, 1)", "(5, 256, 1)"]
    assert forced == [f"(5, 384, 1, {_ring_bytes(384)})"] * 2 + [f"(5, 768, 1, {_ring_bytes(768)})", "(5, 256, 1)"]


# Rows of 129-256 body slots, and just past them, under FUSED_CE_CUDA_WARP_ROWS: float32 new and
# in place (softcapped), bfloat16, the last row a warp of 8 slots holds (1024 float32 classes),
# one slot more than that, and float64 (which keeps the block).
_WARP_ROW_LAUNCHES = """_print_launches(emu, 3, [
    (1000, torch.float32, "with_grad", None), (1000, torch.float32, "inplace", 30.0),
    (2000, torch.bfloat16, "with_grad", None), (1024, torch.float32, "with_grad", None),
    (1028, torch.float32, "with_grad", None), (500, torch.float64, "with_grad", None)])"""


@pytest.mark.parametrize("setting", [None, "8", "4"])
def test_warp_rows_of_8_slots(emu, setting):
    """FUSED_CE_CUDA_WARP_ROWS=8 (read once per process): rows of 129-256 slots are held by one
    warp of 8 slots a lane (8 rows to a block of 256) instead of a block of 128 threads, and are
    right (each case is checked against the reference); unset or any other value keeps the
    block. Longer rows, and float64 rows, take the block either way."""
    warp, block = "(1, 256, 1)", "(3, 128, 1)"
    expected = [warp] * 4 + [block, block] if setting == "8" else [block] * 6
    assert _launches_with("FUSED_CE_CUDA_WARP_ROWS", setting, _WARP_ROW_LAUNCHES) == expected


# Rows one block of 128 or more threads holds, under FUSED_CE_CUDA_RESIDENT_PREFETCH, 8 of each on
# an emulated GPU of one SM: (C, dtype, mode, softcap), the block's threads and slots a thread, the
# blocks of it the SM holds with its staging (the emulated SM: 80 registers a thread or what a block
# of 1024 may have, 228 KB of shared memory), and whether 100 KB of shared memory per SM holds one.
_PREFETCH_CASES = [
    ((32000, torch.float32, "with_grad", None), 1024, 8, 1, False),
    ((32000, torch.float32, "inplace", None), 1024, 8, 1, False),
    ((16001, torch.float32, "with_grad", 30.0), 512, 8, 1, True),
    ((50257, torch.bfloat16, "with_grad", None), 896, 8, 1, False),
    ((50257, torch.float16, "inplace", 30.0), 896, 8, 1, False),
    ((8000, torch.float64, "with_grad", None), 512, 8, 1, True),
    ((6000, torch.float32, "with_grad", None), 256, 8, 3, True),
    ((2000, torch.float32, "inplace", 30.0), 128, 4, 6, True),
    ((2000, torch.bfloat16, "with_grad", None), 128, 4, 6, True),
]
_PREFETCH_LAUNCHES = f"""_print_launches(emu, 8, {[case for case, *_ in _PREFETCH_CASES]!r} + [
    (200, torch.float32, "with_grad", None)])
emu.watch_logits_and_gradients(True)
x = make_logits((5, 32000, 1), torch.float32)
_run_forward(emu, x, make_class_target((5, 1), 32000), "with_grad")
(loaded, stored), (grad_loaded, grad_stored) = emu.take_traffic()
print("traffic", round(loaded / x.nbytes, 2), (stored, grad_loaded, grad_stored) == (0, 0, x.nbytes))
emu.watch_logits_and_gradients(False)
try:
    _run_forward(emu, x, torch.tensor([[0], [1], [2], [32000], [3]]), "with_grad")
except RuntimeError as error:
    print("raised", "device-side assertion" in str(error))
"""


@pytest.mark.parametrize("setting, shared_kb", [(None, None), ("1", None), ("1", "100"), ("2", None)])
def test_resident_prefetch(emu, setting, shared_kb):
    """FUSED_CE_CUDA_RESIDENT_PREFETCH=1 (read once per process): rows one block of 128 or more
    threads holds take a persistent grid of as many blocks as the device holds at once (on one
    emulated SM, so each block loops over several of the 8 rows), each staging its next row in
    shared memory (cp.async) while it reduces and writes the current one. Every case is checked
    against the reference; each logit is still read once and each gradient element written once;
    an out-of-range target, read a row ahead, still raises. Where the SM could not hold the
    staging block (100 KB of shared memory: the 1024- and 896-thread rows) the plain kernel runs;
    unset or any other value keeps the plain kernel everywhere; rows of a warp never stage."""
    env = {"FUSED_CE_EMULATED_SMS": "1", "FUSED_CE_EMULATED_SHARED_KB_PER_SM": shared_kb}
    lines = _launches_with("FUSED_CE_CUDA_RESIDENT_PREFETCH", setting, _PREFETCH_LAUNCHES, **env)
    expected = []
    for _, threads, slots, blocks, fits_in_100kb in _PREFETCH_CASES:
        staged = setting == "1" and (shared_kb != "100" or fits_in_100kb)
        expected.append(f"({blocks}, {threads}, 1, {threads * slots * 16})" if staged else f"(8, {threads}, 1)")
    assert lines == expected + ["(1, 256, 1)", "1.0 True", "True"]  # the warp rows; "traffic", "raised"


# How often forward_with_grad reads the logits of long rows (rounded to 0.01, and every gradient
# element stored once?) in a process of their own, under the experiments' switches.
_LONG_ROW_TRAFFIC = """
emu.watch_logits_and_gradients(True)
for C, dtype in [(128256, torch.bfloat16), (200000, torch.float32)]:
    x = make_logits((3, C, 1), dtype)
    _run_forward(emu, x, make_class_target((3, 1), C), "with_grad")
    (loaded, stored), (grad_loaded, grad_stored) = emu.take_traffic()
    nbytes = x.numel() * x.element_size()
    print(C, round(loaded / nbytes, 2), (stored, grad_loaded, grad_stored) == (0, 0, nbytes))
"""


@pytest.mark.parametrize("stages, clusters, block, reads", [
    (None, None, None, ["2.0 True", "2.0 True"]),  # both streamed, bf16 through the ring
    ("3", None, None, ["2.0 True", "2.0 True"]),  # both through shared memory (cp.async)
    ("0", None, None, ["2.0 True", "2.0 True"]),  # both in registers
    (None, "1", "1024", ["1.0 True", "2.0 True"]),  # bf16 in clusters of 1024-thread blocks
], ids=["default", "stages", "registers", "cluster-block"])
def test_memory_traffic_of_the_experiments(emu, stages, clusters, block, reads):
    """The long rows' experiments keep the design's traffic: the shared-memory ring still reads
    a streamed row twice (its cp.async copies counted as they are issued), and 16-bit rows of
    128256 classes in clusters of 1024-thread blocks are read once; the gradient written once."""
    assert _launches_with("FUSED_CE_CUDA_STREAM_STAGES", stages, _LONG_ROW_TRAFFIC,
                          FUSED_CE_CUDA_CLUSTERS=clusters, FUSED_CE_CUDA_CLUSTER_BLOCK=block) == reads


_LAUNCH_AND_ASSERTION = """
x = make_logits((3, 40000, 1), torch.float32)
print("launch", _check_forward_with_grad(emu, x, make_class_target((3, 1), 40000, ignore_index=-100))[-1])
try:
    _run_forward(emu, x, torch.tensor([[0], [40000], [1]]), "with_grad")
except RuntimeError as error:
    print("raised", error)
"""


def _cuda_runtime_library():
    root = build.cuda_include_dir().parent
    found = sorted(root.glob("lib64/libcudart.so*")) + sorted(root.glob("targets/*/lib/libcudart.so*"))
    assert found, f"no libcudart.so under {root}, whose include folder the emulator compiles against"
    return str(found[0])


def test_emulator_ignores_a_real_cuda_runtime_in_the_process(emu):
    """On a GPU machine the real CUDA runtime is loaded in the global symbol
    scope, and fused_ce._C holds the real kernels. The emulator must still
    call its own runtime (the real one made every cluster check fail and
    every device assertion vanish there) and its own kernels' statics."""
    # As torch's CUDA build puts the runtime in the global scope:
    setup = f"import ctypes; ctypes.CDLL({_cuda_runtime_library()!r}, mode=ctypes.RTLD_GLOBAL)"
    lines = _run_in_a_new_process(_LAUNCH_AND_ASSERTION, setup=setup)
    assert lines[0] == "launch (24, 256, 8)", lines
    assert lines[1].startswith("raised") and "device-side assertion" in lines[1], lines


def test_emulated_kernels_live_in_their_own_namespace(emu):
    """No symbol of the emulated build is named like one of fused_ce._C's
    (see build.load): the statics of inline functions would be shared."""
    import subprocess

    symbols = subprocess.run(["nm", "-C", "--defined-only", emu.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert f"{build.EMULATED_NAMESPACE}::cuda::detail::cluster_use()" in symbols
    assert " fused_ce::" not in symbols


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations(emu, seed):
    """Random rows, dtypes, options and layouts against the reference."""
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    dtype = pick([torch.float32, torch.bfloat16, torch.float16, torch.float64])
    C = int(torch.exp(torch.empty(()).uniform_(0, 12.5, generator=g)).item())  # 1 to ~270000
    N = int(torch.randint(1, 5, (1,), generator=g))
    D = pick([1, 1, 1, 3])
    x = make_logits((N, C + 1, D), dtype)[:, 1:] if pick([False, True]) else make_logits((N, C, D), dtype)
    soft = pick([False, False, True])
    opts = dict(label_smoothing=pick([0.0, 0.1]), z_loss=pick([0.0, 1e-3]), softcap=pick([None, 30.0]))
    if soft:
        t = make_prob_target((N, C, D), dtype)
    else:
        t = make_class_target((N, D), C, ignore_index=-100)
        if pick([False, True]):
            opts["weight"] = make_weight(C, dtype)
    _check_forward_with_grad(emu, x, t, pick(["mean", "sum"]), **opts)
