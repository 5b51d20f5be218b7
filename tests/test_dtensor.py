"""fused_ce.cross_entropy on DTensors, against F.cross_entropy on the full tensors.

Gloo workers on the CPU (tests/gloo_workers.py), spawned once per mesh: 2
ranks on a 1-D mesh and 4 on a 2 x 2 one. Every rank builds each case's full
tensors from the case's seed, distributes them with the case's placements,
computes the loss and its gradient for a random upstream gradient, and
saves the full loss, the full gradient and the placements; the tests below
compare them with PyTorch in float64.
"""

import math
import os
import traceback
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_ref, make_class_target, make_logits, make_prob_target, ref_llm
from gloo_workers import finish, init_gloo, run_workers

SPAWN_TIMEOUT_S = 150

# name -> (mesh shape, logits shape, input placements, target placements, options). Placements:
# "R" replicate, "S<d>" shard dimension d. Options: reduction, weight, ignore (a fraction of the
# targets ignored, or "all"), label_smoothing, z_loss, softcap, soft (probability targets), dtype.
CASES = {
    "batch-mean": ((2,), (8, 11), "S0", "S0", dict(weight=True, ignore=0.25, label_smoothing=0.1)),
    "batch-sum-uneven": ((2,), (7, 11), "S0", "S0", dict(reduction="sum", ignore=0.25)),
    "batch-none": ((2,), (8, 11), "S0", "S0", dict(reduction="none", weight=True)),
    "batch-target-replicated": ((2,), (8, 11), "S0", "R", dict(ignore=0.25)),
    "replicated": ((2,), (6, 9), "R", "R", dict(z_loss=1e-2, softcap=3.0)),
    "vocab-mean": ((2,), (6, 12), "S1", "R", dict(ignore=0.25, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)),
    "vocab-none": ((2,), (6, 12), "S1", "R", dict(reduction="none")),
    "vocab-target-sharded": ((2,), (6, 12), "S1", "S0", dict(reduction="sum")),
    "vocab-spatial": ((2,), (3, 12, 4), "S1", "R", dict(ignore=0.25)),
    "vocab-weight-gathered": ((2,), (6, 12), "S1", "R", dict(weight=True)),
    "vocab-uneven-gathered": ((2,), (6, 7), "S1", "R", dict()),
    "unbatched-vocab": ((2,), (12,), "S0", "R", dict(label_smoothing=0.2)),
    "spatial-shard": ((2,), (3, 5, 6), "S2", "S1", dict(weight=True, ignore=0.25)),
    "probabilities": ((2,), (8, 6), "S0", "S0", dict(soft=True, label_smoothing=0.2)),
    "probabilities-vocab-gathered": ((2,), (8, 6), "S1", "S1", dict(soft=True, reduction="sum")),
    "all-ignored": ((2,), (6, 5), "S0", "S0", dict(ignore="all")),
    "bfloat16": ((2,), (8, 16), "S0", "S0", dict(dtype=torch.bfloat16, ignore=0.25)),
    "mesh2d-batch-vocab": ((2, 2), (8, 12), "S0,S1", "S0,R", dict(ignore=0.25, label_smoothing=0.1)),
    "mesh2d-batch-replicated": ((2, 2), (8, 12), "S0,R", "S0,R", dict(reduction="none")),
    # A mesh dimension of one rank holds the full tensors, whatever their placements there: no
    # vocabulary-parallel loss, nothing redistributed.
    "one-rank-classes": ((2, 1), (8, 12), "S0,S1", "S0,S0", dict(ignore=0.25, label_smoothing=0.1)),
    "one-rank-batch-none": ((2, 1), (8, 12), "R,S0", "R,S0", dict(reduction="none")),
}


def _placements(text):
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in text.split(",")]


def _full_inputs(name):
    """The case's full logits, target, weight, upstream gradient and loss options."""
    _, shape, _, _, spec = CASES[name]
    torch.manual_seed(zlib.crc32(name.encode()))
    dtype = spec.get("dtype", torch.float32)
    x = make_logits(shape, dtype)
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    batch = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if spec.get("soft"):
        t = make_prob_target(shape, dtype)
    elif spec.get("ignore") == "all":
        t = torch.full(batch, -100)
    else:
        t = make_class_target(batch, num_classes, ignore_index=-100 if spec.get("ignore") else None,
                              ignore_frac=spec.get("ignore") or 0.25)
    options = dict(reduction=spec.get("reduction", "mean"), label_smoothing=spec.get("label_smoothing", 0.0))
    if spec.get("weight"):
        options["weight"] = torch.rand(num_classes, dtype=dtype) + 0.5
    llm = dict(z_loss=spec.get("z_loss", 0.0), softcap=spec.get("softcap"))
    g = torch.randn(batch if options["reduction"] == "none" else (), dtype=dtype)
    return x, t, g, options, llm


# --------------------------------------------------------------------------
# The spawned side.


