// See per_element_loss.h.

#include "per_element_loss.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "compiled_autograd_step.h"
#include "operator_calls.h"
#include "saved_operands.h"

namespace fused_ce {
namespace {

using torch::autograd::variable_list;
#if FUSED_CE_COMPILED_AUTOGRAD
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
#endif  // FUSED_CE_COMPILED_AUTOGRAD

// The per-element loss's autograd node. Its one edge leads to the input.
// Everything the backward reads is a saved variable (saved_operands.h), so
// that saved-tensor hooks (offloading, activation checkpointing) see all of
// it and in-place changes to the input, target or weight since the forward
// raise PyTorch's error.
class PerElementLossBackward : public torch::autograd::Node {
 public:
  PerElementLossBackward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         const at::Tensor& lse, LossOptions options)
      : saved_(input, target, weight, lse, /*lse_is_output=*/false),
        options_(options),
        input_sizes_(input.sizes().vec()) {}

  std::string name() const override { return "fused_ce::PerElementLossBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as autograd's own nodes: a graph may be shared by threads
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const auto self = getptr();
    const at::Tensor input = saved_.input(self), target = saved_.target(self), lse = saved_.lse(self);
    const std::optional<at::Tensor> weight = saved_.weight(self);
    const bool create_graph = at::GradMode::is_enabled();
    at::Tensor gradient;
    {
      at::NoGradGuard no_grad;
      const CanonicalArgs args = canonical(input, target);
      gradient = kernel_gradient(grad_output, args, weight, lse, options_, input_sizes_);
      // Forward-over-reverse with respect to the upstream gradient: the
      // gradient is linear in it, so its tangent is the same kernel applied
      // to the upstream gradient's tangent. (With create_graph the graph
      // below carries it.)
      const at::Tensor tangent = grad_output._fw_grad(/*level=*/0);
      if (tangent.defined() && !create_graph)
        gradient = at::_make_dual(gradient, kernel_gradient(tangent, args, weight, lse, options_, input_sizes_),
                                  /*level=*/0);
    }
    if (!create_graph) return {gradient};
    // create_graph=True: the kernel's gradient carrying the derivatives of
    // the same gradient formed from the loss in torch operations, h:
    // gradient + (h - h.detach()) has the kernel's values and h's graph.
    const at::Tensor loss = differentiable_loss_op(input, target, weight, options_).reshape(grad_output.sizes());
    const at::Tensor h = torch::autograd::grad({loss}, {input}, {grad_output.to(loss.scalar_type())},
                                               /*retain_graph=*/true, /*create_graph=*/true,
                                               /*allow_unused=*/true)[0];
    if (!h.defined()) return {gradient};
    return {gradient + (h - h.detach())};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_.release();
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // Compiled autograd (compiled_autograd_step.h): the graph gets the
  // backward operator's gradient for the upstream gradient of each element;
  // compiled_backward below.
  void compiled_args(CompiledNodeArgs& args) const override {
    saved_.collect(args);
    collect_options(args, options_);
    args.collect(input_sizes_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_.swap_in(saved);
    std::vector<c10::IValue> args = saved_.packed(getptr());
    pack_options(args, options_);
    args.emplace_back(input_sizes_);
    variable_list result = call_in_compiled_graph(*this, name(), compiled_backward, grads, args, saved);
    saved_.swap_out(saved);
    return result;
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

 private:
#if FUSED_CE_COMPILED_AUTOGRAD
  // What the compiled graph calls, with apply_with_saved's arguments:
  // (input, target, [weight], lse, 4 options, input sizes).
  static variable_list compiled_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return {at::Tensor()};
    constexpr size_t kOptions = SavedLossOperands::kPackedArgs;
    return {kernel_gradient(grad_output, canonical(args[0].toTensor(), args[1].toTensor()),
                            optional_tensor_from_arg(args[2]), args[3].toTensor(), unpack_options(args, kOptions),
                            args[kOptions + 4].toIntVector())};
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

  // The backward operator's input gradient for a per-element upstream
  // gradient shaped like the loss, in the input's sizes.
  static at::Tensor kernel_gradient(const at::Tensor& grad_output, const CanonicalArgs& args,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                    const LossOptions& options, at::IntArrayRef input_sizes) {
    const at::Tensor grad_loss = grad_output.to(lse.scalar_type()).reshape(lse.sizes());
    return input_gradient_op(grad_loss, args.input, args.target, weight, lse, options).reshape(input_sizes);
  }

  // input and target as the caller passed them: (N, C, d1, ..., dk) and
  // (N, d1, ..., dk) class indices or probabilities; lse (N, D), accumulate type.
  SavedLossOperands saved_;
  LossOptions options_;
  std::vector<int64_t> input_sizes_;
};

}  // namespace

at::Tensor batch_shaped(const at::Tensor& loss, const at::Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape.erase(shape.begin() + 1);
  const at::Tensor out = loss.reshape(shape);
  return out.scalar_type() == input.scalar_type() ? out : out.to(input.scalar_type());
}

at::Tensor per_element_loss_with_gradient(const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, const LossOptions& options) {
  at::Tensor result, lse;
  {
    // As in any forward, autograd records none of this.
    at::NoGradGuard no_grad;
    const CanonicalArgs args = canonical(input, target);
    auto [loss, per_element_lse, total_weight] = forward_op(args.input, args.target, weight, options);
    // Below the ADInplaceOrView key the reshape makes no autograd view, so
    // the loss is a tensor of its own, which may be modified in place, as
    // PyTorch's may.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = batch_shaped(loss, input);
    lse = std::move(per_element_lse);
  }
  NodePtr node = make_node<PerElementLossBackward>(input, target, weight, lse, options);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(result, node);
  return result;
}

}  // namespace fused_ce
