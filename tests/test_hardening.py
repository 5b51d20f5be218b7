"""Hardening tests for the CPU backend: determinism, thread safety, leaks, error recovery, fuzzing.

* determinism: bitwise-identical loss and gradient over repeated calls and with 1 vs 2 intra-op
  threads, for the row kernel (contiguous class axis, C >= 64) and the tile kernel (C < 64 and
  class-strided (N, C, d) inputs), in float32 and bfloat16;
* concurrency: several Python threads running forward + backward at once give exactly the
  single-threaded results;
* leaks: resident memory stays flat over 10 000 forward + backward steps (about 2 s), and on
  CUDA the caching allocator ends 10 000 steps where it started;
* errors: the library keeps working (correct results) after each kind of rejected input,
  including errors raised from inside the C++ operators;
* a bounded differential fuzz (hypothesis) against F.cross_entropy over shapes, C in 1..300,
  four dtypes, weights, ignore_index, label smoothing, reductions, soft targets, non-contiguous
  layouts and special values (NaN, +-inf, 1e30).  scripts/sanitize.sh runs it under ASan/UBSan.

All of it is CPU only (the thread/RSS properties are about the C++ CPU kernels), except the
bitwise determinism of repeated calls and the absence of leaks (allocator bytes), which are
also checked on CUDA.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_ce
from conftest import assert_close_ref, check_against_torch, make_class_target, make_logits, make_weight

# --------------------------------------------------------------------------
# helpers


def _fwd_bwd(x, t, **kw):
    """Forward + backward from a fresh leaf; returns (loss, grad) detached."""
    xl = x.detach().clone().requires_grad_()
    loss = fused_ce.cross_entropy(xl, t, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), xl.grad


def _bits_equal(a, b):
    """Bitwise equality (also for NaN payloads and signed zeros)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ia = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ia), b.contiguous().view(ia))


def _assert_repeatable(x, t, kw, label, repeats=3):
    """Forward + backward `repeats` more times: the same bits each time. Returns the first result."""
    ref_loss, ref_grad = _fwd_bwd(x, t, **kw)
    assert torch.isfinite(ref_grad).all()
    for i in range(repeats):
        loss, grad = _fwd_bwd(x, t, **kw)
        assert _bits_equal(loss, ref_loss), f"{label}: loss differs on repeat {i}"
        assert _bits_equal(grad, ref_grad), f"{label}: gradient differs on repeat {i}"
    return ref_loss, ref_grad


class _NumThreads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


# Problem sizes big enough that at::parallel_for really splits them over 2 threads
# (grain = 64k elements per task, see csrc/cpu/cross_entropy_cpu.cpp).
DET_CASES = {
    # contiguous class axis, C >= 64: row kernel
    "row": lambda: ((300, 1000), (300,), 1000),
    # C < 64: tile kernel
    "tile2d": lambda: ((12000, 17), (12000,), 17),
    # (N, C, d): class axis strided, tile kernel
    "tile_kdim": lambda: ((40, 20, 16, 24), (40, 16, 24), 20),
}


def _det_inputs(case, dtype):
    xshape, tshape, C = DET_CASES[case]()
    x = make_logits(xshape, dtype)
    t = make_class_target(tshape, C, ignore_index=-100, ignore_frac=0.1)
    w = make_weight(C, dtype)
    return x, t, w


# --------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(DET_CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_deterministic_repeated_and_thread_count(case, dtype, reduction):
    x, t, w = _det_inputs(case, dtype)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    ref_loss, ref_grad = _assert_repeatable(x, t, kw, f"{case}/{dtype}")
    results = {}
    for n in (1, 2):
        with _NumThreads(n):
            results[n] = _fwd_bwd(x, t, **kw)
    assert _bits_equal(results[1][0], results[2][0]), f"{case}/{dtype}: loss differs, 1 vs 2 threads"
    assert _bits_equal(results[1][1], results[2][1]), f"{case}/{dtype}: gradient differs, 1 vs 2 threads"
    assert _bits_equal(results[2][1], ref_grad)


