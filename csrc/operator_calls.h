// The library's operators (ops.cpp) called from the C++ autograd nodes
// (autograd.cpp, per_element_loss.cpp), through the dispatcher, so that
// these files are the same for every backend and dispatch modes, profilers
// and fake tensors see the same operator calls as from Python. The
// operators have no autograd kernels (the nodes are their autograd), so
// each call but differentiable_loss starts below the autograd keys: that
// skips autograd's boxed fallback, a microsecond or two per call.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cross_entropy.h"

namespace fused_ce {

// The operators' canonical views of batched arguments: input (N, C, D) and
// target (N, D), or (N, C, D) for probabilities; views wherever the strides
// allow.
struct CanonicalArgs {
  at::Tensor input, target;
};

CanonicalArgs canonical(const at::Tensor& input, const at::Tensor& target);

// A tensor that may be undefined (the nodes keep a missing class weight so)
// as the operators' optional argument.
inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// cross_entropy_forward: (loss, lse, total_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& input, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          const LossOptions& options);

// cross_entropy_forward_with_grad: (loss, lse, total_weight, gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_op(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const LossOptions& options, int64_t reduction);

// cross_entropy_backward: (grad_input, grad_target), each an empty tensor
// unless requested, from (N, D) grad_loss and grad_lse in the accumulate type.
std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                               const at::Tensor& input, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                               const LossOptions& options, bool input_grad, bool target_grad);

// cross_entropy_backward for the input's gradient alone, from a (N, D)
// grad_loss in the accumulate type.
at::Tensor input_gradient_op(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const LossOptions& options);

void scale_gradient_op(at::Tensor& grad, const at::Tensor& scale);

at::Tensor reduce_loss_op(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                          at::ScalarType dtype);

// differentiable_loss (its kernel is Python's, fused_ce/autograd.py): the
// (N, D) per-element loss of batched arguments built from torch operations,
// which autograd differentiates to any order. Called with autograd on.
at::Tensor differentiable_loss_op(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const LossOptions& options);

}  // namespace fused_ce
