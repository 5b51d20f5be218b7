"""Rows longer than one thread block can hold: 128k and 256k vocabularies.

On CUDA, forward_with_grad keeps a row in registers when one block can hold
it (57344 bf16/fp16, 32768 fp32, 8192 fp64 classes). On sm_90 and newer a
longer row is split over a thread-block cluster of 4 or 8 blocks (up to
262144 16-bit, 131072 fp32, 65536 fp64 classes), each holding a slice, with
the row statistics reduced across the cluster; elsewhere it is streamed
twice. The cases below pick class counts on both sides of those limits, odd
ones included (each row then starts at a different offset within 16 bytes,
so the head and tail elements held by the cluster's first block change from
row to row). On the CPU the same cases exercise the row kernel's long rows.
"""

import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch

import fused_ce
from conftest import (assert_close_ref, check_against_torch, make_class_target, make_logits,
                      make_weight, ref_llm)

# name: (C, dtype), and which CUDA kernel takes the row on sm_90+
LONG_ROWS = {
    "bf16-60001": (60001, torch.bfloat16),    # just past one block: a cluster of 4 blocks of 256
    "bf16-128256": (128256, torch.bfloat16),  # Llama 3's vocabulary: 8 blocks of 256
    "fp16-200003": (200003, torch.float16),   # 8 blocks of 512
    "fp32-40000": (40000, torch.float32),     # past the 32768 of one block: 8 blocks of 256
    "fp64-9001": (9001, torch.float64),       # past the 8192 of one block: 4 blocks of 256
    "bf16-270000": (270000, torch.bfloat16),  # past every cluster: streamed twice
}
ROWS = 5


def _case(name, device):
    C, dtype = LONG_ROWS[name]
    x = make_logits((ROWS, C), dtype, device)
    return C, dtype, x


@pytest.mark.parametrize("name", list(LONG_ROWS))
def test_weight_smoothing_ignored_rows(device, name):
    C, dtype, x = _case(name, device)
    t = make_class_target((ROWS,), C, device, ignore_index=-100, ignore_frac=0.3)
    check_against_torch(fused_ce, x, t, make_weight(C, dtype, device), reduction="mean",
                        ignore_index=-100, label_smoothing=0.1, what=name)


@pytest.mark.parametrize("name", list(LONG_ROWS))
def test_z_loss_and_softcap(device, name):
    C, dtype, x = _case(name, device)
    t = make_class_target((ROWS,), C, device)
    opts = dict(reduction="sum", z_loss=1e-3, softcap=20.0)
    xl = x.detach().requires_grad_()
    loss = fused_ce.cross_entropy(xl, t, **opts)
    (grad,) = torch.autograd.grad(loss, xl)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    ref, _ = ref_llm(x64, t.cpu(), **opts)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert_close_ref(loss, ref.detach(), dtype, what=f"{name}: loss", floor=1.0)
    assert_close_ref(grad, ref_grad, dtype, what=f"{name}: grad_input")


@pytest.mark.parametrize("name", list(LONG_ROWS))
def test_gradient_in_place(device, name):
    # every block of a cluster reads the target logit, which may lie in another block's slice:
    # that read must happen before the other block overwrites it with its gradient
    C, dtype, x = _case(name, device)
    t = make_class_target((ROWS,), C, device)
    t[1] = C - 1  # in the last block's slice, and in the row's tail for most phases
    t[2] = 0      # in the first block's head or first slot
    xl = x.detach().clone().requires_grad_()
    fused_ce.cross_entropy(xl, t, label_smoothing=0.05, inplace_backward=True).backward()
    x64 = x.detach().to("cpu", torch.float64).requires_grad_()
    ref, _ = ref_llm(x64, t.cpu(), label_smoothing=0.05)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert_close_ref(xl.grad, ref_grad, dtype, what=f"{name}: in-place gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
@pytest.mark.parametrize("name", ["bf16-128256", "fp32-40000"])
def test_cuda_cluster_rows_are_reproducible(name):
    # the cluster folds its blocks' statistics in rank order: the same bits on every call
    C, dtype, x = _case(name, "cuda")
    t = make_class_target((ROWS,), C, "cuda", ignore_index=-100)
    runs = []
    for _ in range(3):
        xl = x.detach().requires_grad_()
        loss = fused_ce.cross_entropy(xl, t, label_smoothing=0.1)
        loss.backward()
        runs.append((loss.detach(), xl.grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1]), f"{name}: results differ"


_KERNELS_OF_ONE_STEP = """
import torch, fused_ce
from torch.profiler import profile, ProfilerActivity
x = torch.randn(4, 128256, device="cuda", dtype=torch.{dtype}, requires_grad=True)
t = torch.randint(0, 128256, (4,), device="cuda")
fused_ce.cross_entropy(x, t).backward()  # warm-up: module loading
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    fused_ce.cross_entropy(x, t).backward()
    torch.cuda.synchronize()
for event in prof.events():
    if event.device_type == torch.autograd.DeviceType.CUDA:
        print(event.name)
"""


def _kernel_names(clusters_env, dtype="bfloat16"):
    env = {key: value for key, value in os.environ.items() if key != "FUSED_CE_CUDA_CLUSTERS"}
    if clusters_env is not None:
        env["FUSED_CE_CUDA_CLUSTERS"] = clusters_env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _KERNELS_OF_ONE_STEP.format(dtype=dtype)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available (no GPU on this machine)")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="thread-block clusters need sm_90 or newer")
def test_cuda_128k_rows_take_the_cluster_kernel():
    # the cluster path must really run where it can (a failed capability check would silently
    # stream every long row twice), and FUSED_CE_CUDA_CLUSTERS=0 must turn it off
    # Four processes (the setting is read once per process), run side by side: one after
    # another they took 119 s of the 120 s test limit under 16 pytest workers.
    configurations = [("1", "bfloat16"), ("0", "bfloat16"), (None, "float32"), (None, "bfloat16")]
    with concurrent.futures.ThreadPoolExecutor(len(configurations)) as pool:
        on, off, default_fp32, default_bf16 = pool.map(lambda c: _kernel_names(*c), configurations)
    assert "resident" in on, f"no register-resident kernel in the step:\n{on}"
    assert "resident" not in off and "stream" in off, f"FUSED_CE_CUDA_CLUSTERS=0 ran:\n{off}"
    # Unset, the measured choice (cluster_plan): float32 rows in clusters,
    # 16-bit rows past one block streamed.
    assert "resident" in default_fp32, f"float32 rows ran:\n{default_fp32}"
    assert "resident" not in default_bf16 and "stream" in default_bf16, f"bfloat16 rows ran:\n{default_bf16}"
