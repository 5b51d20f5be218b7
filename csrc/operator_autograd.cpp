// First derivatives of the operators themselves: cross_entropy_forward and
// cross_entropy_forward_with_grad (the per-element loss and log-sum-exp with
// respect to the input, and to probability targets), and reduce_loss.
//
// fused_ce's losses never rely on these: their autograd nodes (autograd.cpp,
// per_element_loss.cpp, fused_ce/autograd.py) call the operators below
// autograd or with grad mode off, and these kernels then only pass the call
// on. They serve graphs that hold the operators themselves: a model exported
// with torch.export (which inlines the Python autograd Function and keeps
// the operators) and then trained, and code that calls torch.ops.fused_ce.*
// directly. The backward is the cross_entropy_backward operator (one read of
// the logits), which has no derivative: differentiating these gradients
// again raises (refuse_differentiation) rather than giving a silent zero.
// cross_entropy_backward keeps autograd's "not implemented" kernel (ops.cpp).
// Both nodes also run as steps of a compiled-autograd graph
// (compiled_autograd_step.h): an exported model trained under torch.compile's
// compiled_autograd.

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "compiled_autograd_step.h"
#include "cross_entropy.h"
#include "double_backward.h"
#include "operator_calls.h"
#include "saved_operands.h"

namespace fused_ce {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
#if FUSED_CE_COMPILED_AUTOGRAD
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
#endif  // FUSED_CE_COMPILED_AUTOGRAD

// The backward of cross_entropy_forward(_with_grad)'s loss (output 0) and
// lse (output 1); its edges lead to the input and the target.
class OperatorForwardBackward : public torch::autograd::Node {
 public:
  OperatorForwardBackward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          LossOptions options)
      : saved_(input, target, weight, at::Tensor(), /*lse_is_output=*/true), options_(options) {}

  // lse is one of this node's outputs: saved as such, once its history is set.
  void save_lse(const at::Tensor& lse) { saved_.save_lse(lse); }

