// See operator_calls.h.

#include "operator_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/accumulate.h>

namespace fused_ce {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

CanonicalArgs canonical(const at::Tensor& input, const at::Tensor& target) {
  const int64_t n = input.size(0), c = input.size(1);
  const int64_t d = c10::multiply_integers(input.sizes().slice(2));
  return {input.reshape({n, c, d}),
          target.is_floating_point() ? target.reshape({n, c, d}) : target.reshape({n, d})};
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

std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                               const at::Tensor& input, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                               const LossOptions& o, bool input_grad, bool target_grad) {
  static const auto op = find_operator<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, double, double, bool, bool)>(
      "fused_ce::cross_entropy_backward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_loss, grad_lse, input, target, weight, lse, o.ignore_index, o.label_smoothing, o.z_loss,
                 o.softcap, input_grad, target_grad);
}

at::Tensor input_gradient_op(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const LossOptions& o) {
  return std::get<0>(backward_op(grad_loss, std::nullopt, input, target, weight, lse, o, /*input_grad=*/true,
                                 /*target_grad=*/false));
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

at::Tensor differentiable_loss_op(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const LossOptions& o) {
  static const auto op = find_operator<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&, int64_t, double, double,
                                                  double)>("fused_ce::differentiable_loss");
  return op.call(input, target, weight, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap);
}

}  // namespace fused_ce
