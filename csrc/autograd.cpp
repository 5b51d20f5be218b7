// cross_entropy_loss (see autograd.h): the operators of ops.cpp composed
// with a C++ autograd node. The operators are called through the dispatcher,
// so this file is the same for every backend, and dispatch modes, profilers
// and fake tensors see the same operator calls as from Python.

#include "autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <memory>
#include <string>
#include <tuple>

#include "cross_entropy.h"

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

// The per-element loss reduced (sum over total_weight for the mean), in the
// input's dtype; the same tensor operations as the Python layer's, so the
// same bits.
at::Tensor reduce(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                  const at::Tensor& input) {
  at::Tensor out = loss;
  if (reduction == static_cast<int64_t>(Reduction::Mean)) {
    out = loss.sum().div(total_weight);
  } else if (reduction == static_cast<int64_t>(Reduction::Sum)) {
    out = loss.sum();
  } else {
    // reduction="none": shaped like the target's batch, (N, d1, ..., dk).
    std::vector<int64_t> shape = input.sizes().vec();
    shape.erase(shape.begin() + 1);
    out = loss.reshape(shape);
  }
  return out.scalar_type() == input.scalar_type() ? out : out.to(input.scalar_type());
}

bool is_reduced(int64_t reduction) {
  return reduction == static_cast<int64_t>(Reduction::Mean) ||
         reduction == static_cast<int64_t>(Reduction::Sum);
}

// ---------------------------------------------------------------------------
// The autograd node.

// What autograd's once_differentiable does for a Python backward: a second
// differentiation through this gradient (create_graph=True, then grad of the
// gradient) raises when it is attempted, instead of silently missing the
// second-order term the operators do not compute.
at::Tensor fail_if_differentiated(const at::Tensor& gradient) {
  at::Tensor alias = gradient.detach();
  alias.set_requires_grad(true);
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "fused_ce.cross_entropy: the gradient is not differentiable (its backward does not support "
      "double backward / create_graph=True)",
      /*num_inputs=*/1);
  return error->apply({alias})[0];
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
    if (device_scaled) {
      // Scaled in place and handed out by the first backward, so not a
      // saved tensor (a second backward's unpacking would find it
      // modified). A second backward (retain_graph=True) recomputes it from
      // the saved operands: the same kernel gives the same bits.
      ctx->saved_data["gradient"] = gradient;
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["z_loss"] = z_loss;
      ctx->saved_data["softcap"] = softcap;
      ctx->saved_data["reduction"] = reduction;
      ctx->save_for_backward({input, target, weight.value_or(at::Tensor())});
    } else {
      ctx->save_for_backward({gradient});
    }
    return reduce(loss, total_weight, reduction, input);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(kNumArguments);
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;  // the loss was not used
    const bool create_graph = at::GradMode::is_enabled();
    at::Tensor gradient;
    {
      at::NoGradGuard no_grad;
      gradient = ctx->saved_data["device_scaled"].toBool() ? device_scaled_gradient(ctx, grad_output)
                                                           : saved_gradient(ctx, grad_output);
      gradient = gradient.reshape(ctx->saved_data["input_sizes"].toIntVector());
    }
    grads[0] = create_graph && grad_output.requires_grad() ? fail_if_differentiated(gradient) : gradient;
    return grads;
  }

 private:
  // The held gradient (or, after a first backward, a recomputed one), scaled
  // in place on the device; untouched when grad_output is 1.
  static at::Tensor device_scaled_gradient(AutogradContext* ctx, const at::Tensor& grad_output) {
    at::IValue& held = ctx->saved_data["gradient"];
    at::Tensor gradient;
    if (held.isTensor()) {
      gradient = held.toTensor();
      held = at::IValue();
    } else {  // handed out by a previous backward
      const variable_list saved = ctx->get_saved_variables();
      const CanonicalArgs args = canonical(saved[0], saved[1]);
      const std::optional<at::Tensor> weight =
          saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
      const LossOptions options{ctx->saved_data["ignore_index"].toInt(),
                                ctx->saved_data["label_smoothing"].toDouble(),
                                ctx->saved_data["z_loss"].toDouble(), ctx->saved_data["softcap"].toDouble()};
      gradient = std::get<3>(forward_with_grad_op(args.input, args.target, weight, options,
                                                  ctx->saved_data["reduction"].toInt()));
    }
    scale_gradient_op(gradient, grad_output);
    return gradient;
  }

  // The saved gradient times grad_output, out of place: with
  // retain_graph=True a second backward must find it unchanged. Reading a
  // CPU scalar is free, so the pass is skipped when it is 1.
  static at::Tensor saved_gradient(AutogradContext* ctx, const at::Tensor& grad_output) {
    at::Tensor gradient = ctx->get_saved_variables()[0];
    if (grad_output.is_cpu() && grad_output.item<double>() == 1.0) return gradient;
    return gradient * grad_output;
  }
};

at::Tensor cross_entropy_loss(const at::Tensor& input, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, int64_t ignore_index,
                              double label_smoothing, double z_loss, double softcap,
                              int64_t reduction, bool device_scaled) {
  TORCH_CHECK(input.dim() >= 2, "fused_ce: cross_entropy_loss expects batched input (N, C, ...), got ",
              input.dim(), " dimension(s)");
  TORCH_CHECK(reduction == static_cast<int64_t>(Reduction::None) || is_reduced(reduction),
              "fused_ce: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && input.requires_grad()) {
    TORCH_CHECK(is_reduced(reduction) && !target.requires_grad(),
                "fused_ce: cross_entropy_loss computes gradients of a reduced loss with respect to the "
                "input only; use fused_ce.CrossEntropyFunction for reduction='none' or a target gradient");
    return CrossEntropyLossFunction::apply(input, target, weight, ignore_index, label_smoothing, z_loss,
                                           softcap, reduction, device_scaled);
  }
  TORCH_CHECK(!(grad_mode && target.requires_grad()),
              "fused_ce: cross_entropy_loss gives no gradient for the target; use "
              "fused_ce.CrossEntropyFunction");
  // No graph to build: the forward alone.
  const CanonicalArgs args = canonical(input, target);
  auto [loss, lse, total_weight] =
      forward_op(args.input, args.target, weight, {ignore_index, label_smoothing, z_loss, softcap});
  return reduce(loss, total_weight, reduction, input);
}

}  // namespace fused_ce
