// cross_entropy_loss (see autograd.h): the operators of ops.cpp composed
// with a C++ autograd node, for a reduced loss; per_element_loss.h has the
// node of reduction="none". The operators are called through the
// dispatcher (operator_calls.h).

#include "autograd.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "compiled_autograd_step.h"
#include "cross_entropy.h"
#include "double_backward.h"
#include "error_message.h"
#include "operator_calls.h"
#include "per_element_loss.h"

namespace fused_ce {
namespace {

using torch::autograd::variable_list;
#if FUSED_CE_COMPILED_AUTOGRAD
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
#endif  // FUSED_CE_COMPILED_AUTOGRAD

// ---------------------------------------------------------------------------
// The reduction, exactly as fused_ce/autograd.py does it.

// The per-element loss reduced (sum over total_weight for the mean) in the
// input's dtype by the reduce_loss operator, as the Python Function does, so
// both paths give the same bits; for reduction="none", shaped like the
// target's batch.
at::Tensor reduce(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                  const at::Tensor& input) {
  if (reduction == static_cast<int64_t>(Reduction::None)) return batch_shaped(loss, input);
  return reduce_loss_op(loss, total_weight, reduction, input.scalar_type());
}

bool is_reduced(int64_t reduction) {
  return reduction == static_cast<int64_t>(Reduction::Mean) ||
         reduction == static_cast<int64_t>(Reduction::Sum);
}

// ---------------------------------------------------------------------------
// The node.

// The loss's autograd node, grad_fn.name() "fused_ce::CrossEntropyLossBackward".
// Its one edge leads to the input. Written as a Node, as PyTorch's own
// backward nodes are, rather than as a torch::autograd::Function, whose
// generic bookkeeping (the argument and output records, the saved-data
// dictionary) took about 1 us more per forward on the CPU machine
// (benchmarks/results/cpu-2026-11-27-host-cost/).
class CrossEntropyLossBackward : public torch::autograd::Node {
 public:
  // The gradient for an upstream gradient of 1 from the forward. With
  // `device_scaled` it is held until the first backward scales it in place
  // and hands it out (not a saved variable: a second backward's unpacking
  // would find it modified); the input is saved instead, from which a second
  // backward (retain_graph=True) recomputes it: the same kernel gives the
  // same bits. Otherwise the gradient is saved.
  //
  // `state` is what a recomputation and the double backward
  // (double_backward.h) need besides the gradient, which it leaves
  // undefined: O(N) tensors and scalars, kept as a plain member rather than
  // as saved variables, so that a plain backward unpacks nothing but the
  // gradient.
  CrossEntropyLossBackward(SavedGradient state, std::vector<int64_t> input_sizes, bool device_scaled,
                           const at::Tensor& gradient, const at::Tensor& input)
      : state_(std::move(state)),
        input_sizes_(std::move(input_sizes)),
        device_scaled_(device_scaled),
        saved_(device_scaled ? input : gradient, /*is_output=*/false),
        held_gradient_(device_scaled ? gradient : at::Tensor()) {}

