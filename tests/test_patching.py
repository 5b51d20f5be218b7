"""fused_ce.patch_torch(): PyTorch's own cross-entropy entry points routed through the fused kernel.

Checks that, while patched, F.cross_entropy / nn.CrossEntropyLoss (new and pre-existing modules) /
library code that reaches F through its module attribute compute with fused_ce (proved by a counting
spy on fused_ce.functional.cross_entropy and by the autograd node) with torch's results; that undo
restores the very same objects (also nested, out of order, and as a context manager); and that
everything fused_ce cannot reproduce falls back to PyTorch with PyTorch's result or PyTorch's error.
"""

import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_ce
import fused_ce.functional
from fused_ce import patching
from fused_ce.patching import patch_torch, supported, unsupported_reason

from conftest import NATIVE_NODE, PYTHON_NODE, grad_fn_name

# Captured at import, before any test patches anything.
ORIGINAL_CE = torch.nn.functional.cross_entropy
ORIGINAL_LOSS_CLASS = torch.nn.CrossEntropyLoss
FUSED_NODES = (NATIVE_NODE, PYTHON_NODE)  # the loss's autograd node under fused_ce


@pytest.fixture(autouse=True)
def _always_unpatched_around_each_test():
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE, "a previous test leaked a patch"
    yield
    leaked = torch.nn.functional.cross_entropy is not ORIGINAL_CE
    torch.nn.functional.cross_entropy = ORIGINAL_CE
    assert not leaked, "test left torch.nn.functional.cross_entropy patched"


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach fused_ce.functional.cross_entropy (the patched path's kernel)."""
    calls = []
    real = fused_ce.functional.cross_entropy

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_ce.functional, "cross_entropy", spy)
    return calls


# One random upstream gradient per test process run, shared by the reference and the patched call
# (reseeded per call from this value so both see the same one, never all ones).
_GRAD_SEED = int(torch.randint(0, 2**31 - 1, ()).item())


def _loss_and_grads(fn, x, target, weight=None, target_grad=False, **kwargs):
    """fn(x, target, weight=..., **kwargs) on fresh leaves; returns loss, dloss/dx, dloss/dtarget, loss node."""
    xl = x.detach().clone().requires_grad_()
    tl = target.detach().clone().requires_grad_(target_grad)
    loss = fn(xl, tl, weight=weight, **kwargs)
    node = grad_fn_name(loss)
    gen = torch.Generator().manual_seed(_GRAD_SEED)
    go = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype) + 0.5
    leaves = [xl] + ([tl] if target_grad else [])
    grads = torch.autograd.grad(loss, leaves, go)
    return loss.detach(), grads[0], grads[1] if target_grad else None, node


def _assert_same_outcome(call, reference):
    """call() and reference() both return equal tensors, or both raise the same type and message."""
    try:
        expected = reference()
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is what we must raise
        with pytest.raises(type(exc)) as info:
            call()
        assert type(info.value) is type(exc)
        assert str(info.value) == str(exc)
        return None
    got = call()
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device
    if got.device.type != "meta":
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    return got


# --------------------------------------------------------------------------------------------------
# What is patched, and undo.


def test_patch_replaces_only_the_functional_and_undo_restores_identity():
    assert torch.nn.modules.loss.F is torch.nn.functional  # the module's forward goes through this
    handle = patch_torch()
    try:
        assert torch.nn.functional.cross_entropy is not ORIGINAL_CE
        assert F.cross_entropy is torch.nn.functional.cross_entropy
        assert torch.nn.modules.loss.F.cross_entropy is torch.nn.functional.cross_entropy
        # The class is left alone on purpose (isinstance, pickling, subclasses).
        assert torch.nn.CrossEntropyLoss is ORIGINAL_LOSS_CLASS
        assert torch.nn.modules.loss.CrossEntropyLoss is ORIGINAL_LOSS_CLASS
        assert handle.active
        assert "fused" in torch.nn.functional.cross_entropy.__doc__
    finally:
        handle.undo()
    assert not handle.active
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE
    assert torch.nn.CrossEntropyLoss is ORIGINAL_LOSS_CLASS
    handle.undo()  # idempotent
    handle.remove()
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


