"""fused_ce.CrossEntropyLoss: constructor, buffers, state_dict and forward parity with nn.CrossEntropyLoss."""

import warnings

import pytest
import torch
import torch.nn as nn

import fused_ce
from conftest import assert_close_ref, check_against_torch, make_class_target, make_logits, make_prob_target, make_weight

CTOR_CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"ignore_index": 3},
    {"label_smoothing": 0.15},
    {"weight": "w"},
    {"weight": "w", "ignore_index": 1, "reduction": "sum", "label_smoothing": 0.3},
    {"weight": "w", "reduction": "none", "label_smoothing": 1.0},
]


def _materialise(kwargs, C=5, dtype=torch.float32, device="cpu"):
    kw = dict(kwargs)
    if kw.get("weight") == "w":
        kw["weight"] = make_weight(C, dtype, device)
    return kw


@pytest.mark.parametrize("kwargs", CTOR_CASES, ids=lambda k: ",".join(sorted(k)) or "defaults")
def test_constructor_attributes_match_torch(kwargs):
    kw = _materialise(kwargs)
    ours = fused_ce.CrossEntropyLoss(**kw)
    ref = nn.CrossEntropyLoss(**kw)
    assert isinstance(ours, nn.Module)
    for attr in ("reduction", "ignore_index", "label_smoothing"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    if ref.weight is None:
        assert ours.weight is None
    else:
        assert torch.equal(ours.weight, ref.weight)


def test_constructor_positional_arguments_match_torch():
    w = make_weight(4)
    # nn.CrossEntropyLoss(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    ours = fused_ce.CrossEntropyLoss(w, None, 2, None, "sum", 0.25)
    ref = nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.25)
    assert (ours.reduction, ours.ignore_index, ours.label_smoothing) == (ref.reduction, ref.ignore_index,
                                                                         ref.label_smoothing)
    assert torch.equal(ours.weight, ref.weight)


@pytest.mark.parametrize(
    "size_average,reduce",
    [(None, False), (False, None), (True, None), (None, True), (True, True), (False, True), (False, False)],
)
def test_deprecated_size_average_reduce(device, size_average, reduce):
    with warnings.catch_warnings(record=True) as rec_ref:
        warnings.simplefilter("always")
        ref = nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    with warnings.catch_warnings(record=True) as rec_ours:
        warnings.simplefilter("always")
        ours = fused_ce.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert ours.reduction == ref.reduction
    # torch warns about the deprecated arguments; so should we
    assert any(issubclass(w.category, UserWarning) for w in rec_ref)
    assert any(issubclass(w.category, UserWarning) for w in rec_ours), "no deprecation warning"
    x = make_logits((6, 4), torch.float32, device)
    t = make_class_target((6,), 4, device)
    out = ours(x, t)
    expected = nn.CrossEntropyLoss(reduction=ref.reduction)(x.double().cpu(), t.cpu())
    assert_close_ref(out, expected, torch.float32, what=f"module size_average={size_average} reduce={reduce}")


def test_weight_is_a_buffer():
    w = make_weight(6)
    m = fused_ce.CrossEntropyLoss(weight=w)
    buffers = dict(m.named_buffers())
    assert "weight" in buffers and torch.equal(buffers["weight"], w)
    assert list(m.parameters()) == []
    assert list(m.state_dict().keys()) == list(nn.CrossEntropyLoss(weight=w).state_dict().keys()) == ["weight"]
    m0 = fused_ce.CrossEntropyLoss()
    assert m0.weight is None
    assert list(m0.state_dict().keys()) == list(nn.CrossEntropyLoss().state_dict().keys())


def test_state_dict_round_trip_both_ways(device):
    C = 7
    w1, w2 = make_weight(C), make_weight(C)
    ref = nn.CrossEntropyLoss(weight=w1.clone())
    ours = fused_ce.CrossEntropyLoss(weight=torch.zeros(C))
    ours.load_state_dict(ref.state_dict())  # torch -> fused
    assert torch.equal(ours.weight, w1)
    ours2 = fused_ce.CrossEntropyLoss(weight=w2.clone())
    ref2 = nn.CrossEntropyLoss(weight=torch.zeros(C))
    ref2.load_state_dict(ours2.state_dict())  # fused -> torch
    assert torch.equal(ref2.weight, w2)
    # strict loading checks the key sets match exactly
    missing, unexpected = ours.load_state_dict(ref2.state_dict(), strict=True)
    assert not missing and not unexpected
    # the loaded weight is actually used in forward
    x = make_logits((9, C), torch.float32, device)
    t = make_class_target((9,), C, device)
    ours = ours.to(device)
    out = ours(x, t)
    expected = nn.CrossEntropyLoss(weight=w2.double())(x.double().cpu(), t.cpu())
    assert_close_ref(out, expected, torch.float32, what="forward after load_state_dict")


