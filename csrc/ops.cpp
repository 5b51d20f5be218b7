// Operator schemas of the fused_ce library. Implementations are registered
// per backend (cpu/cross_entropy_cpu.cpp, cuda/cross_entropy_cuda.cu); the
// fake (meta) kernels used by torch.compile live in fused_ce/_ops.py.
//
// All operators take the canonical layout built by fused_ce/functional.py:
// input (N, C, D) with any strides (class axis 1), and either class-index
// targets (N, D) int64 or probability targets shaped like the input.
// Per-element results are in the accumulate type (float64 for float64
// inputs, float32 otherwise); the autograd layers (fused_ce/autograd.py,
// csrc/autograd.cpp) reduce them with reduce_loss, below.
//
// Options shared by every operator: ignore_index and label_smoothing as in
// torch.nn.CrossEntropyLoss; z_loss (>= 0) adds z_loss * lse^2 per element,
// weighted by the target's class weight like the NLL term; softcap (> 0, or
// 0 for none) maps every logit x to softcap * tanh(x / softcap) first.

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_ce, m) {
  // Per-element loss, per-element log-sum-exp and the mean's denominator
  // (sum of target weights over non-ignored elements, N * D for
  // probability targets).
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap) "
      "-> (Tensor loss, Tensor lse, Tensor total_weight)",
      {at::Tag::pt2_compliant_tag});

  // The forward plus the gradient of the reduced loss (reduction 1 = mean,
  // 2 = sum) for an upstream gradient of 1, in the same pass over the
  // logits. The backward then only scales it, so forward + backward reads
  // the logits once.
  m.def(
      "cross_entropy_forward_with_grad(Tensor input, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int reduction) -> "
      "(Tensor loss, Tensor lse, Tensor total_weight, Tensor grad_input)",
      {at::Tag::pt2_compliant_tag});

  // forward_with_grad writing the gradient over the (contiguous) input
  // itself: forward + backward then needs O(N) memory beyond the logits.
  // The caller must bump the input's version counter (fused_ce/autograd.py
  // does) so that autograd catches other users of the overwritten logits.
  m.def(
      "cross_entropy_forward_with_grad_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int reduction) -> "
      "(Tensor loss, Tensor lse, Tensor total_weight)",
      {at::Tag::pt2_compliant_tag});

  // Gradients from the saved log-sum-exp: grad_loss is d(loss)/d(loss_i)
  // and grad_lse (optional) d(loss)/d(lse_i), both (N, D) in the accumulate
  // type with any strides (0 for a broadcast scalar). A gradient that is not
  // requested comes back as an empty tensor.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor target, "
      "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, bool input_grad, bool target_grad) "
      "-> (Tensor grad_input, Tensor grad_target)",
      {at::Tag::pt2_compliant_tag});

  // The backward of a gradient that forward_with_grad computed for an
  // upstream gradient of 1: multiplies it in place by the actual upstream
  // gradient `scale` (one element), and leaves it untouched when that is
  // exactly 1. On CUDA the check happens on the device, so the common
  // loss.backward() costs no pass over the gradient and no host
  // synchronisation.
  m.def("scale_gradient_(Tensor(a!) grad, Tensor scale) -> ()", {at::Tag::pt2_compliant_tag});

  // A per-element loss (any shape, in the accumulate type of `dtype`)
  // reduced to the loss itself, a 0-dim tensor of `dtype`: its sum
  // (reduction 2), or its sum over total_weight (reduction 1, the mean;
  // NaN where total_weight is 0, as PyTorch's mean of a batch whose targets
  // are all ignored or of class weight 0, label smoothing or not).
  // Summed in an order fixed by the number of elements alone, so the bits
  // do not depend on threads or scheduling. One operator instead of ATen's
  // sum, division and cast: on a GPU that is one or two small kernels
  // instead of three, and much less host time per call.
  m.def("reduce_loss(Tensor loss, Tensor total_weight, int reduction, ScalarType dtype) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // The (N, D) per-element loss (float32, float64 for float64 input) of
  // batched arguments (N, C, d1, ..., dk) built from torch operations, so
  // that autograd can differentiate it to any order: the C++ node of
  // reduction="none" (per_element_loss.h) differentiates it for
  // create_graph=True. Its one kernel, CompositeImplicitAutograd, is the
  // Python formula that fused_ce/autograd.py registers (_differentiable_loss).
  m.def(
      "differentiable_loss(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap) -> Tensor");
}

// cross_entropy_backward has no derivative of its own: with autograd's "not
// implemented" kernel differentiating through it raises, where autograd's
// default for operators without an autograd kernel only warns and treats the
// result as a constant (a silently zero second derivative under torch.func
// transforms). The forward operators and reduce_loss have first derivatives
// (operator_autograd.cpp), for graphs that hold them directly; fused_ce's own
// autograd layers (csrc/autograd.cpp, fused_ce/autograd.py) call them below
// autograd or without grad mode. The in-place operators only run inside those
// layers' backward passes and without grad mode.
TORCH_LIBRARY_IMPL(fused_ce, Autograd, m) {
  m.impl("cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}