def test_remove_is_an_alias_of_undo():
    handle = patch_torch()
    handle.remove()
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE
    assert not handle.active


def test_patched_function_keeps_torch_signature():
    import inspect

    with patch_torch():
        patched = inspect.signature(torch.nn.functional.cross_entropy).parameters
    original = inspect.signature(ORIGINAL_CE).parameters
    assert list(patched) == list(original)
    assert [p.default for p in patched.values()] == [p.default for p in original.values()]
    assert [p.kind for p in patched.values()] == [p.kind for p in original.values()]


def test_exported_from_the_package():
    assert fused_ce.patch_torch is patch_torch


def test_context_manager_patches_and_restores():
    with patch_torch() as handle:
        assert isinstance(handle, patching.PatchHandle)
        assert torch.nn.functional.cross_entropy is not ORIGINAL_CE
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE
    assert not handle.active


def test_context_manager_restores_on_exception():
    with pytest.raises(KeyError):
        with patch_torch():
            raise KeyError("boom")
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


def test_entering_an_undone_handle_raises():
    handle = patch_torch()
    handle.undo()
    with pytest.raises(RuntimeError, match="already undone"):
        with handle:
            pass
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


def test_nested_patches_undo_in_order(fused_calls):
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    with patch_torch():
        first = torch.nn.functional.cross_entropy
        with patch_torch():
            second = torch.nn.functional.cross_entropy
            assert second is not first
            F.cross_entropy(x, t)
            assert len(fused_calls) == 1  # the kernel runs once, not once per layer
        assert torch.nn.functional.cross_entropy is first
        F.cross_entropy(x, t)
        assert len(fused_calls) == 2
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


def test_nested_patches_undone_out_of_order(fused_calls):
    x, t = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    outer = patch_torch()
    inner = patch_torch()
    inner_fn = torch.nn.functional.cross_entropy
    outer.undo()
    # The inner patch is still in force (and still fused).
    assert torch.nn.functional.cross_entropy is inner_fn
    F.cross_entropy(x, t)
    assert len(fused_calls) == 1
    inner.undo()
    # Both undone: the original, not the (dead) outer wrapper, is back.
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE
    outer.undo()
    inner.undo()
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


def test_undo_leaves_a_later_third_party_replacement_in_place(fused_calls):
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    handle = patch_torch()
    ours = torch.nn.functional.cross_entropy
    seen = []

    def third_party(*args, **kwargs):
        seen.append(1)
        return ours(*args, **kwargs)

    torch.nn.functional.cross_entropy = third_party
    try:
        handle.undo()
        assert torch.nn.functional.cross_entropy is third_party  # not clobbered
        loss = F.cross_entropy(x, t)
        assert seen and not fused_calls  # our undone wrapper passes straight through
        torch.testing.assert_close(loss, ORIGINAL_CE(x, t), rtol=0, atol=0)
    finally:
        torch.nn.functional.cross_entropy = ORIGINAL_CE


def test_reference_taken_while_patched_stays_correct_after_undo(fused_calls):
    x, t = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,))
    with patch_torch():
        kept = F.cross_entropy
    torch.testing.assert_close(kept(x, t), ORIGINAL_CE(x, t), rtol=0, atol=0)
    assert not fused_calls


def test_import_before_patch_keeps_original(fused_calls):
    from torch.nn.functional import cross_entropy as bound_early

    x, t = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 6, (4,))
    with patch_torch():
        bound_early(x, t)
    assert not fused_calls  # documented: not covered


# --------------------------------------------------------------------------------------------------
# Parity (float64) through every entry point, proving the kernel ran.

