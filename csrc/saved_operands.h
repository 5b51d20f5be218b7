// What a loss's autograd node keeps for its backward, which reads the
// operands again: the input, the target, the class weights (optional) and
// the per-row log-sum-exp, as saved variables, so that saved-tensor hooks
// see all of them and in-place changes since the forward raise PyTorch's
// error. Shared by the per-element loss's node (per_element_loss.cpp) and
// the operators' own (operator_autograd.cpp), with what compiled autograd
// asks of each (compiled_autograd_step.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <optional>
#include <vector>

#include "autograd_node.h"
#include "compiled_autograd_step.h"

namespace fused_ce {

class SavedLossOperands {
 public:
  // lse_is_output: lse is an output of the node that saves it (the forward
  // operators' node) rather than an input (the per-element node's).
  SavedLossOperands(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, bool lse_is_output)
      : input_(input, /*is_output=*/false),
        target_(target, /*is_output=*/false),
        weight_(weight.value_or(at::Tensor()), /*is_output=*/false),
        lse_(lse, lse_is_output),
        has_weight_(weight.has_value() && weight->defined()),
        lse_is_output_(lse_is_output) {}

  // For an lse that is an output of the node: saved once its history is set.
  void save_lse(const at::Tensor& lse) { lse_ = torch::autograd::SavedVariable(lse, lse_is_output_); }

  at::Tensor input(const NodePtr& node) const { return input_.unpack(node); }
  at::Tensor target(const NodePtr& node) const { return target_.unpack(node); }
  std::optional<at::Tensor> weight(const NodePtr& node) const {
    return has_weight_ ? std::optional<at::Tensor>(weight_.unpack(node)) : std::nullopt;
  }
  at::Tensor lse(const NodePtr& node) const { return lse_.unpack(node); }

  // Node::release_variables.
  void release() {
    input_.reset_data();
    target_.reset_data();
    weight_.reset_data();
    lse_.reset_data();
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // Compiled autograd: the tensors as the graph's inputs (compiled_args),
  // swapped for the compiler's proxies around the call (apply_with_saved),
  // and as the first packed arguments: (input, target, [weight], lse).
  void collect(torch::dynamo::autograd::CompiledNodeArgs& args) const {
    args.collect(input_, /*is_output=*/false);
    args.collect(target_, /*is_output=*/false);
    args.collect(has_weight_);
    if (has_weight_) args.collect(weight_, /*is_output=*/false);
    args.collect(lse_, lse_is_output_);
  }
  void swap_in(torch::dynamo::autograd::SwapSavedVariables& saved) {
    saved.before(input_);
    saved.before(target_);
    if (has_weight_) saved.before(weight_);
    saved.before(lse_);
  }
  void swap_out(torch::dynamo::autograd::SwapSavedVariables& saved) {
    saved.after(input_);
    saved.after(target_);
    if (has_weight_) saved.after(weight_);
    saved.after(lse_);
  }
  std::vector<c10::IValue> packed(const NodePtr& node) const {
    return {input_.unpack(node), target_.unpack(node),
            optional_tensor_arg(has_weight_ ? weight_.unpack(node) : at::Tensor()), lse_.unpack(node)};
  }
  // The number of arguments packed() gives, where the node's own follow.
  static constexpr size_t kPackedArgs = 4;
#endif  // FUSED_CE_COMPILED_AUTOGRAD

 private:
  torch::autograd::SavedVariable input_, target_, weight_, lse_;
  bool has_weight_;
  bool lse_is_output_;
};

}  // namespace fused_ce
