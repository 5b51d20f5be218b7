"""Open bug (2026-11-26, H100; again 2026-11-27): a direct call of torch.ops.fused_ce.scale_gradient_ on CUDA with
bad arguments (the two-element scale of tests/test_scale_gradient.py::test_rejects_bad_arguments)
crashed its process with a segmentation fault instead of raising RuntimeError. Each case below is
one call; run it from a given index on so that a crash does not hide the later ones:

    python3 scripts/repro_scale_gradient_crash.py 0   (scripts/gpu_check.sh's repro stage goes on after a crash)
"""
import faulthandler
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
faulthandler.enable()
import torch  # noqa: E402

import fused_ce  # noqa: E402,F401
ops = torch.ops.fused_ce


def cuda(*values, **kwargs):
    return torch.tensor(*values, device="cuda", **kwargs)


def forward(target, weight):
    """The CUDA forward operator on 4 rows of 5 classes."""
    return ops.cross_entropy_forward(torch.randn(4, 5, 1, device="cuda"), target, weight, -100, 0.0, 0.0, 0.0)


# Session 27 (2026-11-27): the extension now formats the numbers of its messages
# itself (csrc/error_message.h); every case below should raise, none crash.
# Session 26 (2026-11-27): every crashing call's message streamed an integer
# (an element count, a size), every one that raised streams only devices,
# dtypes and text. The suspect: the extension's iostream calls bind to a
# second libstdc++ in the process's global symbol scope. These cases show
# whether CPU tensors crash too; the stage in scripts/gpu_check.sh also
# records (LD_DEBUG=bindings) where the extension's `ostream << long` binds.
maps = open("/proc/self/maps").read().splitlines()
print("libstdc++ copies mapped:", sorted({line.split()[-1] for line in maps if "libstdc++" in line}), flush=True)

class_target = torch.zeros(4, 1, dtype=torch.long, device="cuda")
cases = [
    ("cuda grad, cuda scale", lambda: ops.scale_gradient_(torch.randn(8, device="cuda"), cuda(2.0))),
    ("cuda grad, two-element scale", lambda: ops.scale_gradient_(torch.randn(8, device="cuda"), cuda([2.0, 3.0]))),
    ("cuda grad, cpu scale", lambda: ops.scale_gradient_(torch.randn(8, device="cuda"), torch.tensor(2.0))),
    ("cpu grad, cuda scale", lambda: ops.scale_gradient_(torch.randn(8), cuda(2.0))),
    ("fwd op, cuda input, cpu weight", lambda: forward(class_target, torch.ones(5))),
    # Session 25: the crashing messages were the two that streamed a tensor's
    # shape (now element counts). These stream a shape or a dtype from the
    # CUDA binding itself.
    ("fwd op, weight of 4 for 5 classes (shape in the message)",
     lambda: forward(class_target, torch.ones(4, device="cuda"))),
    ("fwd op, target of shape (3, 1) (shape in the message)",
     lambda: forward(torch.zeros(3, 1, dtype=torch.long, device="cuda"), None)),
    ("fwd op, int32 target (dtype in the message)", lambda: forward(class_target.int(), None)),
    ("reduce_loss, two-element total_weight",
     lambda: ops.reduce_loss(torch.rand(10, device="cuda"), torch.ones(2, device="cuda"), 1, torch.float32)),
    ("reduce_loss, int64 dtype (dtype in the message)",
     lambda: ops.reduce_loss(torch.rand(10, device="cuda"), cuda(4.0), 1, torch.int64)),
    ("cpu grad, two-element cpu scale (an integer in the message, no CUDA tensor)",
     lambda: ops.scale_gradient_(torch.randn(8), torch.tensor([2.0, 3.0]))),
    ("reduce_loss on the cpu, reduction 7 (an integer in the message)",
     lambda: ops.reduce_loss(torch.rand(10), torch.tensor(4.0), 7, torch.float32)),
]
for name, fn in cases[int(sys.argv[1]):]:
    print("calling:", name, flush=True)
    try:
        fn(); torch.cuda.synchronize(); print("  no error", flush=True)
    except Exception as e:
        print("  raised", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
