// cross_entropy_loss (see autograd.h): the operators of ops.cpp composed
// with a C++ autograd node. The operators are called through the dispatcher,
// so this file is the same for every backend, and dispatch modes, profilers
// and fake tensors see the same operator calls as from Python.

#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>

#include <string>
#include <tuple>
#include <utility>

#include "cross_entropy.h"
#include "double_backward.h"
#include "error_message.h"

namespace fused_ce {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------
// The operators, through the dispatcher. They have no autograd kernels (this
// file is their autograd), so each call starts below the autograd keys:
// that skips autograd's boxed fallback, a microsecond or two per call.

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(const at::Tensor& input, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          const LossOptions& o) {
  static const auto op = find_operator<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double,
      double)>("fused_ce::cross_entropy_forward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_op(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const LossOptions& o, int64_t reduction) {
  static const auto op = find_operator<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double,
      double, int64_t)>("fused_ce::cross_entropy_forward_with_grad");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap, reduction);
}

void scale_gradient_op(at::Tensor& grad, const at::Tensor& scale) {
  static const auto op = find_operator<void(at::Tensor&, const at::Tensor&)>("fused_ce::scale_gradient_");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(grad, scale);
}

at::Tensor reduce_loss_op(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                          at::ScalarType dtype) {
  static const auto op =
      find_operator<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::ScalarType)>("fused_ce::reduce_loss");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(loss, total_weight, reduction, dtype);
}

// ---------------------------------------------------------------------------
// Shapes and the reduction, exactly as fused_ce/autograd.py does them.

// The operators' canonical views: input (N, C, D) and target (N, D), or
// (N, C, D) for probabilities; views wherever the strides allow.
struct CanonicalArgs {
  at::Tensor input, target;
};

CanonicalArgs canonical(const at::Tensor& input, const at::Tensor& target) {
  const int64_t n = input.size(0), c = input.size(1);
  const int64_t d = c10::multiply_integers(input.sizes().slice(2));
  return {input.reshape({n, c, d}),
          target.is_floating_point() ? target.reshape({n, c, d}) : target.reshape({n, d})};
}

// The per-element loss reduced (sum over total_weight for the mean) in the
// input's dtype by the reduce_loss operator, as the Python Function does, so
// both paths give the same bits; for reduction="none", shaped like the
// target's batch.
at::Tensor reduce(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                  const at::Tensor& input) {
  if (reduction != static_cast<int64_t>(Reduction::None)) {
    return reduce_loss_op(loss, total_weight, reduction, input.scalar_type());
  }
  // (N, d1, ..., dk).
  std::vector<int64_t> shape = input.sizes().vec();
  shape.erase(shape.begin() + 1);
  const at::Tensor out = loss.reshape(shape);
  return out.scalar_type() == input.scalar_type() ? out : out.to(input.scalar_type());
}

bool is_reduced(int64_t reduction) {
  return reduction == static_cast<int64_t>(Reduction::Mean) ||
         reduction == static_cast<int64_t>(Reduction::Sum);
}

}  // namespace

// Outside the anonymous namespace: autograd names the node after this class
// ("torch::autograd::CppNode<fused_ce::CrossEntropyLossFunction>", its
// grad_fn.name() in Python).
class CrossEntropyLossFunction : public torch::autograd::Function<CrossEntropyLossFunction> {
 public:
  // The forward's arguments, in order; backward returns one gradient per
  // argument, undefined for all but the input.
  static constexpr size_t kNumArguments = 9;