def _run_case(name, mesh):
    from unittest import mock

    from torch.distributed.tensor import distribute_tensor

    import fused_ce
    from fused_ce import distributed

    _, _, in_placements, target_placements, _ = CASES[name]
    x, t, g, options, llm = _full_inputs(name)
    dx = distribute_tensor(x, mesh, _placements(in_placements)).requires_grad_()
    dt = distribute_tensor(t, mesh, _placements(target_placements))
    with mock.patch.object(distributed, "vocab_parallel_cross_entropy",
                           wraps=distributed.vocab_parallel_cross_entropy) as vocab_parallel:
        loss = fused_ce.cross_entropy(dx, dt, **options, **llm)
    (grad,) = torch.autograd.grad(loss, dx, distribute_tensor(g, mesh, loss.placements))
    return {"loss": loss.full_tensor().detach(), "grad": grad.full_tensor(),
            "loss_placements": [repr(p) for p in loss.placements],
            "grad_placements": [repr(p) for p in grad.placements],
            "vocab_parallel": vocab_parallel.called}


def _worker(rank, world_size, workdir):
    if not init_gloo(rank, world_size, workdir):
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import fused_ce

    with open(os.path.join(workdir, "mesh.txt")) as f:
        mesh_shape = tuple(int(size) for size in f.read().split("x"))
    mesh = init_device_mesh("cpu", mesh_shape)
    out = {"cases": {}}
    for name, spec in CASES.items():
        if spec[0] != mesh_shape:
            continue
        try:
            out["cases"][name] = _run_case(name, mesh)
        except Exception:  # noqa: BLE001
            out["cases"][name] = {"exception": traceback.format_exc()}
    if mesh_shape == (2,):
        x = distribute_tensor(torch.randn(4, 6), mesh, _placements("S0"))
        for name, call in {
            "mixed": lambda: fused_ce.cross_entropy(x, torch.zeros(4, dtype=torch.long)),
            "return_lse": lambda: fused_ce.cross_entropy(x, distribute_tensor(torch.zeros(4, dtype=torch.long), mesh,
                                                                              _placements("S0")), return_lse=True),
            "linear": lambda: fused_ce.linear_cross_entropy(x, torch.randn(5, 6), torch.zeros(4, dtype=torch.long)),
        }.items():
            try:
                call()
            except Exception as e:  # noqa: BLE001
                out[name] = (type(e).__name__, str(e))
    finish(out, rank, workdir)


# --------------------------------------------------------------------------
# The parent side.


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    cache = {}

    def get(mesh_shape):
        if mesh_shape not in cache:
            name = "x".join(map(str, mesh_shape))
            workdir = tmp_path_factory.mktemp("dtensor_" + name)
            with open(os.path.join(workdir, "mesh.txt"), "w") as f:
                f.write(name)
            cache[mesh_shape] = run_workers(_worker, math.prod(mesh_shape), workdir, SPAWN_TIMEOUT_S)
        return cache[mesh_shape]

    return get


def _reference(name):
    x, t, g, options, llm = _full_inputs(name)
    x64 = x.double().requires_grad_()
    if "weight" in options:
        options["weight"] = options["weight"].double()
    t64 = t.double() if t.is_floating_point() else t
    if llm["z_loss"] or llm["softcap"]:
        loss, _ = ref_llm(x64, t64, **options, **llm)
    else:
        loss = F.cross_entropy(x64, t64, **options)
    (grad,) = torch.autograd.grad(loss, x64, g.double())
    return loss.detach(), grad, x.dtype


@pytest.mark.parametrize("name", list(CASES))
def test_dtensor_loss_and_gradient_match_torch(spawned, name):
    mesh_shape, _, in_placements, _, spec = CASES[name]
    want_loss, want_grad, dtype = _reference(name)
    for rank, result in enumerate(spawned(mesh_shape)):
        case = result["cases"][name]
        assert "exception" not in case, f"{name}: rank {rank} raised:\n{case['exception']}"
        tag = f"{name} rank {rank}"
        if spec.get("ignore") == "all":
            # PyTorch: the mean over no counted element is NaN, its gradient 0.
            assert case["loss"].isnan(), tag
            assert torch.equal(case["grad"], torch.zeros_like(case["grad"])), tag
            continue
        assert_close_ref(case["loss"], want_loss, dtype, what=f"{tag} loss")
        assert_close_ref(case["grad"], want_grad, dtype, what=f"{tag} gradient")
        # The gradient keeps the logits' placements; a reduced loss is replicated, a
        # per-element one sharded like the logits' batch.
        assert case["grad_placements"] == [repr(p) for p in _placements(in_placements)], tag
        if spec.get("reduction") != "none":
            assert all(p.startswith("Replicate") for p in case["loss_placements"]), tag
        else:  # the logits' batch dimensions' shards (the class dimension is 1 here), else replicated
            want = [f"Shard(dim={int(p[1:]) - (int(p[1:]) > 1)})" if p.startswith("S") and p != "S1"
                    else "Replicate()" for p in in_placements.split(",")]
            assert case["loss_placements"] == want, (tag, case["loss_placements"])
        # Logits split by class take the vocabulary-parallel loss (no logit gathered) unless their
        # options need the classes gathered (or one rank holds them all).
        split_classes = "vocab" in name and "gathered" not in name
        assert case["vocab_parallel"] == split_classes, tag


@pytest.mark.parametrize("call, error, words", [
    ("mixed", "RuntimeError", "mixed torch.Tensor and DTensor"),
    ("return_lse", "NotImplementedError", "return_lse and inplace_backward are not supported"),
    ("linear", "NotImplementedError", "DTensor arguments are not supported"),
])
def test_what_dtensors_do_not_take_raises_clearly(spawned, call, error, words):
    for result in spawned((2,)):
        kind, message = result[call]
        assert kind == error and words in message, (kind, message)