  std::string name() const override { return "fused_ce::CrossEntropyForwardBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool input_grad = task_should_compute_output(0), target_grad = task_should_compute_output(1);
    const auto self = getptr();
    variable_list result = gradients(grads, saved_.input(self), saved_.target(self), saved_.weight(self),
                                     saved_.lse(self), options_, input_grad, target_grad);
    if (at::GradMode::is_enabled()) {  // create_graph=True: no second derivative to give
      torch::autograd::edge_list depends_on{next_edge(0), next_edge(1)};
      for (const at::Tensor& g : grads)
        if (g.defined() && g.requires_grad()) depends_on.push_back(torch::autograd::impl::gradient_edge(g));
      for (at::Tensor& r : result)
        if (r.defined())
          r = refuse_differentiation(r, "fused_ce: the gradient of the cross_entropy_forward operators is not "
                                        "differentiable", depends_on);
    }
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_.release();
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // Compiled autograd: the saved tensors are the graph's inputs; the
  // options and which gradients the edges want are its constants.
  void compiled_args(CompiledNodeArgs& args) const override {
    saved_.collect(args);
    collect_options(args, options_);
    args.collect(should_compute_output(0));
    args.collect(should_compute_output(1));
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_.swap_in(saved);
    std::vector<c10::IValue> args = saved_.packed(getptr());
    pack_options(args, options_);
    args.emplace_back(should_compute_output(0));
    args.emplace_back(should_compute_output(1));
    variable_list result = call_in_compiled_graph(*this, name(), compiled_backward, grads, args, saved);
    saved_.swap_out(saved);
    return result;
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

 private:
  // (grad_input, grad_target) from the upstream gradients of loss and lse,
  // either of which may be undefined; undefined where not wanted.
  static variable_list gradients(const variable_list& grads, const at::Tensor& input, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                 const LossOptions& options, bool input_grad, bool target_grad) {
    const at::Tensor &grad_loss = grads[0], &grad_lse = grads[1];
    if ((!grad_loss.defined() && !grad_lse.defined()) || !(input_grad || target_grad)) return {at::Tensor(), at::Tensor()};
    // The operator needs grad_loss; a broadcast zero where only lse was used.
    const at::Tensor loss_grad = grad_loss.defined() ? grad_loss : at::zeros({}, lse.options()).expand(lse.sizes());
    auto [grad_input, grad_target] =
        backward_op(loss_grad, grad_lse.defined() ? std::optional<at::Tensor>(grad_lse) : std::nullopt, input, target,
                    weight, lse, options, input_grad, target_grad);
    return {input_grad ? grad_input : at::Tensor(), target_grad ? grad_target : at::Tensor()};
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // What the compiled graph calls, with apply_with_saved's arguments:
  // (input, target, [weight], lse, 4 options, input_grad, target_grad).
  static variable_list compiled_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    constexpr size_t kOptions = SavedLossOperands::kPackedArgs;
    return gradients(grads, args[0].toTensor(), args[1].toTensor(), optional_tensor_from_arg(args[2]),
                     args[3].toTensor(), unpack_options(args, kOptions), args[kOptions + 4].toBool(),
                     args[kOptions + 5].toBool());
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

  SavedLossOperands saved_;
  LossOptions options_;
};

// The backward of reduce_loss: the upstream gradient spread over the
// per-element losses, over the total weight for the mean. Made of
// differentiable torch operations (the reduction is linear).
class ReduceLossBackward : public torch::autograd::Node {
 public:
  ReduceLossBackward(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction)
      : total_weight_(total_weight, /*is_output=*/false),
        mean_(reduction == static_cast<int64_t>(Reduction::Mean)),
        loss_sizes_(loss.sizes().vec()),
        loss_dtype_(loss.scalar_type()) {}

  std::string name() const override { return "fused_ce::ReduceLossBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!task_should_compute_output(0)) return {at::Tensor()};
    return {spread(grads[0], total_weight_.unpack(getptr()), mean_, loss_sizes_, loss_dtype_)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    total_weight_.reset_data();
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(total_weight_, /*is_output=*/false);
    args.collect(mean_);
    args.collect(loss_sizes_);
    args.collect(loss_dtype_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved.before(total_weight_);
    const std::vector<c10::IValue> args{total_weight_.unpack(getptr()), mean_, loss_sizes_,
                                        static_cast<int64_t>(loss_dtype_)};
    variable_list result = call_in_compiled_graph(*this, name(), compiled_backward, grads, args, saved);
    saved.after(total_weight_);
    return result;
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

 private:
  // The upstream gradient over the per-element losses (undefined stays so).
  static at::Tensor spread(const at::Tensor& grad_output, const at::Tensor& total_weight, bool mean,
                           at::IntArrayRef loss_sizes, at::ScalarType loss_dtype) {
    if (!grad_output.defined()) return at::Tensor();
    at::Tensor grad = grad_output.to(loss_dtype);
    if (mean) grad = grad / total_weight;
    return grad.expand(loss_sizes);
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // The compiled graph's call: (total_weight, mean, loss sizes, loss dtype).
  static variable_list compiled_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    return {spread(grads[0], args[0].toTensor(), args[1].toBool(), args[2].toIntVector(),
                   static_cast<at::ScalarType>(args[3].toInt()))};
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

  SavedVariable total_weight_;
  bool mean_;
  std::vector<int64_t> loss_sizes_;
  at::ScalarType loss_dtype_;
};

bool records_graph(const at::Tensor& input, const at::Tensor& target) {
  return at::GradMode::is_enabled() && (input.requires_grad() || target.requires_grad());
}

// Gives loss and lse the forward operator's backward node.
void record_forward(const at::Tensor& loss, const at::Tensor& lse, const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const LossOptions& options) {
  NodePtr node = make_node<OperatorForwardBackward>(input, target, weight, options);
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  torch::autograd::set_history(loss, node);
  torch::autograd::set_history(lse, node);
  static_cast<OperatorForwardBackward&>(*node).save_lse(lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_autograd(const at::Tensor& input, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                int64_t ignore_index, double label_smoothing,
                                                                double z_loss, double softcap) {
  const LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
  auto result = forward_op(input, target, weight, options);
  if (records_graph(input, target))
    record_forward(std::get<0>(result), std::get<1>(result), input, target, weight, options);
  return result;
}

// The gradient output (for an upstream gradient of 1) has no derivative of
// its own here: it is a value, like total_weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, int64_t reduction) {
  const LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
  auto result = forward_with_grad_op(input, target, weight, options, reduction);
  if (records_graph(input, target))
    record_forward(std::get<0>(result), std::get<1>(result), input, target, weight, options);
  return result;
}

at::Tensor reduce_loss_autograd(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                                at::ScalarType dtype) {
  at::Tensor result = reduce_loss_op(loss, total_weight, reduction, dtype);
  if (at::GradMode::is_enabled() && loss.requires_grad()) {
    NodePtr node = make_node<ReduceLossBackward>(loss, total_weight, reduction);
    node->set_next_edges(torch::autograd::collect_next_edges(loss));
    torch::autograd::set_history(result, node);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, Autograd, m) {
  m.impl("cross_entropy_forward", TORCH_FN(forward_autograd));
  m.impl("cross_entropy_forward_with_grad", TORCH_FN(forward_with_grad_autograd));
  m.impl("reduce_loss", TORCH_FN(reduce_loss_autograd));
}

}  // namespace fused_ce