  // The loss's operands and options besides the logits, for a recomputation
  // of the gradient (CUDA, a second backward) and for the double backward
  // (double_backward.h): O(N) tensors and scalars, kept as one plain value
  // (a tuple in saved_data) rather than as saved tensors, so that a plain
  // backward unpacks nothing but the gradient.
  enum State : size_t {
    kTarget,         // canonical (N, D) or (N, C, D)
    kTargetVersion,  // its version counter at the forward
    kWeight,         // or None
    kWeightVersion,
    kLse,            // (N, D), or None without z_loss
    kTotalWeight,
    kIgnoreIndex,
    kLabelSmoothing,
    kZLoss,
    kSoftcap,
    kReduction,
  };

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t ignore_index,
                            double label_smoothing, double z_loss, double softcap, int64_t reduction,
                            bool device_scaled) {
    const LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
    const CanonicalArgs args = canonical(input, target);
    auto [loss, lse, total_weight, gradient] =
        forward_with_grad_op(args.input, args.target, weight, options, reduction);
    ctx->set_materialize_grads(false);
    ctx->saved_data["input_sizes"] = input.sizes();
    ctx->saved_data["device_scaled"] = device_scaled;
    ctx->saved_data["state"] = c10::ivalue::Tuple::create(
        {args.target, args.target._version(), weight.has_value() ? at::IValue(*weight) : at::IValue(),
         weight.has_value() ? weight->_version() : int64_t(0), z_loss != 0 ? at::IValue(lse) : at::IValue(),
         total_weight, ignore_index, label_smoothing, z_loss, softcap, reduction});
    if (device_scaled) {
      // Scaled in place and handed out by the first backward, so not a
      // saved tensor (a second backward's unpacking would find it
      // modified). A second backward (retain_graph=True) recomputes it from
      // the saved logits: the same kernel gives the same bits.
      ctx->saved_data["gradient"] = gradient;
      ctx->save_for_backward({input});
    } else {
      ctx->save_for_backward({gradient});
    }
    return reduce(loss, total_weight, reduction, input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kNumArguments);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;  // the loss was not used
    if (at::GradMode::is_enabled()) {  // create_graph=True
      grads[0] = differentiable(ctx, grad_output);
      return grads;
    }
    const bool device_scaled = ctx->saved_data["device_scaled"].toBool();
    grads[0] = (device_scaled ? device_scaled_gradient(ctx, grad_output) : saved_gradient(ctx, grad_output))
                   .reshape(ctx->saved_data["input_sizes"].toIntVector());
    return grads;
  }

 private:
  static const at::IValue& state(AutogradContext* ctx, State field) {
    return ctx->saved_data["state"].toTupleRef().elements()[field];
  }

  static at::Tensor optional_state(AutogradContext* ctx, State field) {
    const at::IValue& value = state(ctx, field);
    return value.isNone() ? at::Tensor() : value.toTensor();
  }

  static LossOptions saved_options(AutogradContext* ctx) {
    return {state(ctx, kIgnoreIndex).toInt(), state(ctx, kLabelSmoothing).toDouble(), state(ctx, kZLoss).toDouble(),
            state(ctx, kSoftcap).toDouble()};
  }

  // The gradient for an upstream gradient of 1: the held one (handed over
  // when `take`, so that it can be scaled in place), or, after a first
  // backward took it, a recomputed one.
  static at::Tensor unscaled_device_gradient(AutogradContext* ctx, bool take) {
    at::IValue& held = ctx->saved_data["gradient"];
    if (held.isTensor()) {
      at::Tensor gradient = held.toTensor();
      if (take) held = at::IValue();
      return gradient;
    }
    const at::Tensor input = ctx->get_saved_variables()[0];
    const CanonicalArgs args = canonical(input, state(ctx, kTarget).toTensor());
    const at::Tensor weight = optional_state(ctx, kWeight);
    return std::get<3>(forward_with_grad_op(args.input, args.target,
                                            weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt,
                                            saved_options(ctx), state(ctx, kReduction).toInt()));
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
  static at::Tensor device_scaled_gradient(AutogradContext* ctx, const at::Tensor& grad_output) {
    if (needs_product(grad_output)) return unscaled_device_gradient(ctx, /*take=*/false) * grad_output;
    at::Tensor gradient = unscaled_device_gradient(ctx, /*take=*/true);
    scale_gradient_op(gradient, grad_output);
    return gradient;
  }

  // The saved gradient times grad_output, out of place: with
  // retain_graph=True a second backward must find it unchanged. Reading a
  // CPU scalar is free, so the pass is skipped when it is 1.
  static at::Tensor saved_gradient(AutogradContext* ctx, const at::Tensor& grad_output) {
    at::Tensor gradient = ctx->get_saved_variables()[0];
    if (grad_output.is_cpu() && !needs_product(grad_output) && grad_output.item<double>() == 1.0) return gradient;
    return gradient * grad_output;
  }

  // create_graph=True: grad_output times the gradient, differentiable with
  // respect to the input and grad_output (double_backward.h), out of place.
  // The saved gradient stays for a later backward; on CUDA the held one is
  // handed to the double backward (a later backward recomputes it), since a
  // plain backward would scale it in place under the double backward's feet.
  // Without the softcap, and only when this node is the one the autograd
  // engine is running (whose first edge leads to the input); otherwise
  // differentiating the gradient raises.
  static at::Tensor differentiable(AutogradContext* ctx, const at::Tensor& grad_output) {
    const std::vector<int64_t> input_sizes = ctx->saved_data["input_sizes"].toIntVector();
    at::Tensor gradient;
    {
      at::NoGradGuard no_grad;
      gradient = ctx->saved_data["device_scaled"].toBool() ? unscaled_device_gradient(ctx, /*take=*/true)
                                                           : ctx->get_saved_variables()[0];
      gradient = gradient.reshape(input_sizes);
    }
    const auto node = torch::autograd::get_current_node();
    const bool ours =
        node != nullptr && dynamic_cast<torch::autograd::CppNode<CrossEntropyLossFunction>*>(node.get()) != nullptr;
    torch::autograd::edge_list depends_on;
    if (ours) depends_on.push_back(node->next_edge(0));
    if (grad_output.requires_grad()) depends_on.push_back(torch::autograd::impl::gradient_edge(grad_output));
    const LossOptions options = saved_options(ctx);
    if (options.softcap != 0 || !ours) {
      at::Tensor scaled;
      {
        at::NoGradGuard no_grad;
        scaled = gradient * grad_output;
      }
      return refuse_differentiation(
          scaled,
          options.softcap != 0
              ? "fused_ce.cross_entropy: with softcap the gradient is not differentiable (double backward / "
                "create_graph=True would need the logits, which the loss does not keep)"
              : "fused_ce.cross_entropy: the gradient is only differentiable in a backward run by autograd's "
                "engine",
          std::move(depends_on));
    }
    SavedGradient for_double_backward{gradient,
                                      state(ctx, kTarget).toTensor(),
                                      optional_state(ctx, kWeight),
                                      optional_state(ctx, kLse),
                                      state(ctx, kTotalWeight).toTensor(),
                                      options,
                                      static_cast<Reduction>(state(ctx, kReduction).toInt()),
                                      state(ctx, kTargetVersion).toInt(),
                                      state(ctx, kWeightVersion).toInt()};
    check_unmodified(for_double_backward);
    return differentiable_gradient(std::move(for_double_backward), grad_output, node->next_edge(0));
  }
};

