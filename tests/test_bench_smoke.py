"""The benchmark CLI (the README's main job) runs end to end and writes its files.

Timings are not asserted (they belong to benchmarks, not tests); parity is:
--strict makes the run fail when any implementation disagrees with eager.
"""

import json
import os
import subprocess
import sys


def test_bench_cli_small_run(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "fused_ce.bench", "--shapes", "64x100,4x3x5x5:bf16",
           "--label-smoothing", "0.1", "--repeat", "5", "--warmup", "1", "--no-compile",
           "--no-memory", "--no-plot", "--strict", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in ("results.json", "results.md", "table.txt"):
        assert (out / name).is_file(), f"bench did not write {name}"
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert "fused_ce" in text and "eager" in text and "copy" in text
    for r in results["results"]:
        if r["status"] != "ok" or r["impl"] == "copy":
            continue
        # The ratio to the copy comes from the copy timed in alternation with this implementation.
        alongside = r["timing"]["alongside"]
        assert alongside["reps"] == r["timing"]["reps"]
        assert abs(r["ratio_to_copy"] - r["timing"]["median_ms"] / alongside["median_ms"]) < 1e-9


def test_measure_alternates_with_the_reference_on_the_buffer_half_a_rotation_away():
    from fused_ce.bench.timing import measure

    log = []
    timing = measure(lambda i: log.append(("step", i)), lambda i: log.append(("prep", i)),
                     buffers=4, device="cpu", warmup=2, repeat=6,
                     alongside=(lambda j: log.append(("ref prep", j)), lambda j: log.append(("ref", j))))
    expected = []
    for k in range(2 + 6):
        i = k % 4
        expected += [("prep", i), ("step", i), ("ref prep", (i + 2) % 4), ("ref", (i + 2) % 4)]
    assert log == expected
    assert timing.n == 6 and len(timing.warmup_ms) == 2
    assert timing.alongside.n == 6 and len(timing.alongside.warmup_ms) == 2
    assert timing.summary()["alongside"]["reps"] == 6
    assert measure(lambda i: None, None, buffers=1, device="cpu", warmup=1, repeat=3).alongside is None


def test_ratio_to_copy_prefers_the_copy_timed_alongside():
    from fused_ce.bench import runner
    from fused_ce.bench.workloads import Workload

    workload = Workload(name="w", family="custom", shape=(8, 100), dtype="fp32")

    def result(impl, median, alongside=None):
        timing = {"median_ms": median, "alongside": {"median_ms": alongside} if alongside else None}
        return runner.Result(workload, "fwd+bwd", impl, timing=timing)

    copy, paired, unpaired = result("copy", 2.0), result("fused_ce", 3.0, 1.5), result("eager", 8.0)
    runner._derive([copy, paired, unpaired])
    assert paired.ratio_to_copy == 2.0  # 3.0 / 1.5, not 3.0 / 2.0
    assert unpaired.ratio_to_copy == 4.0
    assert copy.ratio_to_copy == 1.0
    assert paired.speedup_vs_eager == 8.0 / 3.0


def test_copy_runs_alongside_only_where_the_copy_itself_runs():
    from fused_ce.bench import impls, runner
    from fused_ce.bench.workloads import Workload

    head = Workload(name="head", family="linear", shape=(64, 100), dtype="fp32", hidden=16)
    logits = Workload(name="logits", family="custom", shape=(64, 100), dtype="fp32")
    chosen = [i for i in impls.all_impls() if i.name in ("fused_ce", "eager", "copy")]
    config = runner.Config(modes=("fwd+bwd",), warmup=1, repeat=3, max_time=0, memory=False)
    with open(os.devnull, "w") as quiet:
        results = runner.run([head, logits], chosen, config, progress=runner.Progress(6, stream=quiet))
    for r in results:
        if r.impl == "copy":
            continue
        assert r.ok, r.status
        has_copy = r.workload.name == "logits"  # an LM-head workload has no logits to copy
        assert bool(r.timing["alongside"]) == has_copy
        assert (r.ratio_to_copy is not None) == has_copy


def test_parity_without_a_finite_reference():
    # eager's own loss NaN (float16 means over millions of pixels): no verdict, not a mismatch
    import torch

    from fused_ce.bench import parity

    grad = torch.randn(4, 3)
    fused = parity.Outputs(torch.tensor(2.5), grad)
    eager_nan = parity.Outputs(torch.tensor(float("nan")), grad)
    eager_off = parity.Outputs(torch.tensor(2.0), grad)
    p = parity.compare(fused, eager_nan, torch.float16)
    assert not p.reference_finite and "not finite" in p.short()
    q = parity.compare(fused, eager_off, torch.float16)
    assert q.reference_finite and not q.ok and q.short().startswith("MISMATCH")
    r = parity.compare(parity.Outputs(torch.tensor(float("nan")), grad), eager_nan, torch.float16)
    assert r.reference_finite and r.ok  # both NaN: the same result


def test_lm_head_with_softcap_and_z_loss_matches_eager():
    # An LM-head workload with the large-vocabulary options: fused_ce.linear_cross_entropy
    # gets them, eager and torch.compile apply them around F.cross_entropy, torch's own
    # chunked head (which has neither) is marked n/a; parity is checked on every result.
    from fused_ce.bench import impls, runner
    from fused_ce.bench.workloads import Workload

    head = Workload(name="head-softcap", family="linear", shape=(64, 100), dtype="fp32", hidden=16,
                    z_loss=1e-3, softcap=5.0)
    chosen = [i for i in impls.all_impls() if i.name in ("fused_ce", "eager", "torch_chunked")]
    config = runner.Config(modes=("fwd+bwd",), warmup=1, repeat=3, max_time=0, memory=False)
    with open(os.devnull, "w") as quiet:
        results = runner.run([head], chosen, config, progress=runner.Progress(3, stream=quiet))
    by_impl = {r.impl: r for r in results}
    assert by_impl["fused_ce"].ok, by_impl["fused_ce"].status
    assert by_impl["fused_ce"].parity is not None and by_impl["fused_ce"].parity["ok"], by_impl["fused_ce"].parity
    assert not by_impl["torch_chunked"].ok and "softcap" in by_impl["torch_chunked"].status