  std::string name() const override { return "fused_ce::CrossEntropyLossBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as autograd's own nodes: a graph may be shared by threads
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined() || !task_should_compute_output(0)) return {at::Tensor()};
    if (at::GradMode::is_enabled()) return {differentiable(grad_output)};  // create_graph=True
    return {(device_scaled_ ? device_scaled_gradient(grad_output) : saved_gradient(grad_output))
                .reshape(input_sizes_)};
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_.reset_data();
    held_gradient_.reset();
  }

#if FUSED_CE_COMPILED_AUTOGRAD
  // Compiled autograd (compiled_autograd_step.h): the graph gets the
  // gradient times grad_output, out of place, the gradient being the held
  // one, the saved one, or (after a first backward took the held one)
  // recomputed from the saved input; compiled_backward below.
  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(recomputes());
    args.collect(saved_, /*is_output=*/false);
    if (held_gradient_.defined()) args.collect(held_gradient_);
    args.collect(state_.target);
    args.collect(state_.weight.defined());
    if (state_.weight.defined()) args.collect(state_.weight);
    collect_options(args, state_.options);
    args.collect(static_cast<int64_t>(state_.reduction));
    args.collect(input_sizes_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved.before(saved_);
    saved.before(held_gradient_);
    saved.before(state_.target);
    saved.before(state_.weight);
    const bool recompute = recomputes();
    std::vector<c10::IValue> args{recompute, held_gradient_.defined() ? held_gradient_ : saved_.unpack(getptr()),
                                  state_.target, optional_tensor_arg(state_.weight)};
    pack_options(args, state_.options);
    args.emplace_back(static_cast<int64_t>(state_.reduction));
    args.emplace_back(input_sizes_);
    variable_list result = call_in_compiled_graph(*this, name(), compiled_backward, grads, args, saved);
    saved.after(saved_);
    saved.after(held_gradient_);
    saved.after(state_.target);
    saved.after(state_.weight);
    return result;
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

 private:
  // Whether the gradient must be recomputed from the saved input.
  bool recomputes() const { return device_scaled_ && !held_gradient_.defined(); }

#if FUSED_CE_COMPILED_AUTOGRAD
  // What the compiled graph calls, with apply_with_saved's arguments:
  // (recompute, gradient or input, target, [weight], 4 options, reduction,
  // input sizes). Tensor operations alone, out of place.
  static variable_list compiled_backward(const variable_list& grads, const std::vector<c10::IValue>& args) {
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return {at::Tensor()};
    const at::Tensor gradient = args[0].toBool() ? recomputed_gradient(args[1].toTensor(), args[2].toTensor(),
                                                                       optional_tensor_from_arg(args[3]),
                                                                       unpack_options(args, 4), args[8].toInt())
                                                 : args[1].toTensor();
    return {(gradient * grad_output).reshape(args[9].toIntVector())};
  }
#endif  // FUSED_CE_COMPILED_AUTOGRAD

  // The gradient for an upstream gradient of 1: the held one (handed over
  // when `take`, so that it can be scaled in place), or, after a first
  // backward took it, a recomputed one.
  at::Tensor unscaled_device_gradient(bool take) {
    if (held_gradient_.defined()) {
      at::Tensor gradient = held_gradient_;
      if (take) held_gradient_.reset();
      return gradient;
    }
    return recomputed_gradient(saved_.unpack(getptr()), state_.target, optional_tensor(state_.weight), state_.options,
                               static_cast<int64_t>(state_.reduction));
  }

  // The gradient for an upstream gradient of 1, from the logits again (the
  // same kernel as the forward's, so the same bits).
  static at::Tensor recomputed_gradient(const at::Tensor& input, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, const LossOptions& options,
                                        int64_t reduction) {
    const CanonicalArgs args = canonical(input, target);
    return std::get<3>(forward_with_grad_op(args.input, args.target, weight, options, reduction));
  }

  // Whether grad_output is more than one plain number, so that the product
  // must be formed (out of place, with differentiable ops): under vmap over
  // the upstream gradient (torch.autograd.grad's is_grads_batched and
  // gradcheck's check_batched_grad, with autograd's own batching;
  // torch.func.vmap around a backward) it holds one scalar per batch element,
  // which can neither be read on the host nor applied in place; with a
  // forward-mode tangent (forward-over-reverse) skipping a product by 1
  // would drop the tangent.
  static bool needs_product(const at::Tensor& grad_output) {
    const c10::DispatchKeySet keys = grad_output.key_set();
    return keys.has(c10::DispatchKey::Batched) || keys.has(c10::DispatchKey::FuncTorchBatched) ||
           grad_output._fw_grad(/*level=*/0).defined();
  }

  // The held gradient scaled in place on the device; untouched when
  // grad_output is 1.
  at::Tensor device_scaled_gradient(const at::Tensor& grad_output) {
    if (needs_product(grad_output)) return unscaled_device_gradient(/*take=*/false) * grad_output;
    at::Tensor gradient = unscaled_device_gradient(/*take=*/true);
    scale_gradient_op(gradient, grad_output);
    return gradient;
  }

  // The saved gradient times grad_output. Reading a CPU scalar is free, so
  // the pass is skipped when it is 1. Otherwise (a sum divided by a token
  // count, a loss weight) it is scaled in place when this backward is its
  // last use: the graph is freed after it (no retain_graph=True, which
  // needs it unchanged for a second backward) and no saved-tensor hook
  // packed it (a hook may have kept the very tensor). That spares a
  // gradient-sized allocation, whose fresh pages cost more than the product
  // itself on the CPU (2048 x 32000 float32: a sum / N step took 7x the mean's).
  at::Tensor saved_gradient(const at::Tensor& grad_output) {
    at::Tensor gradient = saved_.unpack(getptr());
    if (needs_product(grad_output)) return gradient * grad_output;
    if (grad_output.is_cpu() && grad_output.item<double>() == 1.0) return gradient;
    if (!saved_.has_hooks() && !torch::autograd::get_current_graph_task_keep_graph()) {
      scale_gradient_op(gradient, grad_output);
      return gradient;
    }
    return gradient * grad_output;
  }

  // create_graph=True: grad_output times the gradient, differentiable with
  // respect to the input and grad_output (double_backward.h), out of place.
  // The saved gradient stays for a later backward; on CUDA the held one is
  // handed to the double backward (a later backward recomputes it), since a
  // plain backward would scale it in place under the double backward's feet.
  // Without the softcap, and only when the autograd engine runs this node
  // (not a direct call of grad_fn); otherwise differentiating the gradient
  // raises.
  at::Tensor differentiable(const at::Tensor& grad_output) {
    at::Tensor gradient;
    {
      at::NoGradGuard no_grad;
      gradient = device_scaled_ ? unscaled_device_gradient(/*take=*/true) : saved_.unpack(getptr());
      gradient = gradient.reshape(input_sizes_);
    }
    const bool run_by_engine = torch::autograd::get_current_node().get() == this;
    torch::autograd::edge_list depends_on;
    if (run_by_engine) depends_on.push_back(next_edge(0));
    if (grad_output.requires_grad()) depends_on.push_back(torch::autograd::impl::gradient_edge(grad_output));
    if (state_.options.softcap != 0 || !run_by_engine) {
      at::Tensor scaled;
      {
        at::NoGradGuard no_grad;
        scaled = gradient * grad_output;
      }
      return refuse_differentiation(
          scaled,
          state_.options.softcap != 0
              ? "fused_ce.cross_entropy: with softcap the gradient is not differentiable (double backward / "
                "create_graph=True would need the logits, which the loss does not keep)"
              : "fused_ce.cross_entropy: the gradient is only differentiable in a backward run by autograd's "
                "engine",
          std::move(depends_on));
    }
    SavedGradient for_double_backward = state_;
    for_double_backward.gradient = gradient;
    check_unmodified(for_double_backward);
    return differentiable_gradient(std::move(for_double_backward), grad_output, next_edge(0));
  }

  SavedGradient state_;  // all but the gradient
  std::vector<int64_t> input_sizes_;
  bool device_scaled_;
  torch::autograd::SavedVariable saved_;  // the gradient, or (device_scaled) the input
  at::Tensor held_gradient_;              // device_scaled: the gradient until a backward takes it
};

// The reduced loss, its gradient computed by the forward, and the node that
// scales it in the backward.
at::Tensor loss_with_gradient(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const LossOptions& options,
                              int64_t reduction, bool device_scaled) {
  at::Tensor result, gradient;
  SavedGradient state{};
  {
    // As in any forward, autograd records none of this (the operators run
    // below it; the canonical views are taken without grad, sharing their
    // bases' version counters).
    at::NoGradGuard no_grad;
    const CanonicalArgs args = canonical(input, target);
    auto [loss, lse, total_weight, grad] = forward_with_grad_op(args.input, args.target, weight, options, reduction);
    result = reduce(loss, total_weight, reduction, input);
    gradient = std::move(grad);
    state.target = args.target;
    state.target_version = args.target._version();
    state.lse = options.z_loss != 0 ? lse : at::Tensor();
    state.total_weight = total_weight;
  }
  if (weight.has_value()) {
    state.weight = *weight;
    state.weight_version = weight->_version();
  }
  state.options = options;
  state.reduction = static_cast<Reduction>(reduction);
  NodePtr node = make_node<CrossEntropyLossBackward>(std::move(state), input.sizes().vec(), device_scaled,
                                                      gradient, input);
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(result, node);
  return result;
}

}  // namespace

at::Tensor cross_entropy_loss(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, int64_t ignore_index,
                              double label_smoothing, double z_loss, double softcap,
                              int64_t reduction, bool device_scaled) {
  FUSED_CE_CHECK(input.dim() >= 2, "fused_ce: cross_entropy_loss expects batched input (N, C, ...), got ",
                 input.dim(), " dimension(s)");
  FUSED_CE_CHECK(reduction == static_cast<int64_t>(Reduction::None) || is_reduced(reduction),
                 "fused_ce: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && input.requires_grad()) {
    FUSED_CE_CHECK(!target.requires_grad(),
                   "fused_ce: cross_entropy_loss computes gradients with respect to the input only; use "
                   "fused_ce.CrossEntropyFunction for a target gradient");
    if (!is_reduced(reduction)) return per_element_loss_with_gradient(input, target, weight, options);
    return loss_with_gradient(input, target, weight, options, reduction, device_scaled);
  }
  FUSED_CE_CHECK(!(grad_mode && target.requires_grad()),
                 "fused_ce: cross_entropy_loss gives no gradient for the target; use "
                 "fused_ce.CrossEntropyFunction");
  // No graph to build: the forward alone.
  const CanonicalArgs args = canonical(input, target);
  auto [loss, lse, total_weight] = forward_op(args.input, args.target, weight, options);
  return reduce(loss, total_weight, reduction, input);
}

}  // namespace fused_ce
