"""fused_ce.distributed.vocab_parallel_cross_entropy against single-process F.cross_entropy.

Spawning a process group is slow (each process imports torch), so each world
size (2 and 4 gloo processes on the CPU) is spawned once per test session:
the parent writes every case's full inputs to a file, each rank runs all
cases on its vocabulary slice and saves its loss and gradient, and the
per-case tests below compare them with ``F.cross_entropy`` on the full
float64 logits (the loss on every rank, each rank's slice of the gradient).
Error handling and the size of the collectives are recorded in the same run.
"""

from __future__ import annotations

import math
import os
import traceback
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_ref, identical, ref_llm
from gloo_workers import finish, init_gloo, run_workers

WORLD_SIZES = [2, 4]
SPAWN_TIMEOUT_S = 150

# --------------------------------------------------------------------------
# Cases: name -> spec. V must be divisible by every world size.

_BASE = dict(lead=(7,), V=40, dtype=torch.float32, reduction="mean", ignore_index=-100,
             ignore="none", label_smoothing=0.0, scale=3.0, offset=0.0, z_loss=0.0, softcap=None,
             padded=False)


def _case(**kw):
    spec = dict(_BASE)
    spec.update(kw)
    return spec


CASES = {
    "f32_none": _case(reduction="none"),
    "f32_mean": _case(),
    "f32_sum": _case(reduction="sum"),
    "f32_ignore_none": _case(reduction="none", ignore="some"),
    "f32_ignore_mean": _case(ignore="some", lead=(11,)),
    "f32_ignore_sum": _case(reduction="sum", ignore="some"),
    # ignore_index that is also a valid class id (owned by rank 0)
    "f32_ignore_index_is_class_mean": _case(ignore="some", ignore_index=5),
    "f32_all_ignored_mean": _case(ignore="all"),  # NaN, like PyTorch
    "f32_all_ignored_sum": _case(ignore="all", reduction="sum"),
    "f32_all_ignored_none": _case(ignore="all", reduction="none"),
    "f32_smooth_mean": _case(ignore="some", label_smoothing=0.1),
    "f32_smooth_none": _case(ignore="some", label_smoothing=0.25, reduction="none"),
    "f32_smooth_sum": _case(label_smoothing=0.1, reduction="sum"),
    "f32_smooth_one_mean": _case(label_smoothing=1.0),
    "f32_smooth_all_ignored_mean": _case(ignore="all", label_smoothing=0.1),
    "f32_boundary_targets_none": _case(reduction="none", ignore="boundary", lead=(9,)),
    # large, spread-out logits: the row max sits on one rank, others underflow
    "f32_large_scale_mean": _case(lead=(16,), scale=30.0, offset=-500.0, label_smoothing=0.05),
    # a padded vocabulary: the last quarter of the classes masked with -inf logits, so that with 4
    # ranks the last one holds nothing but -inf (its local log-sum-exp is -inf)
    "f32_padded_vocab_mean": _case(padded=True, ignore="some"),
    "bf16_padded_vocab_none": _case(padded=True, dtype=torch.bfloat16, V=64, reduction="none", z_loss=1e-3),
    "f64_smooth_mean": _case(dtype=torch.float64, ignore="some", label_smoothing=0.2),
    "f64_none": _case(dtype=torch.float64, reduction="none"),
    "bf16_mean": _case(dtype=torch.bfloat16, lead=(16,), V=256, ignore="some"),
    "bf16_smooth_none": _case(dtype=torch.bfloat16, lead=(16,), V=256, reduction="none",
                              label_smoothing=0.1),
    "f16_sum": _case(dtype=torch.float16, lead=(8,), V=64, reduction="sum"),
    "3d_none": _case(lead=(2, 5), V=64, reduction="none", ignore="some"),
    "3d_smooth_mean": _case(lead=(3, 4), V=64, ignore="some", label_smoothing=0.1),
    "3d_bf16_sum": _case(lead=(2, 3), V=128, dtype=torch.bfloat16, reduction="sum"),
    "unbatched_mean": _case(lead=()),
    "empty_mean": _case(lead=(0,)),  # NaN, like PyTorch
    "empty_none": _case(lead=(0,), reduction="none"),
    # fused_ce's options for large vocabularies (the reference: conftest.ref_llm)
    "z_loss_mean": _case(ignore="some", z_loss=1e-2),
    "z_loss_smooth_none": _case(ignore="some", z_loss=1e-2, label_smoothing=0.1, reduction="none"),
    "softcap_mean": _case(ignore="some", softcap=2.0),
    "softcap_z_loss_smooth_sum": _case(reduction="sum", softcap=2.0, z_loss=1e-2, label_smoothing=0.1),
    "softcap_bf16_none": _case(dtype=torch.bfloat16, lead=(16,), V=256, reduction="none", softcap=4.0,
                               z_loss=1e-3),
}