at::Tensor cross_entropy_loss(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, int64_t ignore_index,
                              double label_smoothing, double z_loss, double softcap,
                              int64_t reduction, bool device_scaled) {
  FUSED_CE_CHECK(input.dim() >= 2, "fused_ce: cross_entropy_loss expects batched input (N, C, ...), got ",
                 input.dim(), " dimension(s)");
  FUSED_CE_CHECK(reduction == static_cast<int64_t>(Reduction::None) || is_reduced(reduction),
                 "fused_ce: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && input.requires_grad()) {
    FUSED_CE_CHECK(is_reduced(reduction) && !target.requires_grad(),
                   "fused_ce: cross_entropy_loss computes gradients of a reduced loss with respect to the "
                   "input only; use fused_ce.CrossEntropyFunction for reduction='none' or a target gradient");
    return CrossEntropyLossFunction::apply(input, target, weight, ignore_index, label_smoothing, z_loss,
                                           softcap, reduction, device_scaled);
  }
  FUSED_CE_CHECK(!(grad_mode && target.requires_grad()),
                 "fused_ce: cross_entropy_loss gives no gradient for the target; use "
                 "fused_ce.CrossEntropyFunction");
  // No graph to build: the forward alone.
  const CanonicalArgs args = canonical(input, target);
  auto [loss, lse, total_weight] =
      forward_op(args.input, args.target, weight, {ignore_index, label_smoothing, z_loss, softcap});
  return reduce(loss, total_weight, reduction, input);
}

}  // namespace fused_ce
