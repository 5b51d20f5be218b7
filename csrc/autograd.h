// The loss of the common cases with its autograd node in C++: the fast path
// of fused_ce.cross_entropy (fused_ce/functional.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fused_ce {

// The loss for batched input (N, C, d1, ..., dk) and a class-index target
// (N, d1, ..., dk) int64 or a probability target shaped like the input, with
// the options of the operators (ops.cpp) and reduction 0 (none), 1 (mean) or
// 2 (sum). Returns the loss in the input's dtype: a scalar, or shaped like
// the target's batch for reduction 0.
//
// When autograd needs a gradient (grad mode on and input.requires_grad()),
// the target must not require grad. For reduction none the loss takes the
// per-element node (per_element_loss.h). For mean and sum the forward
// computes the gradient of the reduced loss
// (cross_entropy_forward_with_grad) and the node's backward only scales it.
// `device_scaled` picks how: the gradient is held until the first backward
// and scaled in place by scale_gradient_, which skips the pass on the device
// when the upstream gradient is 1 (CUDA: no host synchronisation); otherwise
// it is saved, and scaled unless the upstream gradient is 1: in place when
// the backward frees the graph, else out of place.
// With create_graph=True the gradient it hands out can be differentiated
// once more, without the logits (double_backward.h), except with a softcap.
// Target gradients go through the Python CrossEntropyFunction
// (fused_ce/autograd.py); the C++ nodes exist because a Python
// autograd.Function costs about 14 microseconds more per training step (4 x
// 10 on the CPU machine: 29-30 us against 14-15), half of a small step.
at::Tensor cross_entropy_loss(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, int64_t ignore_index,
                              double label_smoothing, double z_loss, double softcap,
                              int64_t reduction, bool device_scaled);

}  // namespace fused_ce