FUNCTIONAL_CASES = [
    dict(shape=(9, 7)),
    dict(shape=(9, 7), reduction="sum", label_smoothing=0.2),
    dict(shape=(9, 7), reduction="none", ignore_index=2, weight=True),
    dict(shape=(4, 5, 3, 2), weight=True, label_smoothing=0.35),
    dict(shape=(6,), reduction="mean"),
    dict(shape=(5, 8), soft=True, weight=True, label_smoothing=0.1),
    dict(shape=(3, 4, 6), soft=True, reduction="none"),
]


def _case_inputs(case):
    shape = case["shape"]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, dtype=torch.float64) * 3
    if case.get("soft"):
        target = torch.randn(shape, dtype=torch.float64).softmax(0 if len(shape) == 1 else 1)
    else:
        tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
        target = torch.randint(0, C, tshape)
        if "ignore_index" in case and target.numel():
            target.view(-1)[0] = case["ignore_index"]
    weight = torch.rand(C, dtype=torch.float64) + 0.25 if case.get("weight") else None
    kwargs = {k: case[k] for k in ("reduction", "ignore_index", "label_smoothing") if k in case}
    return x, target, weight, kwargs


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=str)
def test_functional_parity_float64(case, fused_calls):
    x, target, weight, kwargs = _case_inputs(case)
    soft = bool(case.get("soft"))
    ref = _loss_and_grads(ORIGINAL_CE, x, target, weight, target_grad=soft, **kwargs)
    with patch_torch():
        got = _loss_and_grads(F.cross_entropy, x, target, weight, target_grad=soft, **kwargs)
    assert len(fused_calls) == 1
    if kwargs.get("reduction", "mean") != "none":
        assert got[3] in FUSED_NODES
    assert ref[3] not in FUSED_NODES
    for a, b in zip(got[:3], ref[:3]):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_new_and_preexisting_instances(reduction, fused_calls):
    C = 6
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    before = nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction=reduction, label_smoothing=0.15)
    x = torch.randn(10, C, dtype=torch.float64)
    t = torch.randint(0, C, (10,))
    ref = _loss_and_grads(lambda a, b, weight: before(a, b), x, t)
    with patch_torch():
        created = nn.CrossEntropyLoss(weight=weight, ignore_index=1, reduction=reduction, label_smoothing=0.15)
        for module in (before, created):
            assert isinstance(module, torch.nn.CrossEntropyLoss)
            assert type(module) is ORIGINAL_LOSS_CLASS
            n = len(fused_calls)
            got = _loss_and_grads(lambda a, b, weight, m=module: m(a, b), x, t)
            assert len(fused_calls) == n + 1
            if reduction != "none":
                assert got[3] in FUSED_NODES
            torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    for module in (before, created):
        assert isinstance(module, torch.nn.CrossEntropyLoss)
        n = len(fused_calls)
        after = _loss_and_grads(lambda a, b, weight, m=module: m(a, b), x, t)
        assert len(fused_calls) == n and after[3] not in FUSED_NODES
        torch.testing.assert_close(after[0], ref[0], rtol=0, atol=0)


def test_module_subclass_through_super_forward(fused_calls):
    class Scaled(nn.CrossEntropyLoss):
        def forward(self, input, target):
            return 2 * super().forward(input, target)

    module = Scaled(label_smoothing=0.05)
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    ref = _loss_and_grads(lambda a, b, weight: module(a, b), x, t)
    with patch_torch():
        got = _loss_and_grads(lambda a, b, weight: module(a, b), x, t)
    assert len(fused_calls) == 1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def _library_loss(logits, labels):
    """What a library does: import the functional module and call through its attribute."""
    import torch.nn.functional as LF

    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    return LF.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / 3.0


def _library_loss_via_nn(logits, labels):
    from torch import nn as lnn

    return lnn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="mean")


