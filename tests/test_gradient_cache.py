"""The CPU gradient cache (fused_ce.cache, csrc/cpu/gradient_cache.cpp).

A freed gradient buffer is handed to the next gradient of the same byte size,
so these tests check that:

* a reused buffer is fully overwritten: the cache is first given a buffer
  full of NaN, and then every kernel path (row and tile kernels, every dtype,
  strided layouts, probability targets, the separate backward) must produce
  exactly PyTorch's gradient in it;
* the buffer really is reused (same address), and never while a gradient
  that lives in it is still referenced;
* the controls work: ``empty_cache``, ``set_gradient_cache``, the
  ``FUSED_CE_GRADIENT_CACHE=0`` environment variable, and the 1 MiB floor;
* concurrent steps in several threads stay correct.

CPU only: CUDA gradients come from PyTorch's caching allocator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import fused_ce
from conftest import (assert_close_ref, make_class_target, make_logits, make_prob_target, make_weight, ref_llm,
                      torch_reference)


@pytest.fixture(autouse=True)
def _fresh_cache():
    previous = fused_ce.set_gradient_cache(True)
    fused_ce.empty_cache()
    yield
    fused_ce.set_gradient_cache(previous)
    fused_ce.empty_cache()


def poison_cache(nbytes: int) -> None:
    """Leaves a NaN-filled buffer of exactly ``nbytes`` in the cache."""
    assert nbytes % 4 == 0
    x = torch.randn(1, nbytes // 4, requires_grad=True)
    loss = fused_ce.cross_entropy(x, torch.zeros(1, dtype=torch.long))
    (grad,) = torch.autograd.grad(loss, x)  # the kernel's own buffer: the upstream gradient is 1
    grad.fill_(float("nan"))
    del grad, loss
    assert fused_ce.gradient_cache_bytes() == nbytes


def gradient_nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# Each case: the logits' leaf shape, dtype, how the leaf is viewed before the
# call, and the loss options. Every gradient is at least 1 MiB.
CASES = {
    "row-fp32": dict(shape=(300, 1024), dtype=torch.float32),
    "row-bf16-ignore": dict(shape=(600, 1024), dtype=torch.bfloat16, ignore_index=3),
    "row-fp16-smoothing-weight": dict(shape=(600, 1024), dtype=torch.float16, label_smoothing=0.1,
                                      weight=True),
    "row-fp64-sum": dict(shape=(200, 1024), dtype=torch.float64, reduction="sum"),
    "row-fp32-none": dict(shape=(300, 1024), dtype=torch.float32, reduction="none"),
    "row-fp32-zloss-softcap": dict(shape=(300, 1024), dtype=torch.float32, z_loss=1e-3, softcap=15.0),
    "row-fp32-transposed": dict(shape=(1024, 300), dtype=torch.float32, view=lambda t: t.t()),
    "tile-c10-fp32": dict(shape=(40000, 10), dtype=torch.float32, ignore_index=-100),
    "tile-c10-bf16": dict(shape=(80000, 10), dtype=torch.bfloat16),
    "segmentation-fp32": dict(shape=(4, 21, 64, 64), dtype=torch.float32, ignore_index=255),
    "segmentation-channels-last": dict(shape=(4, 64, 64, 21), dtype=torch.float32,
                                       view=lambda t: t.permute(0, 3, 1, 2)),
    "probability-targets": dict(shape=(300, 1024), dtype=torch.float32, probabilities=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reused_buffer_is_fully_overwritten(name):
    case = dict(CASES[name])
    shape, dtype = case.pop("shape"), case.pop("dtype")
    view = case.pop("view", None)
    probabilities = case.pop("probabilities", False)
    use_weight = case.pop("weight", False)
    x = make_logits(shape, dtype)
    viewed_shape = view(x).shape if view else x.shape
    C = viewed_shape[1]
    class_shape = (viewed_shape[0],) + tuple(viewed_shape[2:])
    if probabilities:
        target = make_prob_target(tuple(viewed_shape), dtype)
    else:
        target = make_class_target(class_shape, C, ignore_index=case.get("ignore_index"))
    weight = make_weight(C, dtype) if use_weight else None
    reference_options = {k: v for k, v in case.items() if k not in ("z_loss", "softcap")}

    poison_cache(gradient_nbytes(x))
    leaf = x.detach().clone().requires_grad_(True)
    loss = fused_ce.cross_entropy(view(leaf) if view else leaf, target, weight=weight, **case)
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    assert fused_ce.gradient_cache_bytes() == 0, "the poisoned buffer was not used"

    if "z_loss" in case:
        x64 = x.double().requires_grad_(True)
        ref_loss, _ = ref_llm(x64, target, z_loss=case["z_loss"], softcap=case["softcap"])
        (ref_grad,) = torch.autograd.grad(ref_loss, x64)
    else:
        _, ref_grad, _ = torch_reference(x, target, weight=weight, view=view, **reference_options)
    assert_close_ref(grad, ref_grad, dtype=dtype, what=f"{name}: gradient in a reused buffer")


def test_buffer_is_reused_across_steps():
    x = make_logits((300, 1024)).requires_grad_(True)
    target = make_class_target((300,), 1024)
    fused_ce.cross_entropy(x, target).backward()
    address = x.grad.data_ptr()
    x.grad = None
    assert fused_ce.gradient_cache_bytes() == gradient_nbytes(x)
    x2 = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x2, target).backward()
    assert x2.grad.data_ptr() == address
    _, ref_grad, _ = torch_reference(x2, target)
    assert_close_ref(x2.grad, ref_grad, what="gradient of the second step")


def test_live_gradient_is_never_handed_out():
    target = make_class_target((300,), 1024)
    x1 = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x1, target).backward()
    kept = x1.grad.clone()
    x2 = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x2, target).backward()
    assert x2.grad.data_ptr() != x1.grad.data_ptr()
    assert torch.equal(x1.grad, kept)


def test_another_size_replaces_the_cached_buffer():
    for rows in (300, 400):
        x = make_logits((rows, 1024)).requires_grad_(True)
        fused_ce.cross_entropy(x, make_class_target((rows,), 1024)).backward()
        del x
        assert fused_ce.gradient_cache_bytes() == rows * 1024 * 4


def test_empty_cache_frees_the_buffer():
    x = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x, make_class_target((300,), 1024)).backward()
    del x
    assert fused_ce.gradient_cache_bytes() > 0
    fused_ce.empty_cache()
    assert fused_ce.gradient_cache_bytes() == 0


def test_disabled_cache_keeps_nothing():
    assert fused_ce.set_gradient_cache(False) is True
    x = make_logits((300, 1024)).requires_grad_(True)
    target = make_class_target((300,), 1024)
    fused_ce.cross_entropy(x, target).backward()
    _, ref_grad, _ = torch_reference(x, target)
    assert_close_ref(x.grad, ref_grad, what="gradient with the cache off")
    del x
    assert fused_ce.gradient_cache_bytes() == 0
    assert fused_ce.set_gradient_cache(True) is False


def test_disabling_empties_the_cache():
    x = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x, make_class_target((300,), 1024)).backward()
    del x
    assert fused_ce.gradient_cache_bytes() > 0
    fused_ce.set_gradient_cache(False)
    assert fused_ce.gradient_cache_bytes() == 0


def test_small_gradients_are_not_cached():
    x = make_logits((64, 1000)).requires_grad_(True)  # 256 KB
    fused_ce.cross_entropy(x, make_class_target((64,), 1000)).backward()
    del x
    assert fused_ce.gradient_cache_bytes() == 0


def test_environment_variable_disables_the_cache():
    script = (
        "import torch, fused_ce\n"
        "x = torch.randn(300, 1024, requires_grad=True)\n"
        "fused_ce.cross_entropy(x, torch.randint(0, 1024, (300,))).backward()\n"
        "del x\n"
        "print(fused_ce.gradient_cache_bytes())\n"
    )
    env = {**os.environ, "FUSED_CE_GRADIENT_CACHE": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_concurrent_steps_in_threads():
    inputs = [(make_logits((300, 1024)), make_class_target((300,), 1024)) for _ in range(4)]
    references = [torch_reference(x, t)[1] for x, t in inputs]
    errors = []

    def worker(k):
        try:
            for _ in range(20):
                x = inputs[k][0].detach().clone().requires_grad_(True)
                fused_ce.cross_entropy(x, inputs[k][1]).backward()
                assert_close_ref(x.grad, references[k], what=f"thread {k}")
        except Exception as exc:  # reported below, with the thread's message
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _cached_gradient():
    x = make_logits((300, 1024)).requires_grad_(True)
    fused_ce.cross_entropy(x, make_class_target((300,), 1024)).backward()
    return x.grad


def test_gradient_can_be_resized():
    grad = _cached_gradient()
    assert grad.untyped_storage().resizable()
    expected = grad.clone()
    grad.resize_(600, 1024)  # reallocates through PyTorch's allocator, returning the buffer
    assert torch.equal(grad[:300], expected)
    assert fused_ce.gradient_cache_bytes() == 300 * 1024 * 4


def test_gradient_can_be_shared_and_saved(tmp_path):
    grad = _cached_gradient()
    expected = grad.clone()
    grad.share_memory_()
    assert grad.is_shared() and torch.equal(grad, expected)
    torch.save(grad, tmp_path / "grad.pt")
    assert torch.equal(torch.load(tmp_path / "grad.pt"), expected)