CUDA_DET_CASES = {
    "tiny_rows": ((4096, 10), (4096,)),  # one thread per row
    "warp_rows": ((1024, 1000), (1024,)),  # a warp per row
    "resident_rows": ((64, 32000), (64,)),  # register-resident forward_with_grad, block reductions
    "cluster_rows": ((16, 70000), (16,)),  # past one block: split over a cluster on sm_90+
    "streamed_rows": ((16, 270000), (16,)),  # past every register-resident configuration
    "class_strided": ((8, 21, 32, 32), (8, 32, 32)),  # (N, C, H, W)
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CUDA_DET_CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_deterministic_repeated(case, dtype, reduction):
    # no atomics in the CUDA kernels: fixed reduction orders give the same bits every call
    xshape, tshape = CUDA_DET_CASES[case]
    C = xshape[1]
    x = make_logits(xshape, dtype, "cuda")
    t = make_class_target(tshape, C, "cuda", ignore_index=-100, ignore_frac=0.1)
    kw = dict(weight=make_weight(C, dtype, "cuda"), label_smoothing=0.1, reduction=reduction)
    _assert_repeatable(x, t, kw, f"{case}/{dtype}")


def test_num_threads_restored():
    # the determinism tests must leave the global thread setting as they found it
    before = torch.get_num_threads()
    with _NumThreads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------
# concurrency


def test_concurrent_python_threads():
    n_threads, iters = 4, 20
    jobs = []
    for k in range(n_threads):
        if k % 2 == 0:  # row kernel
            x = make_logits((64 + k, 500 + 50 * k), torch.float32)
            t = make_class_target((64 + k,), 500 + 50 * k, ignore_index=-100)
            kw = dict(label_smoothing=0.05 * k)
        else:  # tile kernel, (N, C, d) with a weight
            x = make_logits((8, 13 + k, 9, 7), torch.float32)
            t = make_class_target((8, 9, 7), 13 + k, ignore_index=-100)
            kw = dict(weight=make_weight(13 + k), reduction="sum")
        jobs.append((x, t, kw))
    refs = [_fwd_bwd(x, t, **kw) for x, t, kw in jobs]

    barrier = threading.Barrier(n_threads)
    failures = []

    def worker(k):
        x, t, kw = jobs[k]
        try:
            barrier.wait(timeout=30)
            for i in range(iters):
                loss, grad = _fwd_bwd(x, t, **kw)
                if not (_bits_equal(loss, refs[k][0]) and _bits_equal(grad, refs[k][1])):
                    failures.append(f"thread {k}, iteration {i}: result differs from the reference")
                    return
        except Exception as e:  # noqa: BLE001
            failures.append(f"thread {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not failures, failures


# --------------------------------------------------------------------------
# leaks


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    pytest.skip("no VmRSS in /proc/self/status")


def _leak_check(steps, warmup=300, slack_mb=20.0):
    x = make_logits((64, 1000), torch.float32)
    t = make_class_target((64,), 1000, ignore_index=-100)
    xs = make_logits((16, 10, 8), torch.float32)           # tile kernel, (N, C, d)
    ts = make_class_target((16, 8), 10, ignore_index=-100)
    ws = make_weight(10)
    soft = torch.rand(64, 1000).softmax(1)

    def step(i):
        xl = x.detach().requires_grad_()
        fused_ce.cross_entropy(xl, t, label_smoothing=0.1).backward()          # forward_with_grad
        if i % 4 == 0:
            xl2 = xs.detach().requires_grad_()
            out = fused_ce.cross_entropy(xl2, ts, weight=ws, reduction="none")  # backward operator
            out.sum().backward()
        if i % 8 == 0:
            xl3 = x.detach().requires_grad_()
            fused_ce.cross_entropy(xl3, soft).backward()                          # soft targets
        if i % 50 == 0:  # the error path (exception thrown from C++) must not leak either
            with pytest.raises(IndexError):
                fused_ce.cross_entropy(x.detach().requires_grad_(), torch.full((64,), 1000))

    for i in range(warmup):
        step(i)
    gc.collect()
    before = _rss_mb()
    for i in range(steps):
        step(i)
    gc.collect()
    after = _rss_mb()
    assert after - before < slack_mb, f"RSS grew {after - before:.1f} MB over {steps} steps ({before:.1f} -> {after:.1f} MB)"


def test_no_leak_rss():
    _leak_check(steps=10_000, warmup=500)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
def test_no_leak_cuda_memory():
    # 10 000 CUDA steps over every strategy (gradient from the forward and its retain_graph
    # recomputation, the lse backward, in place): the allocator ends where it started
    x = make_logits((64, 1000), torch.float32, "cuda")
    t = make_class_target((64,), 1000, "cuda", ignore_index=-100)
    xs = make_logits((16, 10, 8), torch.float32, "cuda")
    ts = make_class_target((16, 8), 10, "cuda", ignore_index=-100)

    def step(i):
        xl = x.detach().requires_grad_()
        loss = fused_ce.cross_entropy(xl, t, label_smoothing=0.1)
        loss.backward(retain_graph=i % 16 == 0)
        if i % 16 == 0:
            loss.backward()
        if i % 4 == 0:
            xl2 = xs.detach().requires_grad_()
            fused_ce.cross_entropy(xl2, ts, reduction="none").sum().backward()
        if i % 8 == 0:
            fused_ce.cross_entropy(x.detach().clone().requires_grad_() * 1, t, inplace_backward=True).backward()

    for i in range(100):
        step(i)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(10000):
        step(i)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# --------------------------------------------------------------------------
# keeps working after errors


def _good_call_is_right(C=7):
    x = make_logits((5, C), torch.float32)
    t = make_class_target((5,), C, ignore_index=-100)
    check_against_torch(fused_ce, x, t, make_weight(C), reduction="mean", label_smoothing=0.1,
                        what="good call after an error")
    xk = make_logits((3, 70, 4), torch.float32)
    tk = make_class_target((3, 4), 70, ignore_index=-100)
    check_against_torch(fused_ce, xk, tk, reduction="sum", what="good call after an error (K-dim)")


def _bad_target_high():
    fused_ce.cross_entropy(torch.randn(4, 7, requires_grad=True), torch.tensor([0, 1, 7, 2]))


def _bad_target_negative():
    fused_ce.cross_entropy(torch.randn(4, 100), torch.tensor([0, -3, 1, 2]), reduction="none")


def _bad_target_kdim():
    fused_ce.cross_entropy(torch.randn(2, 5, 3, requires_grad=True), torch.tensor([[0, 1, 2], [3, 9, 4]]))


def _bad_target_dtype():
    fused_ce.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2, 3], dtype=torch.int32))