@pytest.mark.parametrize("fn", [_library_loss, _library_loss_via_nn])
def test_library_code_calling_functional_module(fn, fused_calls):
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2] = -100
    ref = _loss_and_grads(lambda a, b, weight: fn(a, b), logits, labels)
    with patch_torch():
        got = _loss_and_grads(lambda a, b, weight: fn(a, b), logits, labels)
    assert len(fused_calls) == 1
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_float32_parity_and_legacy_arguments(fused_calls):
    x = torch.randn(12, 9)
    t = torch.randint(0, 9, (12,))
    with warnings.catch_warnings(record=True) as ref_warnings:
        warnings.simplefilter("always")
        ref = _loss_and_grads(ORIGINAL_CE, x, t, size_average=False)
    with patch_torch(), warnings.catch_warnings(record=True) as got_warnings:
        warnings.simplefilter("always")
        got = _loss_and_grads(F.cross_entropy, x, t, size_average=False)
    assert len(fused_calls) == 1
    assert [str(w.message) for w in got_warnings] == [str(w.message) for w in ref_warnings]
    torch.testing.assert_close(got[0], ref[0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=2e-6, atol=1e-7)


def test_state_dict_round_trip(tmp_path):
    C = 5
    weight = torch.rand(C) + 0.1
    before = nn.CrossEntropyLoss(weight=weight, reduction="sum")
    x, t = torch.randn(6, C), torch.randint(0, C, (6,))
    with patch_torch():
        created = nn.CrossEntropyLoss(weight=torch.ones(C), reduction="sum")
        assert list(created.state_dict()) == list(before.state_dict()) == ["weight"]
        created.load_state_dict(before.state_dict())
        assert torch.equal(created.weight, weight)
        torch.save(created, tmp_path / "loss.pt")
        restored_sd = nn.CrossEntropyLoss(weight=torch.zeros(C), reduction="sum")
        restored_sd.load_state_dict(created.state_dict())
        patched_loss = restored_sd(x, t)
    loaded = torch.load(tmp_path / "loss.pt", weights_only=False)
    assert type(loaded) is ORIGINAL_LOSS_CLASS  # pickled as torch's class, loadable without fused_ce
    assert torch.equal(loaded.weight, weight)
    before.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(patched_loss, loaded(x, t), rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    torch.save(before.state_dict(), buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer)["weight"], weight)


def test_concurrent_calls_while_another_thread_patches_and_undoes():
    import threading

    C = 8
    x = torch.randn(16, C, dtype=torch.float64)
    t = torch.randint(0, C, (16,))
    module = nn.CrossEntropyLoss(label_smoothing=0.1)
    expected = ORIGINAL_CE(x, t, label_smoothing=0.1)
    stop = threading.Event()
    errors = []

    def toggler():
        try:
            while not stop.is_set():
                with patch_torch():
                    with patch_torch():
                        pass
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=toggler)
    thread.start()
    try:
        for _ in range(300):
            for got in (F.cross_entropy(x, t, label_smoothing=0.1), module(x, t)):
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert torch.nn.functional.cross_entropy is ORIGINAL_CE


# --------------------------------------------------------------------------------------------------
# Fallbacks: torch's results and torch's errors.


def _fallback(call_args, call_kwargs=None):
    """Run ORIGINAL_CE and the patched F.cross_entropy on the same arguments; same outcome required."""
    call_kwargs = call_kwargs or {}
    with patch_torch():
        return _assert_same_outcome(lambda: F.cross_entropy(*call_args, **call_kwargs),
                                    lambda: ORIGINAL_CE(*call_args, **call_kwargs))


def test_fallback_meta_device(fused_calls):
    x = torch.randn(4, 3).to("meta")
    t = torch.randint(0, 3, (4,)).to("meta")
    assert unsupported_reason(x, t) == "device type 'meta'"
    out = _fallback((x, t), {"reduction": "none"})
    assert out.device.type == "meta" and out.shape == (4,)
    with patch_torch():
        assert nn.CrossEntropyLoss()(x, t).device.type == "meta"
    assert not fused_calls


@pytest.mark.parametrize("ls", [-0.25, float("nan"), 1.5])
def test_fallback_label_smoothing_outside_unit_interval(ls, fused_calls):
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    assert not supported(x, t, label_smoothing=ls)
    _fallback((x, t), {"label_smoothing": ls})
    assert not fused_calls