def _make_inputs(name, spec):
    """Full logits / targets / upstream gradient of a case, reproducible from its name."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    lead, V = tuple(spec["lead"]), spec["V"]
    x = torch.randn(lead + (V,), generator=gen, dtype=torch.float64) * spec["scale"] + spec["offset"]
    x = x.to(spec["dtype"])
    t = torch.randint(0, V - V // 4 if spec["padded"] else V, lead, generator=gen)
    if spec["padded"]:
        x[..., V - V // 4:] = -math.inf
    flat = t.view(-1)
    ignore = spec["ignore"]
    if ignore == "boundary":
        # first / last class of every shard for both world sizes
        edges = sorted({e for ws in WORLD_SIZES for r in range(ws)
                        for e in (r * V // ws, (r + 1) * V // ws - 1)})
        for i in range(flat.numel()):
            flat[i] = edges[i % len(edges)]
    elif ignore == "some":
        mask = torch.rand(lead, generator=gen) < 0.3
        mask.view(-1)[0] = True
        mask.view(-1)[-1] = False
        if spec["ignore_index"] >= 0:
            flat[1] = spec["ignore_index"]  # ignored although it is a valid class id
        t = torch.where(mask, torch.full_like(t, spec["ignore_index"]), t)
    elif ignore == "all":
        t = torch.full_like(t, spec["ignore_index"])
    if spec["reduction"] == "none":
        g = torch.rand(lead, generator=gen, dtype=torch.float64) * 2 - 0.5
    else:
        g = torch.rand((), generator=gen, dtype=torch.float64) * 2 + 0.5
    g = g.to(spec["dtype"])  # the worker passes it in the loss dtype: round it once here
    return x, t, g


def _kwargs(spec):
    kwargs = dict(reduction=spec["reduction"], ignore_index=spec["ignore_index"],
                  label_smoothing=spec["label_smoothing"])
    for option in ("z_loss", "softcap"):  # only when set: the other cases call without them
        if spec[option]:
            kwargs[option] = spec[option]
    return kwargs


# --------------------------------------------------------------------------
# The spawned side.


def _shard(x, rank, world_size):
    vs = x.shape[-1] // world_size
    return x[..., rank * vs:(rank + 1) * vs]


def _run_case(vp, x, t, g, rank, world_size, **kwargs):
    xs = _shard(x, rank, world_size).clone().requires_grad_()
    loss = vp(xs, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, xs, g)
    return loss.detach(), grad


def _capture_error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return None


def _worker(rank, world_size, workdir):
    import torch.distributed as dist

    if not init_gloo(rank, world_size, workdir):
        return
    from fused_ce.distributed import vocab_parallel_cross_entropy as vp

    inputs = torch.load(os.path.join(workdir, "inputs.pt"))
    out = {"cases": {}, "errors": {}}
    for name, (x, t, g, kwargs) in inputs["cases"].items():
        try:
            loss, grad = _run_case(vp, x, t, g, rank, world_size, **kwargs)
            out["cases"][name] = {"loss": loss, "grad": grad}
        except Exception:  # noqa: BLE001
            out["cases"][name] = {"exception": traceback.format_exc()}

    # Errors: every rank must raise (none may hang in a collective), and the
    # group must stay usable afterwards.
    x, t, g, kwargs = inputs["cases"]["f32_mean"]
    V = x.shape[-1]
    xs = _shard(x, rank, world_size)
    errors = out["errors"]
    errors["target_eq_V"] = _capture_error(lambda: vp(xs, t.clone().index_fill_(0, torch.tensor([2]), V)))
    errors["target_negative"] = _capture_error(lambda: vp(xs, t.clone().index_fill_(0, torch.tensor([3]), -7)))
    bad_on_last = t.clone()
    if rank == world_size - 1:
        bad_on_last[0] = V + 123  # only the last rank sees the bad value
    errors["bad_on_one_rank"] = _capture_error(lambda: vp(xs, bad_on_last))
    other = t.clone()
    if rank == 0:
        other[4] = (other[4] + 1) % V  # in range, but different from the other ranks
    errors["targets_differ"] = _capture_error(lambda: vp(xs, other))
    errors["rows_differ"] = _capture_error(
        lambda: vp(xs[: 5 + (rank == 0)], t[: 5 + (rank == 0)]))
    loss, grad = _run_case(vp, x, t, g, rank, world_size, **kwargs)
    out["after_errors"] = {"loss": loss, "grad": grad}

    # Communication: only all_reduce on O(N) tensors in the forward, nothing in the backward.
    log = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        log.append((phase, tensor.numel(), str(op)))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def forbidden(*args, **kwargs):
        raise AssertionError("vocab_parallel_cross_entropy used a collective other than all_reduce")

    saved = {n: getattr(dist, n) for n in ("all_gather", "all_gather_into_tensor", "gather",
                                           "broadcast", "reduce_scatter", "reduce_scatter_tensor",
                                           "all_to_all", "all_to_all_single", "scatter", "reduce")
             if hasattr(dist, n)}
    gen = torch.Generator().manual_seed(1234)
    n_rows, V = 6, 4096
    big = torch.randn(n_rows, V, generator=gen)
    big_t = torch.randint(0, V, (n_rows,), generator=gen)
    try:
        dist.all_reduce = recording_all_reduce
        for n in saved:
            setattr(dist, n, forbidden)
        xs = _shard(big, rank, world_size).clone().requires_grad_()
        phase = "forward"
        loss = vp(xs, big_t, label_smoothing=0.1)
        phase = "backward"
        loss.backward()
    finally:
        dist.all_reduce = real_all_reduce
        for n, fn in saved.items():
            setattr(dist, n, fn)
    out["collectives"] = {"rows": n_rows, "log": log}
    finish(out, rank, workdir)


# --------------------------------------------------------------------------
# The parent side.


def _spawn_group(world_size, workdir):
    inputs = {"cases": {}}
    for name, spec in CASES.items():
        x, t, g = _make_inputs(name, spec)
        inputs["cases"][name] = (x, t, g, _kwargs(spec))
    torch.save(inputs, os.path.join(workdir, "inputs.pt"))
    return inputs, run_workers(_worker, world_size, workdir, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cache = {}

    def get(world_size):
        if world_size not in cache:
            workdir = tmp_path_factory.mktemp(f"vocab_parallel_ws{world_size}")
            cache[world_size] = _spawn_group(world_size, workdir)
        return cache[world_size]

    return get


def _reference(x, t, g, **kwargs):
    x64 = x.detach().double().requires_grad_()
    rows, targets = x64.reshape(-1, x64.shape[-1]), t.reshape(-1)
    if "z_loss" in kwargs or "softcap" in kwargs:
        loss, _ = ref_llm(rows, targets, **kwargs)
    else:
        loss = F.cross_entropy(rows, targets, **kwargs)
    if kwargs["reduction"] == "none":
        loss = loss.reshape(t.shape)
    (grad,) = torch.autograd.grad(loss, x64, g.double())
    return loss.detach(), grad


def _check_against_reference(x, t, g, kwargs, per_rank, world_size, what):
    ref_loss, ref_grad = _reference(x, t, g, **kwargs)
    dtype = x.dtype
    for rank, res in enumerate(per_rank):
        assert "exception" not in res, f"{what}: rank {rank} raised:\n{res['exception']}"
        loss, grad = res["loss"], res["grad"]
        tag = f"{what} rank {rank}/{world_size}"
        assert loss.dtype == dtype, f"{tag}: loss dtype {loss.dtype}, logits {dtype}"
        assert identical(loss, per_rank[0]["loss"]), f"{tag}: loss differs from rank 0's"
        assert_close_ref(loss, ref_loss, dtype, what=f"{tag}: loss", floor=1.0)
        ref_slice = _shard(ref_grad, rank, world_size)
        assert grad.dtype == dtype, f"{tag}: grad dtype {grad.dtype}"
        assert_close_ref(grad, ref_slice, dtype, what=f"{tag}: grad")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(spawned, world_size, case):
    inputs, results = spawned(world_size)
    x, t, g, kwargs = inputs["cases"][case]
    _check_against_reference(x, t, g, kwargs, [r["cases"][case] for r in results], world_size, case)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_errors_raise_on_every_rank(spawned, world_size):
    inputs, results = spawned(world_size)
    V = inputs["cases"]["f32_mean"][0].shape[-1]
    for rank, res in enumerate(results):
        err = res["errors"]
        for key, value in (("target_eq_V", V), ("target_negative", -7)):
            assert err[key] is not None, f"rank {rank}: {key} accepted"
            typ, msg = err[key]
            assert typ == "IndexError" and f"target {value} is out of bounds" in msg, (rank, key, err[key])
            assert f"[0, {V})" in msg, msg
        typ, msg = err["bad_on_one_rank"]
        assert typ == "IndexError", (rank, err["bad_on_one_rank"])
        if rank == world_size - 1:
            assert f"target {V + 123} is out of bounds" in msg, msg
        else:
            assert "another rank" in msg, msg
        for key, what in (("targets_differ", "targets"), ("rows_differ", "number of rows")):
            assert err[key] is not None, f"rank {rank}: {key} accepted"
            typ, msg = err[key]
            assert typ == "ValueError" and "disagree" in msg and what in msg, (rank, key, err[key])
    # the group is still in step after all those errors
    x, t, g, kwargs = inputs["cases"]["f32_mean"]
    _check_against_reference(x, t, g, kwargs, [r["after_errors"] for r in results], world_size,
                             "call after errors")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_communication_is_O_rows(spawned, world_size):
    """Only all_reduce, only O(N) elements, all in the forward (validation + MAX + SUM)."""
    _, results = spawned(world_size)
    for rank, res in enumerate(results):
        rows, log = res["collectives"]["rows"], res["collectives"]["log"]
        assert [p for p, _, _ in log] == ["forward"] * 3, f"rank {rank}: collectives {log}"
        assert max(n for _, n, _ in log) <= 3 * rows + 16, f"rank {rank}: collectives {log}"


# --------------------------------------------------------------------------
# Checks that need no process group (they fail before any communication).


def test_requires_initialized_process_group():
    import torch.distributed as dist

    from fused_ce.distributed import vocab_parallel_cross_entropy as vp

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is already initialized in this process")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vp(x, torch.randint(0, 8, (4,)))


@pytest.mark.parametrize("bad", ["shape", "float_target", "int_logits", "reduction", "smoothing", "no_classes",
                                 "z_loss", "softcap"])
def test_local_argument_errors(bad):
    from fused_ce.distributed import vocab_parallel_cross_entropy as vp

    x = torch.randn(4, 8)
    t = torch.randint(0, 8, (4,))
    kwargs = {}
    expected = {"shape": (ValueError, r"target shape \[5\] does not match"),
                "float_target": (TypeError, "integer class ids"),
                "int_logits": (TypeError, "floating point"),
                "reduction": (ValueError, "reduction must be one of"),
                "smoothing": (ValueError, "label_smoothing must be in"),
                "no_classes": (ValueError, "Vs >= 1"),
                "z_loss": (ValueError, "z_loss must be a finite number"),
                "softcap": (ValueError, "softcap must be None or a finite number")}[bad]
    if bad == "shape":
        t = torch.randint(0, 8, (5,))
    elif bad == "float_target":
        t = t.float()
    elif bad == "int_logits":
        x = torch.randint(0, 8, (4, 8))
    elif bad == "reduction":
        kwargs["reduction"] = "avg"
    elif bad == "smoothing":
        kwargs["label_smoothing"] = 1.5
    elif bad == "no_classes":
        x = torch.randn(4, 0)
    elif bad == "z_loss":
        kwargs["z_loss"] = -1.0
    elif bad == "softcap":
        kwargs["softcap"] = 0.0
    with pytest.raises(expected[0], match=expected[1]):
        vp(x, t, **kwargs)