def _bad_input_dtype():
    fused_ce.cross_entropy(torch.ones(4, 7, dtype=torch.int64), torch.tensor([0, 1, 2, 3]))


def _bad_weight_dtype():
    fused_ce.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), weight=torch.rand(7, dtype=torch.float64))


def _bad_batch_shape():
    fused_ce.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2]))


def _bad_weight_shape():
    fused_ce.cross_entropy(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), weight=torch.rand(6))


def _bad_op_rank():  # straight into the C++ operator: 2-D instead of the canonical (N, C, D)
    torch.ops.fused_ce.cross_entropy_forward(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), None, -100, 0.0,
                                             0.0, 0.0)


def _bad_op_target_oob():  # C++ operator, target out of range, gradient requested
    torch.ops.fused_ce.cross_entropy_forward_with_grad(
        torch.randn(4, 7, 1), torch.full((4, 1), 99, dtype=torch.long), None, -100, 0.0, 0.0, 0.0, 1)


def _bad_op_reduction():
    torch.ops.fused_ce.cross_entropy_forward_with_grad(
        torch.randn(4, 7, 1), torch.zeros((4, 1), dtype=torch.long), None, -100, 0.0, 0.0, 0.0, 0)


BAD_CALLS = {
    "target_out_of_range": (_bad_target_high, IndexError),
    "target_negative": (_bad_target_negative, IndexError),
    "target_out_of_range_kdim": (_bad_target_kdim, IndexError),
    "target_dtype": (_bad_target_dtype, RuntimeError),
    "input_dtype": (_bad_input_dtype, (RuntimeError, NotImplementedError)),
    "weight_dtype": (_bad_weight_dtype, RuntimeError),
    "batch_shape": (_bad_batch_shape, ValueError),
    "weight_shape": (_bad_weight_shape, RuntimeError),
    "op_rank": (_bad_op_rank, RuntimeError),
    "op_target_out_of_range": (_bad_op_target_oob, IndexError),
    "op_reduction": (_bad_op_reduction, RuntimeError),
}


@pytest.mark.parametrize("kind", list(BAD_CALLS))
def test_keeps_working_after_error(kind):
    bad, exc = BAD_CALLS[kind]
    _good_call_is_right()
    for _ in range(2):
        with pytest.raises(exc):
            bad()
        _good_call_is_right()


# --------------------------------------------------------------------------
# differential fuzz against F.cross_entropy

FUZZ_SETTINGS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                HealthCheck.data_too_large])

SPECIALS = {
    "nan": float("nan"),
    "+inf": float("inf"),
    "-inf": float("-inf"),
    "1e30": 1e30,
}