def test_fallback_weight_requires_grad(fused_calls):
    C = 4
    x = torch.randn(6, C, dtype=torch.float64)
    t = torch.randint(0, C, (6,))
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_()
    assert unsupported_reason(x, t, w) == "weight requires grad"
    for target in (t, torch.randn(6, C, dtype=torch.float64).softmax(1)):
        try:
            ref = ORIGINAL_CE(x, target, weight=w)
            ref_grad = torch.autograd.grad(ref, w)[0]
        except Exception as exc:  # noqa: BLE001
            ref, ref_grad = exc, None
        with patch_torch():
            if ref_grad is None:
                with pytest.raises(type(ref), match=None) as info:
                    F.cross_entropy(x, target, weight=w)
                assert str(info.value) == str(ref)
            else:
                got = F.cross_entropy(x, target, weight=w)
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
                torch.testing.assert_close(torch.autograd.grad(got, w)[0], ref_grad, rtol=0, atol=0)
    assert not fused_calls


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_fallback_non_float_input_raises_torchs_error(dtype, fused_calls):
    x = (torch.randn(4, 3) * 5).to(dtype)
    t = torch.randint(0, 3, (4,))
    assert not supported(x, t)
    _fallback((x, t))
    assert not fused_calls


def test_fallback_uint8_targets_keep_torchs_behaviour(fused_calls):
    C = 5
    w = torch.rand(C) + 0.5
    cases = [
        ((torch.randn(4, C), torch.randint(0, C, (4,), dtype=torch.uint8)), {}),
        ((torch.randn(4, C), torch.randint(0, C, (4,), dtype=torch.uint8)), {"weight": w, "label_smoothing": 0.2}),
        ((torch.randn(4, C, 3), torch.randint(0, C, (4, 3), dtype=torch.uint8)), {}),
    ]
    for args, kwargs in cases:
        _fallback(args, kwargs)
    assert not fused_calls


@pytest.mark.parametrize(
    "make",
    [
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,), dtype=torch.int32)), {}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (5,))), {}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4, 2))), {}),
        lambda: ((torch.randn(4, 3, 2), torch.randint(0, 3, (4, 3))), {}),
        lambda: ((torch.randn(3), torch.randint(0, 3, (2,))), {}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"weight": torch.rand(4)}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"weight": torch.rand(3, dtype=torch.float64)}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"weight": torch.rand(3, 1)}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"reduction": "average"}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"ignore_index": 1.0}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"ignore_index": torch.tensor(1)}),
        lambda: ((torch.randn(4, 3), torch.randn(4, 3).softmax(1)), {"ignore_index": 1}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4, 3))), {}),
        lambda: ((torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), {}),
        lambda: ((torch.randn(4, 0), torch.randn(4, 0)), {}),
        lambda: ((torch.randn(()), torch.randint(0, 3, ())), {}),
        lambda: ((torch.randn(4, 3).to_sparse(), torch.randint(0, 3, (4,))), {}),
        lambda: ((torch.randn(4, 3).tolist(), torch.randint(0, 3, (4,))), {}),
        lambda: ((torch.randn(4, 3), torch.randint(0, 3, (4,))), {"reduce": torch.rand(2) > 2}),
    ],
    ids=["int32-target", "batch-mismatch", "2d-target-for-2d-input", "spatial-shape", "unbatched-target",
         "weight-length", "weight-dtype", "weight-2d", "bad-reduction", "float-ignore-index",
         "tensor-ignore-index", "soft-target-ignore-index", "int-target-input-shape", "zero-classes",
         "zero-classes-soft", "0d-input", "sparse-input", "list-input", "ambiguous-legacy-reduce"],
)
def test_fallback_gives_torchs_result_or_error(make, fused_calls):
    args, kwargs = make()
    assert not supported(*args, **kwargs)
    _fallback(args, kwargs)
    assert not fused_calls


