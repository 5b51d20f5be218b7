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
#include "cross_entropy.h"
#include "double_backward.h"
#include "operator_calls.h"

namespace fused_ce {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The backward of cross_entropy_forward(_with_grad)'s loss (output 0) and
// lse (output 1); its edges lead to the input and the target.
class OperatorForwardBackward : public torch::autograd::Node {
 public:
  OperatorForwardBackward(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          LossOptions options)
      : input_(input, /*is_output=*/false),
        target_(target, /*is_output=*/false),
        weight_(weight.value_or(at::Tensor()), /*is_output=*/false),
        options_(options) {}

  // lse is one of this node's outputs: saved as such, once its history is set.
  void save_lse(const at::Tensor& lse) { lse_ = SavedVariable(lse, /*is_output=*/true); }

  std::string name() const override { return "fused_ce::CrossEntropyForwardBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor &grad_loss = grads[0], &grad_lse = grads[1];
    const bool input_grad = task_should_compute_output(0), target_grad = task_should_compute_output(1);
    if ((!grad_loss.defined() && !grad_lse.defined()) || !(input_grad || target_grad)) return {at::Tensor(), at::Tensor()};
    const auto self = getptr();
    const at::Tensor input = input_.unpack(self), target = target_.unpack(self), lse = lse_.unpack(self);
    // The operator needs grad_loss; a broadcast zero where only lse was used.
    const at::Tensor loss_grad = grad_loss.defined() ? grad_loss : at::zeros({}, lse.options()).expand(lse.sizes());
    auto [grad_input, grad_target] =
        backward_op(loss_grad, grad_lse.defined() ? std::optional<at::Tensor>(grad_lse) : std::nullopt, input, target,
                    optional_tensor(weight_.unpack(self)), lse, options_, input_grad, target_grad);
    variable_list result{input_grad ? grad_input : at::Tensor(), target_grad ? grad_target : at::Tensor()};
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
    input_.reset_data();
    target_.reset_data();
    weight_.reset_data();
    lse_.reset_data();
  }

 private:
  SavedVariable input_, target_, weight_, lse_;
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
    if (!grads[0].defined() || !task_should_compute_output(0)) return {at::Tensor()};
    at::Tensor grad = grads[0].to(loss_dtype_);
    if (mean_) grad = grad / total_weight_.unpack(getptr());
    return {grad.expand(loss_sizes_)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    total_weight_.reset_data();
  }

 private:
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
