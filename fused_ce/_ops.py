"""Loads the native library and registers the fake (meta) kernels.

Importing ``fused_ce._C`` registers ``torch.ops.fused_ce.*`` (schemas in
csrc/ops.cpp). The fake kernels below describe each operator's outputs
without computing them, which is what torch.compile, FakeTensor and
``torch.library.opcheck`` need; they must agree with the C++ implementations
on shapes, dtypes and strides.
"""

import os
import warnings

import torch

from . import _C  # noqa: F401  (loads the library, registering the operators)

ops = torch.ops.fused_ce


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, every other floating type in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_element(input: torch.Tensor) -> torch.Tensor:
    n, _, d = input.shape
    return input.new_empty((n, d), dtype=accumulate_dtype(input.dtype))


def _gradient_like(t: torch.Tensor) -> torch.Tensor:
    """The layout every backend gives gradients: torch.empty_like's, so a
    dense tensor's strides are kept (channels-last stays channels-last)."""
    return torch.empty_like(t)


@torch.library.register_fake("fused_ce::cross_entropy_forward")
def _forward_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    total_weight = input.new_empty((), dtype=accumulate_dtype(input.dtype))
    return _per_element(input), _per_element(input), total_weight


@torch.library.register_fake("fused_ce::cross_entropy_forward_with_grad")
def _forward_with_grad_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                            reduction):
    loss, lse, total_weight = _forward_fake(input, target, weight, ignore_index, label_smoothing,
                                            z_loss, softcap)
    return loss, lse, total_weight, _gradient_like(input)


@torch.library.register_fake("fused_ce::cross_entropy_forward_with_grad_inplace")
def _forward_with_grad_inplace_fake(input, target, weight, ignore_index, label_smoothing, z_loss,
                                    softcap, reduction):
    return _forward_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)


@torch.library.register_fake("fused_ce::cross_entropy_backward")
def _backward_fake(grad_loss, grad_lse, input, target, weight, lse, ignore_index, label_smoothing,
                   z_loss, softcap, input_grad, target_grad):
    grad_input = _gradient_like(input) if input_grad else input.new_empty((0,))
    grad_target = _gradient_like(target) if target_grad else target.new_empty((0,))
    return grad_input, grad_target


@torch.library.register_fake("fused_ce::scale_gradient_")
def _scale_gradient_fake(grad, scale):
    return None


@torch.library.register_fake("fused_ce::reduce_loss")
def _reduce_loss_fake(loss, total_weight, reduction, dtype):
    return loss.new_empty((), dtype=dtype)


def cpu_capability() -> str:
    """The instruction set the CPU kernels run with: ``"avx512_bf16"`` (AVX-512
    with its bfloat16 conversions, which only the bfloat16 kernel uses),
    ``"avx512"``, ``"avx2"`` or ``"default"`` (the compiler's baseline, SSE2 on
    x86-64). The best the CPU
    supports, unless the environment variable ``FUSED_CE_CPU_CAPABILITY``
    names a lower one (read once, when fused_ce is imported)."""
    return _C.cpu_capability()


def supported_cpu_capabilities() -> list:
    """The instruction sets the CPU kernels can run with on this CPU, from
    ``"default"`` up: the values ``FUSED_CE_CPU_CAPABILITY`` may take here."""
    return list(_C.supported_cpu_capabilities())


def _check_requested_capability() -> None:
    requested = os.environ.get("FUSED_CE_CPU_CAPABILITY")
    active = cpu_capability()  # also pins the choice for the whole process
    if requested is not None and requested != active:
        warnings.warn(
            f"FUSED_CE_CPU_CAPABILITY={requested!r} is not one of this CPU's instruction sets "
            f"{supported_cpu_capabilities()}; the CPU kernels use {active!r}",
            RuntimeWarning,
            stacklevel=3,
        )


_check_requested_capability()


def built_with_cuda() -> bool:
    """Whether this build of fused_ce contains the CUDA kernels."""
    return _C.built_with_cuda()