def test_supported_for_ordinary_calls():
    C = 6
    x = torch.randn(5, C)
    t = torch.randint(0, C, (5,))
    assert supported(x, t)
    assert unsupported_reason(x, t) is None
    assert supported(x, t, torch.rand(C), reduction="none", label_smoothing=1.0, ignore_index=2)
    assert supported(x.double(), torch.rand(5, C, dtype=torch.float32))  # promoted soft targets
    assert supported(torch.randn(C), torch.randint(0, C, ()))
    assert supported(nn.Parameter(torch.randn(5, C)), t)
    assert supported(x, t, size_average=False, reduce=True)
    assert not supported(x, t, reduce=torch.tensor([True, False]))  # torch's legacy parsing raises


def test_fallback_tensor_subclass_and_torch_function(fused_calls):
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (6,))
    lx = x.as_subclass(Logged)
    assert unsupported_reason(lx, t) == "__torch_function__ override or mode"
    with patch_torch():
        got = F.cross_entropy(lx, t)
    assert seen, "the subclass's __torch_function__ was not consulted"
    assert not fused_calls
    torch.testing.assert_close(got.as_subclass(torch.Tensor), ORIGINAL_CE(x, t), rtol=0, atol=0)

    class Plain(torch.Tensor):  # no override of its own, still a subclass
        __torch_function__ = torch._C._disabled_torch_function_impl

    px = x.as_subclass(Plain)
    assert unsupported_reason(px, t) == "tensor subclass"
    with patch_torch():
        got = F.cross_entropy(px, t)
    assert not fused_calls
    torch.testing.assert_close(got.as_subclass(torch.Tensor), ORIGINAL_CE(x, t), rtol=0, atol=0)