def test_state_dict_save_load_file(tmp_path):
    w = make_weight(5)
    ours = fused_ce.CrossEntropyLoss(weight=w, ignore_index=2)
    path = tmp_path / "ce.pt"
    torch.save(ours.state_dict(), path)
    ref = nn.CrossEntropyLoss(weight=torch.ones(5))
    ref.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(ref.weight, w)


def test_module_inside_sequential_state_dict():
    w = make_weight(3)
    model_ref = nn.ModuleDict({"head": nn.Linear(4, 3), "loss": nn.CrossEntropyLoss(weight=w)})
    model_ours = nn.ModuleDict({"head": nn.Linear(4, 3), "loss": fused_ce.CrossEntropyLoss(weight=torch.ones(3))})
    model_ours.load_state_dict(model_ref.state_dict())
    assert torch.equal(model_ours["loss"].weight, w)
    assert set(model_ours.state_dict()) == set(model_ref.state_dict())


@pytest.mark.parametrize("kwargs", CTOR_CASES, ids=lambda k: ",".join(sorted(k)) or "defaults")
def test_repr_sane(kwargs):
    kw = _materialise(kwargs, C=5000)
    ours = fused_ce.CrossEntropyLoss(**kw)
    r = repr(ours)
    assert isinstance(r, str) and r.startswith("CrossEntropyLoss(") and r.endswith(")")
    assert isinstance(ours.extra_repr(), str)
    # must not dump a 5000-element weight tensor
    assert len(r) < 1000, r[:200]
    assert str(ours) == r
    # mentioning non-default options is optional; if the repr mentions one, the value must be right
    for key in ("reduction", "ignore_index", "label_smoothing"):
        if f"{key}=" in r:
            assert f"{key}={getattr(ours, key)!r}" in r or f"{key}={getattr(ours, key)}" in r, r


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_to_dtype_moves_weight(device, dtype):
    C = 6
    m = fused_ce.CrossEntropyLoss(weight=make_weight(C), label_smoothing=0.1)
    w32 = m.weight.clone()
    m2 = m.to(dtype)
    assert m2 is m
    assert m.weight.dtype == dtype
    torch.testing.assert_close(m.weight.float(), w32.to(dtype).float(), rtol=0, atol=0)
    m = m.to(device)
    assert m.weight.device.type == torch.device(device).type
    x = make_logits((8, C), dtype, device)
    t = make_class_target((8,), C, device, ignore_index=-100)
    out = m(x, t)
    assert out.dtype == dtype
    expected = nn.CrossEntropyLoss(weight=m.weight.double().cpu(), label_smoothing=0.1)(x.double().cpu(), t.cpu())
    assert_close_ref(out, expected, dtype, what=f"module after .to({dtype})")
    # .double() / .half() helpers too
    m.double()
    assert m.weight.dtype == torch.float64