@st.composite
def fuzz_configs(draw):
    kind = draw(st.sampled_from(["unbatched", "2d", "2d", "kdim"]))
    C = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 63, 64, 65, 300])))
    small = C > 64
    N = draw(st.integers(0 if kind != "unbatched" else 1, 4 if small else 9))
    spatial = ()
    if kind == "kdim":
        spatial = tuple(draw(st.lists(st.integers(1, 2 if small else 4), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    soft = draw(st.booleans())
    specials = draw(st.lists(st.sampled_from(
        ["nan", "+inf", "-inf"] + (["1e30"] if dtype in (torch.float32, torch.float64) else [])),
        max_size=3))
    if not draw(st.integers(0, 2)):  # about a third of the examples carry special values
        specials = specials or ["nan"]
    else:
        specials = []
    return dict(
        kind=kind, N=N, C=C, spatial=spatial, dtype=dtype, soft=soft,
        target_grad=soft and draw(st.booleans()),
        use_weight=draw(st.booleans()),
        ignore_index=draw(st.sampled_from(["none", "default", "zero", "last", "minus1"])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        label_smoothing=draw(st.one_of(st.just(0.0), st.sampled_from([0.1, 1.0]),
                                       st.floats(0.0, 1.0, allow_nan=False))),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        layout=draw(st.sampled_from(["contiguous", "transpose", "step_class", "step_batch"])),
        specials=specials,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _fuzz_build(cfg):
    torch.manual_seed(cfg["seed"])
    C, N, spatial, dtype = cfg["C"], cfg["N"], cfg["spatial"], cfg["dtype"]
    unbatched = cfg["kind"] == "unbatched"
    shape = (C,) if unbatched else (N, C) + spatial
    tshape = () if unbatched else (N,) + spatial
    layout = cfg["layout"]
    if unbatched and layout in ("transpose", "step_batch"):
        layout = "step_class"

    # leaf buffer + view giving `shape` (non-contiguous unless layout == contiguous)
    if layout == "contiguous":
        buf_shape, view = shape, None
    elif layout == "transpose":
        if len(shape) == 2:  # (C, N).t(): class axis with stride N
            buf_shape = (C, N)

            def view(a):
                return a.t()
        else:  # channels-last-like: class axis innermost
            buf_shape = (N,) + spatial + (C,)

            def view(a):
                return a.movedim(-1, 1)
    elif layout == "step_class":
        cdim = 0 if unbatched else 1
        buf_shape = list(shape)
        buf_shape[cdim] *= 2

        def view(a, cdim=cdim):
            return a[::2] if cdim == 0 else a[:, ::2]
    else:  # step_batch
        buf_shape = (2 * N,) + tuple(shape[1:])

        def view(a):
            return a[::2]

    x = make_logits(tuple(buf_shape), torch.float64, scale=3.0)
    if cfg["specials"] and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (len(cfg["specials"]),))
        for i, name in zip(idx.tolist(), cfg["specials"]):
            flat[i] = SPECIALS[name]
    x = x.to(dtype)
    assert tuple((view(x) if view else x).shape) == tuple(shape)

    kw = dict(reduction=cfg["reduction"], label_smoothing=cfg["label_smoothing"])
    target_view = None
    if cfg["soft"]:
        t = torch.rand(tuple(buf_shape), dtype=torch.float64)
        cdim = 0 if unbatched else 1
        t = (view(t) if view else t)
        t = t / t.sum(cdim, keepdim=True).clamp_min(1e-12) if t.numel() else t
        # back to the buffer layout, so that the same view applies to the target leaf
        tb = torch.rand(tuple(buf_shape), dtype=torch.float64)
        (view(tb) if view else tb).copy_(t)
        t = tb.to(dtype)
        target_view = view
        if cfg["ignore_index"] == "default":
            kw["ignore_index"] = -100
        elif cfg["ignore_index"] == "minus1":
            kw["ignore_index"] = -1
    else:
        ii = {"none": None, "default": -100, "zero": 0, "last": C - 1, "minus1": -1}[cfg["ignore_index"]]
        if layout == "step_batch" and not unbatched:
            tbuf = (2 * N,) + spatial

            def target_view(b):
                return b[::2]
        else:
            tbuf = tshape
        t = torch.randint(0, C, tbuf)
        if ii is not None:
            kw["ignore_index"] = ii
            if cfg["ignore_frac"] > 0 and t.numel():
                mask = torch.rand(tbuf) < cfg["ignore_frac"]
                t = torch.where(mask, torch.full_like(t, ii), t)
    w = make_weight(C, dtype) if cfg["use_weight"] else None
    return x, t, w, view, target_view, kw


@FUZZ_SETTINGS
@given(cfg=fuzz_configs())
def test_fuzz_differential(cfg):
    x, t, w, view, target_view, kw = _fuzz_build(cfg)
    what = f"fuzz {cfg}"
    check_against_torch(fused_ce, x, t, w, target_grad=cfg["target_grad"], view=view,
                        target_view=target_view, what=what, **kw)