def test_torch_function_mode_sees_the_call(fused_calls):
    from torch.overrides import TorchFunctionMode

    funcs = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            funcs.append(func)
            return func(*args, **(kwargs or {}))

    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with patch_torch():
        with Recorder():
            got = F.cross_entropy(x, t)
        patched = torch.nn.functional.cross_entropy
    # The mode is consulted (with the public function, as unpatched torch would hand it the public
    # function); its own call of that function then runs outside the mode, with plain tensors.
    assert funcs == [patched]
    assert len(fused_calls) == 1
    torch.testing.assert_close(got, ORIGINAL_CE(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_fallback_torchscript_script_and_trace(fused_calls):
    C = 5
    x, t = torch.randn(7, C, dtype=torch.float64), torch.randint(0, C, (7,))
    w = torch.rand(C, dtype=torch.float64) + 0.5
    ref = ORIGINAL_CE(x, t, weight=w, label_smoothing=0.1)
    with patch_torch():
        scripted_module = torch.jit.script(nn.CrossEntropyLoss(weight=w, label_smoothing=0.1))
        scripted_fn = torch.jit.script(F.cross_entropy)
        # (check_trace=False: the trace checker re-runs the function eagerly, where it is fused.)
        traced = torch.jit.trace(lambda a, b: F.cross_entropy(a, b, weight=w, label_smoothing=0.1), (x, t),
                                 check_trace=False)
        for got in (scripted_module(x, t), scripted_fn(x, t, w, None, -100, None, "mean", 0.1), traced(x, t)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not fused_calls
    assert "aten::cross_entropy_loss" in str(traced.graph)
    # Compiled artefacts keep working after undo.
    torch.testing.assert_close(scripted_module(x, t), ref, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch.func scripts internally
def test_fallback_torch_func_transforms_and_forward_ad(fused_calls):
    C = 4
    x = torch.randn(3, 5, C, dtype=torch.float64)
    t = torch.randint(0, C, (3, 5))

    def per_sample(xi, ti):
        return F.cross_entropy(xi, ti, label_smoothing=0.1)

    ref_vmap = torch.vmap(per_sample)(x, t)
    ref_grad = torch.func.grad(per_sample)(x[0], t[0])
    tangent = torch.randn_like(x[0])
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        ref_jvp = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(x[0], tangent), t[0])).tangent
    with patch_torch():
        torch.testing.assert_close(torch.vmap(per_sample)(x, t), ref_vmap, rtol=0, atol=0)
        torch.testing.assert_close(torch.func.grad(per_sample)(x[0], t[0]), ref_grad, rtol=0, atol=0)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x[0], tangent)
            assert unsupported_reason(dual, t[0]) == "forward-mode AD"
            got_jvp = fwAD.unpack_dual(F.cross_entropy(dual, t[0])).tangent
        torch.testing.assert_close(got_jvp, ref_jvp, rtol=0, atol=0)
    assert not fused_calls


def test_fallback_cuda_without_cuda_kernels(monkeypatch, fused_calls):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(patching, "_BUILT_WITH_CUDA", False)
    x = torch.randn(6, 4, device="cuda")
    t = torch.randint(0, 4, (6,), device="cuda")
    assert unsupported_reason(x, t) == "fused_ce was built without CUDA"
    _fallback((x, t))
    assert not fused_calls


def test_cpu_autocast_dtype_combinations(fused_calls):
    C = 6
    t = torch.randint(0, C, (8,))
    x32 = torch.randn(8, C)
    xbf = torch.randn(8, C).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 input with a bfloat16 weight: torch casts the weight, fused_ce would refuse -> fallback
        w16 = (torch.rand(C) + 0.5).bfloat16()
        assert unsupported_reason(x32, t, w16) == "weight dtype differs from input dtype"
        _fallback((x32, t), {"weight": w16})
        # half input beside a float64 weight: torch raises, fused_ce would cast -> fallback
        w64 = torch.rand(C, dtype=torch.float64) + 0.5
        assert not supported(xbf, t, w64)
        _fallback((xbf, t), {"weight": w64})
        assert not fused_calls
        # half input with a float32 weight: both compute in float32 -> fused
        w32 = torch.rand(C) + 0.5
        assert supported(xbf, t, w32)
        ref = ORIGINAL_CE(xbf, t, weight=w32)
        with patch_torch():
            got = F.cross_entropy(xbf, t, weight=w32)
        assert len(fused_calls) == 1
        assert got.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# torch.compile and Transformers.


@pytest.mark.compile
def test_torch_compile_traces_into_the_fused_operators():
    torch._dynamo.reset()
    from torch._dynamo.backends.common import aot_autograd

    forward_targets = []

    from torch._functorch.aot_autograd import make_boxed_func

    def fw_compiler(gm, example_inputs):
        forward_targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    C = 7
    x = torch.randn(9, C, dtype=torch.float64)
    t = torch.randint(0, C, (9,))
    ref = _loss_and_grads(lambda a, b, weight: ORIGINAL_CE(a, b, label_smoothing=0.1), x, t)
    try:
        with patch_torch():
            module = nn.CrossEntropyLoss(label_smoothing=0.1)
            compiled = torch.compile(lambda a, b: module(a, b), backend=aot_autograd(fw_compiler=fw_compiler),
                                     fullgraph=True)
            got = _loss_and_grads(lambda a, b, weight: compiled(a, b), x, t)
    finally:
        torch._dynamo.reset()
    assert any(name.startswith("fused_ce.") for name in forward_targets), forward_targets
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_transformers_causal_lm_loss(fused_calls):
    pytest.importorskip("transformers")
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    causal_lm_loss = getattr(loss_utils, "ForCausalLMLoss", None)
    if causal_lm_loss is None:
        pytest.skip("this transformers has no ForCausalLMLoss")
    B, T, V = 2, 9, 17
    logits = torch.randn(B, T, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100
    ref = _loss_and_grads(lambda a, b, weight: causal_lm_loss(a, b, vocab_size=V), logits, labels)
    with patch_torch():
        got = _loss_and_grads(lambda a, b, weight: causal_lm_loss(a, b, vocab_size=V), logits, labels)
    assert fused_calls
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_docstring_lists_fallbacks_and_thread_safety():
    doc = patching.__doc__
    for needle in ("Fallbacks", "Thread safety", "meta", "requires grad", "TorchScript",
                   "torch.func", "__torch_function__", "Not covered"):
        assert needle in doc, needle
    assert "supported" in patch_torch.__doc__
