"""First look at the CUDA kernels on a GPU machine, before the test suite.

Runs one small case through each kernel path the launchers can pick (one
thread per row, 8 lanes, a warp, a block; register-resident and streaming
forward_with_grad; class-strided (N, C, H, W); probability targets; the
softcap; the in-place gradient) and prints, per case, the largest error of
the loss and the gradient against float64 PyTorch on the CPU.  Each case is
run in its own try block, so one failing path does not hide the others; an
asynchronous CUDA error (illegal address) ends the script, naming the case.

    python scripts/gpu_smoke.py
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import zlib

import torch
import torch.nn.functional as F

import fused_ce

# The device under test (cpu runs the same script against the CPU kernels).
DEVICE = os.environ.get("SMOKE_DEVICE", "cuda")
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def relative_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(r)):
        return float("inf")
    fin = torch.isfinite(r)
    scale = r[fin].abs().max().clamp_min(1e-12) if fin.any() else 1.0
    return float(((a[fin] - r[fin]).abs().max() / scale) if fin.any() else 0.0)


def run_case(name, shape, dtype, *, classes_dim=1, prob=False, inplace=False, weight=False, **options):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x_cpu = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    C = shape[classes_dim] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if prob:
        t_cpu = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), classes_dim).to(dtype)
    else:
        t_cpu = torch.randint(0, C, target_shape, generator=gen)
        if t_cpu.numel() > 2:
            t_cpu.view(-1)[::3] = -100
    softcap = options.pop("softcap", None)
    reduction = options.pop("reduction", "mean")
    # Class weights in the input dtype, as fused_ce takes them; the reference gets them in float64.
    w_cpu = torch.rand(C, generator=gen, dtype=torch.float64).add(0.5).to(dtype) if weight else None

    x64 = x_cpu.double().requires_grad_()
    xr = softcap * torch.tanh(x64 / softcap) if softcap else x64
    ref = F.cross_entropy(xr, t_cpu.double() if prob else t_cpu, reduction=reduction,
                          weight=None if w_cpu is None else w_cpu.double(), **options)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)

    x = x_cpu.to(DEVICE).requires_grad_()
    t = t_cpu.to(DEVICE)
    extra = {"softcap": softcap} if softcap else {}
    if w_cpu is not None:
        extra["weight"] = w_cpu.to(DEVICE)
    if inplace:
        extra["inplace_backward"] = True
    # The in-place gradient overwrites its input, which must not be a leaf.
    logits = x.clone() if inplace else x
    loss = fused_ce.cross_entropy(logits, t, reduction=reduction, **options, **extra)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    err_loss, err_grad = relative_error(loss, ref), relative_error(grad, ref_grad)
    ok = err_loss <= TOL[dtype] and err_grad <= TOL[dtype] and grad.shape == x.shape
    print(f"{'ok  ' if ok else 'FAIL'} {name:<34} loss err {err_loss:.2e}  grad err {err_grad:.2e}")
    return ok


CASES = [
    ("tiny rows fp32 (1 thread/row)", (513, 10), torch.float32, {}),
    ("tiny rows bf16 smoothing", (513, 24), torch.bfloat16, {"label_smoothing": 0.1}),
    ("8 lanes fp32 C=100", (300, 100), torch.float32, {}),
    ("warp fp32 C=1000 weight", (300, 1000), torch.float32, {"weight": True}),
    ("resident bf16 C=32000", (64, 32000), torch.bfloat16, {}),
    ("resident bf16 C=50257 (odd)", (16, 50257), torch.bfloat16, {"label_smoothing": 0.1}),
    ("resident fp32 C=32000", (64, 32000), torch.float32, {}),
    ("streaming fp32 C=40000", (16, 40000), torch.float32, {}),
    ("streaming bf16 C=128256", (8, 128256), torch.bfloat16, {}),
    ("fp64 C=3000", (32, 3000), torch.float64, {}),
    ("fp16 C=5000 sum", (32, 5000), torch.float16, {"reduction": "sum"}),
    ("class-strided (N,C,H,W) fp32", (2, 21, 9, 13), torch.float32, {}),
    ("class-strided fp16 none", (2, 7, 16, 16), torch.float16, {"reduction": "none"}),
    ("prob targets fp32 C=3000", (40, 3000), torch.float32, {"prob": True}),
    ("prob targets bf16 C=12", (40, 12), torch.bfloat16, {"prob": True}),
    ("softcap bf16 C=32000", (32, 32000), torch.bfloat16, {"softcap": 30.0}),
    ("in place bf16 C=32000", (32, 32000), torch.bfloat16, {"inplace": True}),
    ("unbatched fp32 C=77", (77,), torch.float32, {}),
]


LINEAR_CASE = "linear_cross_entropy bf16, 3 chunks"


def run_linear_case() -> bool:
    """linear_cross_entropy in bfloat16 over several chunks against F.linear + the loss in float64,
    and which form of the float32 weight-gradient accumulation the installed torch accepted."""
    from fused_ce.linear import _REFUSED_ACCUMULATIONS, linear_cross_entropy

    gen = torch.Generator().manual_seed(7)
    h_cpu = torch.randn(96, 64, generator=gen, dtype=torch.float64).bfloat16()
    w_cpu = (torch.randn(3000, 64, generator=gen, dtype=torch.float64) / 8).bfloat16()
    t_cpu = torch.randint(0, 3000, (96,), generator=gen)
    h64, w64 = h_cpu.double().requires_grad_(), w_cpu.double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64), t_cpu)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h64, w64))
    h, w = h_cpu.to(DEVICE).requires_grad_(), w_cpu.to(DEVICE).requires_grad_()
    loss = linear_cross_entropy(h, w, t_cpu.to(DEVICE), chunk_size=32)
    gh, gw = torch.autograd.grad(loss, (h, w))
    errors = [relative_error(loss, ref), relative_error(gh, ref_gh), relative_error(gw, ref_gw)]
    ok = max(errors) <= TOL[torch.bfloat16]
    refused = sorted(name for device, _, name in _REFUSED_ACCUMULATIONS if device == DEVICE) or "none"
    print(f"{'ok  ' if ok else 'FAIL'} {LINEAR_CASE:<34} loss err {errors[0]:.2e}  "
          f"grad err {max(errors[1:]):.2e}  (accumulation forms refused: {refused})")
    return ok


def main() -> int:
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {where}, fused_ce built with CUDA: {fused_ce.built_with_cuda()}")
    runs = [(name, functools.partial(run_case, name, shape, dtype, **opts)) for name, shape, dtype, opts in CASES]
    runs.append((LINEAR_CASE, run_linear_case))
    failures = 0
    for name, run in runs:
        try:
            failures += not run()
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures += 1
            print(f"FAIL {name:<34} {type(exc).__name__}: {str(exc)[:300]}")
            if "CUDA error" in str(exc) or "AcceleratorError" in type(exc).__name__:
                traceback.print_exc()
                print("asynchronous CUDA error: later cases cannot run in this process")
                return 1
    print(f"{len(runs) - failures}/{len(runs)} smoke cases ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