@pytest.mark.parametrize("kwargs", CTOR_CASES, ids=lambda k: ",".join(sorted(k)) or "defaults")
@pytest.mark.parametrize("C", [5, 130])
def test_module_forward_backward_parity(device, kwargs, C):
    kw = _materialise(kwargs, C=C, dtype=torch.float32, device=device)
    ours = fused_ce.CrossEntropyLoss(**kw)
    x = make_logits((11, C, 3), torch.float32, device)
    ignore = kw.get("ignore_index", -100)
    t = make_class_target((11, 3), C, device, ignore_index=ignore)
    # the module path: fused module forward, compare with the functional torch reference
    xl = x.clone().requires_grad_()
    out = ours(xl, t)
    ref_mod = nn.CrossEntropyLoss(**{k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    x64 = x.double().cpu().requires_grad_()
    ref = ref_mod(x64, t.cpu())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close_ref(out, ref, torch.float32, what=f"module {kwargs}")
    go = torch.rand(ref.shape, dtype=torch.float64)
    out.backward(go.float().to(device))
    ref.backward(go)
    assert_close_ref(xl.grad, x64.grad, torch.float32, what=f"module grad {kwargs}")


def test_module_prob_targets(device):
    C = 9
    m = fused_ce.CrossEntropyLoss(weight=make_weight(C, torch.float32, device), label_smoothing=0.2)
    x = make_logits((5, C, 2), torch.float32, device)
    t = make_prob_target((5, C, 2), torch.float32, device)
    check_against_torch(fused_ce, x, t, m.weight, reduction="mean", label_smoothing=0.2, target_grad=True)
    out = m(x, t)
    ref = nn.CrossEntropyLoss(weight=m.weight.double().cpu(), label_smoothing=0.2)(x.double().cpu(), t.double().cpu())
    assert_close_ref(out, ref, torch.float32, what="module soft")


def test_module_attribute_changes_take_effect(device):
    # users mutate ignore_index / reduction / label_smoothing after construction
    C = 5
    m = fused_ce.CrossEntropyLoss()
    m.reduction = "sum"
    m.ignore_index = 0
    m.label_smoothing = 0.1
    x = make_logits((10, C), torch.float32, device)
    t = make_class_target((10,), C, device, ignore_index=0)
    out = m(x, t)
    ref = nn.functional.cross_entropy(x.double().cpu(), t.cpu(), reduction="sum", ignore_index=0, label_smoothing=0.1)
    assert_close_ref(out, ref, torch.float32, what="mutated attributes")


def test_module_is_drop_in_for_optimizer_loop(device):
    torch.manual_seed(1)
    C = 4
    lin_a = nn.Linear(8, C).to(device)
    lin_b = nn.Linear(8, C).to(device)
    lin_b.load_state_dict(lin_a.state_dict())
    lin_b.double()
    opt_a = torch.optim.SGD(lin_a.parameters(), lr=0.5)
    opt_b = torch.optim.SGD(lin_b.parameters(), lr=0.5)
    la, lb = fused_ce.CrossEntropyLoss(label_smoothing=0.05), nn.CrossEntropyLoss(label_smoothing=0.05)
    data = torch.randn(16, 8, device=device)
    target = torch.randint(0, C, (16,), device=device)
    for _ in range(5):
        opt_a.zero_grad()
        opt_b.zero_grad()
        la(lin_a(data), target).backward()
        lb(lin_b(data.double()), target).backward()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(lin_a.parameters(), lin_b.parameters()):
        assert_close_ref(pa, pb, torch.float32, what="parameters after 5 SGD steps", rtol=1e-4, atol_scale=1e-5)


def test_deepcopy_and_pickle_module(tmp_path, device):
    import copy
    import pickle

    C = 6
    m = fused_ce.CrossEntropyLoss(weight=make_weight(C, torch.float32, device), ignore_index=2,
                                  label_smoothing=0.1, reduction="sum")
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is type(m)
        assert torch.equal(clone.weight, m.weight) and clone.weight is not m.weight
        assert (clone.ignore_index, clone.label_smoothing, clone.reduction) == (2, 0.1, "sum")
        x = make_logits((5, C), torch.float32, device)
        t = make_class_target((5,), C, device, ignore_index=2)
        torch.testing.assert_close(clone(x, t), m(x, t), rtol=0, atol=0)


class _ModelWithLoss(torch.nn.Module):
    def __init__(self, criterion):
        super().__init__()
        self.head = torch.nn.Linear(4, 5)
        self.criterion = criterion

    def forward(self, x, target):
        return self.criterion(self.head(x), target)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in recent torch
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torchscript_keeps_models_scriptable(reduction):
    # As with PyTorch's module, a model that holds the loss can be scripted;
    # the scripted module computes PyTorch's cross_entropy.
    weight = torch.rand(5) + 0.5
    model = _ModelWithLoss(fused_ce.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction=reduction))
    x, target = torch.randn(6, 4), torch.randint(0, 5, (6,))
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x, target), model(x, target))
    reference = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(scripted(x, target), reference(model.head(x), target))
    with pytest.raises((RuntimeError, torch.jit.Error), match="not supported in TorchScript"):
        torch.jit.script(fused_ce.CrossEntropyLoss(z_loss=1e-3))(torch.randn(3, 5), target[:3])


def test_an_older_torch_is_refused_at_import():
    # Under torch 2.4 torch.compile gave the loss a wrong gradient (README, "Torch versions"): the
    # package refuses that torch by name instead. A fresh interpreter whose torch says it is 2.4.1.
    import subprocess
    import sys

    code = "import torch; torch.__version__ = '2.4.1'; import fused_ce"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ImportError: fused_ce needs torch 2.5 or newer, found torch 2.4.1" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import fused_ce"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
