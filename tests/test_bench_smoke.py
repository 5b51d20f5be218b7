"""The benchmark CLI (the README's main job) runs end to end and writes its files.

Timings are not asserted (they belong to benchmarks, not tests); parity is:
--strict makes the run fail when any implementation disagrees with eager.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_SKIP_REASON


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


def test_class_last_workloads_pass_a_view_of_class_last_logits(tmp_path):
    from fused_ce.bench import workloads

    chosen = workloads.with_options(workloads.parse_shapes("8x10,2x7x3x4"), class_last=True)
    assert [w.class_last for w in chosen] == [False, True]  # 2-D logits have no other layout
    assert chosen[1].name == "2x7x3x4-fp32-class-last"
    x = workloads.make_inputs(chosen[1], "cpu", buffers=1).logits[0]
    assert x.shape == (2, 7, 3, 4) and x.movedim(1, -1).is_contiguous()
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "fused_ce.bench", "--shapes", "2x7x3x4", "--class-last", "--repeat", "3",
           "--warmup", "1", "--no-compile", "--no-memory", "--no-plot", "--strict", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "2x7x3x4-fp32-class-last" in (out / "table.txt").read_text()


def test_graphed_mode_is_opt_in_and_needs_cuda():
    from fused_ce.bench import cli, runner, steps

    # Not in the default run; on the CPU the parser refuses it, naming why.
    assert steps.GRAPHED in steps.MODES and steps.GRAPHED not in steps.DEFAULT_MODES
    assert runner.Config().modes == steps.DEFAULT_MODES
    assert cli.parser().parse_args([]).modes == ",".join(steps.DEFAULT_MODES)
    proc = subprocess.run([sys.executable, "-m", "fused_ce.bench", "--quick", "--modes", "fwd+bwd,graphed"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "graphed need --device cuda" in proc.stderr, proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
def test_graphed_mode_replays_the_step(tmp_path):
    # Each implementation's step captured in CUDA graphs, the copy beside it too; the
    # replayed step leaves the gradient the step itself gives.
    from fused_ce.bench import impls, runner, steps
    from fused_ce.bench.workloads import Workload, make_inputs

    workload = Workload(name="w", family="custom", shape=(4096, 10), dtype="fp32")
    chosen = [i for i in impls.all_impls() if i.name in ("fused_ce", "eager", "copy")]
    config = runner.Config(device="cuda", modes=(steps.FWD_BWD, steps.GRAPHED), warmup=1, repeat=5,
                           max_time=0, memory=True)
    with open(os.devnull, "w") as quiet:
        results = runner.run([workload], chosen, config, progress=runner.Progress(6, stream=quiet))
    for r in results:
        assert r.ok, (r.mode, r.impl, r.status)
        if r.impl != "copy":
            assert r.timing["alongside"]["reps"] == r.timing["reps"] == 5
            assert (r.memory is None) == (r.mode == steps.GRAPHED)
    launched, replayed = (r for r in results if r.impl == "copy")
    assert launched.timing is not replayed.timing  # the copy is measured captured too

    inputs = make_inputs(workload, "cuda", 2, seed=0)
    fn = next(i for i in chosen if i.name == "fused_ce").build_for(workload, inputs)
    x, t = inputs.logits[1], inputs.targets[1]
    x.requires_grad_(True)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t), x)[0]
    _, replay = steps.make(fn, steps.GRAPHED, inputs)
    replay(1)
    torch.cuda.synchronize()
    torch.testing.assert_close(x.grad, expected)


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
    # (Before torch 2.13 there is no chunked head at all, which the status says instead.)
    chunked_status = by_impl["torch_chunked"].status
    assert not by_impl["torch_chunked"].ok
    assert "softcap" in chunked_status or "not available in torch" in chunked_status, chunked_status


def _fake_peer_modules(monkeypatch, calls):
    """Stand-ins for Liger-Kernel and Cut Cross-Entropy (GPU-only Triton packages, not installed
    here) with their signatures, computing in torch: they record what the benchmark passes."""
    import types

    import torch
    import torch.nn.functional as F

    def capped(x, softcap):
        return x if not softcap else softcap * torch.tanh(x / softcap)

    def liger_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, softcap=None):
        calls.append(("liger_cross_entropy", dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
                                                  label_smoothing=label_smoothing, softcap=softcap)))
        return F.cross_entropy(capped(input, softcap), target, weight=weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                                         label_smoothing=0.0, reduction="mean", softcap=None):
        calls.append(("liger_fused_linear_cross_entropy", dict(softcap=softcap, ce_weight=ce_weight)))
        return F.cross_entropy(capped(F.linear(input, weight, bias), softcap), target, weight=ce_weight,
                               ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)

    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                             filter_eps="high"):
        calls.append(("cut_cross_entropy", dict(softcap=softcap, ignore_index=ignore_index)))
        return F.cross_entropy(capped(F.linear(e, c), softcap), targets, ignore_index=ignore_index,
                               reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_cross_entropy = liger_cross_entropy
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = linear_cross_entropy
    for name, module in (("liger_kernel", types.ModuleType("liger_kernel")),
                         ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                         ("liger_kernel.transformers.functional", functional), ("cut_cross_entropy", cce)):
        monkeypatch.setitem(sys.modules, name, module)


def test_peer_libraries_get_the_workloads_options(monkeypatch):
    # The peers are GPU-only and absent here: their stand-ins check that each gets the
    # workload's options (and the LM head's weight) and that its loss is eager's.
    import torch

    from fused_ce.bench import impls
    from fused_ce.bench.workloads import Workload, make_inputs

    calls = []
    _fake_peer_modules(monkeypatch, calls)
    liger, cce, eager = impls.Liger(), impls.CutCrossEntropy(), impls.Eager()
    assert liger.unavailable("cpu") == "n/a (GPU only)" and liger.unavailable("cuda") is None
    assert cce.unavailable("cuda") is None
    cases = [
        (liger, Workload(name="w", family="lm", shape=(8, 50), dtype="fp32", weighted=True, label_smoothing=0.1,
                         softcap=4.0, ignore_fraction=0.25), "liger_cross_entropy"),
        (liger, Workload(name="seg", family="segmentation", shape=(2, 5, 3, 3), dtype="fp32"), "liger_cross_entropy"),
        (liger, Workload(name="head", family="linear", shape=(8, 50), dtype="fp32", hidden=6, weighted=True,
                         softcap=3.0), "liger_fused_linear_cross_entropy"),
        (cce, Workload(name="head", family="linear", shape=(8, 50), dtype="fp32", hidden=6, softcap=3.0,
                       ignore_fraction=0.25), "cut_cross_entropy"),
    ]
    for impl, workload, called in cases:
        assert impl.unsupported(workload) is None, (impl.name, workload.name)
        inputs = make_inputs(workload, "cpu", buffers=1)
        x, t = inputs.logits[0], inputs.targets[0]
        calls.clear()
        ours = impl.build_for(workload, inputs)(x, t)
        assert [name for name, _ in calls] == [called]
        if workload.softcap:
            assert calls[0][1]["softcap"] == workload.softcap
        torch.testing.assert_close(ours, eager.build_for(workload, inputs)(x, t), rtol=1e-5, atol=1e-6)
    z_loss = Workload(name="z", family="linear", shape=(8, 50), dtype="fp32", hidden=6, z_loss=1e-4)
    assert "n/a" in liger.unsupported(z_loss) and "n/a" in cce.unsupported(z_loss)
    assert "not logits" in cce.unsupported(Workload(name="l", family="lm", shape=(8, 50), dtype="fp32"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_per_call_cost_runs_every_path_and_restores_the_shortcut(reduction):
    # The per-call script (benchmarks/per_call_cost.py, the GPU check's percall stage) runs each
    # path; the path with every check switches the plain-call shortcut off while it is timed only.
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "per_call_cost.py")
    code = (f"import runpy, sys; from fused_ce import functional; shortcut = functional._plain_call; "
            f"sys.argv = ['per_call_cost', '--steps', '20', '--rounds', '1', '--reduction', {reduction!r}]; "
            f"runpy.run_path({script!r}, run_name='__main__'); "
            f"assert functional._plain_call is shortcut, 'the shortcut was not restored'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"per_call_cost failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:]]
    assert rows == ["eager", "fused_ce.cross_entropy", "with", "CrossEntropyFunction.apply"], proc.stdout


def test_check_targets_gives_each_targets_verdict(tmp_path, capsys, monkeypatch):
    # benchmarks/check_targets.py on made-up results: each bound's both sides, and a missing
    # workload reported as not measured, never as met.
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    import check_targets
    from fused_ce.bench.runner import Result
    from fused_ce.bench.workloads import Workload

    def result(workload, mode, impl, ms, **derived):
        return Result(workload, mode, impl, timing={"median_ms": ms}, **derived)

    big = Workload("lm-128k-bf16", "lm", (16384, 128256), "bf16")
    small = Workload("cls-10-fp32", "classifier", (65536, 10), "fp32")
    rows = 65536 * 64
    results = [
        result(big, "fwd+bwd", "fused_ce", 4.0, ratio_to_copy=1.55, speedup_vs_eager=2.9,
               memory={"peak_bytes": big.logits_bytes + 1000}),
        result(big, "fwd+bwd", "compile", 5.0),
        result(small, "fwd+bwd", "fused_ce", 0.2, ratio_to_copy=6.0, speedup_vs_eager=0.8,
               memory={"peak_bytes": small.logits_bytes + rows + 1}),
        result(small, "graphed", "fused_ce", 0.02, ratio_to_copy=2.0, speedup_vs_eager=5.0),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"metadata": {"device": "cuda", "cuda": {"gpu": "test GPU"}, "torch": "x"},
                                "config": {}, "results": [r.as_dict() for r in results]}))
    assert check_targets.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()

    def verdicts(target, workload):
        return [line.split(" | ")[-1].rstrip(" |") for line in lines
                if line.startswith(f"| {target} | {workload}")]

    assert verdicts("time / copy's", "16384 x 128256 bf16 |") == ["yes"]
    assert verdicts("speedup over eager", "16384 x 128256 bf16 |") == ["no"]
    assert verdicts("speedup over torch.compile", "16384 x 128256 bf16 |") == ["yes"]  # 5.0 / 4.0 ms
    assert verdicts("time / copy's", "8192 x 32000 fp32") == ["not measured"]  # not in the results
    assert verdicts("speedup over eager", "65536 x 10 fp32 |") == ["no"]
    assert verdicts("speedup over eager", "65536 x 10 fp32, CUDA graph") == ["yes"]
    assert verdicts("peak memory beyond the inputs", "lm-128k-bf16") == ["yes"]
    assert verdicts("peak memory beyond the inputs", "cls-10-fp32") == ["no"]  # one byte over 64 per row
    assert check_targets.main([str(tmp_path / "missing.json")]) == 2
