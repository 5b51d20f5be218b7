// The loss of reduction="none" with a gradient for the input: the C++ node
// of per-element losses (a mask, per-token weights or a custom reduction
// applied after the loss), fused_ce.cross_entropy's path for them since the
// Python CrossEntropyFunction costs about 18 us more per training step
// (4 x 10 on the CPU machine: 41-43 us against 23-24).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cross_entropy.h"

namespace fused_ce {

// The operator's (N, D) per-element loss of an (N, C, d1, ..., dk) input as
// the user sees it: shaped (N, d1, ..., dk), in the input's dtype.
at::Tensor batch_shaped(const at::Tensor& loss, const at::Tensor& input);

// The per-element loss of batched arguments (as cross_entropy_loss takes
// them, autograd.h) with its autograd node, "fused_ce::PerElementLossBackward":
// the forward saves the input and the per-element log-sum-exp; the backward
// recomputes the softmax from them (one read of the logits, one write of the
// gradient) for the upstream gradient of each element. With create_graph=True
// the gradient is differentiable to any order, as the Python Function's is:
// it carries the graph of the same loss built from torch operations.
at::Tensor per_element_loss_with_gradient(const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, const LossOptions& options);

}  // namespace fused_ce
