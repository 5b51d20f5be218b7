"""vocab_parallel_cross_entropy forward + backward on one gloo rank (the whole vocabulary), against
fused_ce.cross_entropy and eager F.cross_entropy on the same logits; best of 3 rounds, ms per step."""
import os, sys, time, torch, torch.distributed as dist, torch.nn.functional as F
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1] if len(sys.argv) > 1 else "29570", RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
import fused_ce
from fused_ce.distributed import vocab_parallel_cross_entropy
def bench(fn, n=5):
    for _ in range(2): fn()
    best = 1e9
    for _ in range(3):
        s = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - s) / n * 1e3)
    return best
torch.manual_seed(0)
for dtype, opts in [(torch.float32, {}), (torch.float32, dict(label_smoothing=0.1)), (torch.bfloat16, dict(z_loss=1e-4))]:
    x = torch.randn(2048, 32000, dtype=dtype, requires_grad=True); t = torch.randint(0, 32000, (2048,))
    out = torch.empty_like(x)
    def copy(): out.copy_(x.detach())
    def vp():
        x.grad = None; vocab_parallel_cross_entropy(x, t, **opts).backward()
    def fused():
        x.grad = None; fused_ce.cross_entropy(x, t, **opts).backward()
    print(f"2048x32000 {dtype} {opts}: copy {bench(copy):.1f}, vocab_parallel {bench(vp):.1f}, fused_ce {bench(fused):.1f} ms")
dist.destroy_process_group()
