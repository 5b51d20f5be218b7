#include "cross_entropy.h"

#include <cmath>

#include "error_message.h"

namespace fused_ce {

ProblemShape check_arguments(const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, double label_smoothing) {
  FUSED_CE_CHECK(input.dim() == 3, "fused_ce: input must be (N, C, D), got ", input.sizes());
  FUSED_CE_CHECK(at::isFloatingType(input.scalar_type()),
                 "fused_ce: input must be a floating point tensor, got ", input.scalar_type());
  FUSED_CE_CHECK(target.device() == input.device(), "fused_ce: target is on ", target.device(),
                 " but input is on ", input.device());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  FUSED_CE_CHECK(C > 0, "fused_ce: input must have at least one class");
  const bool probability_target = at::isFloatingType(target.scalar_type());
  if (probability_target) {
    FUSED_CE_CHECK(target.scalar_type() == input.scalar_type(),
                   "fused_ce: probability target must have the input's dtype ", input.scalar_type(),
                   ", got ", target.scalar_type());
    FUSED_CE_CHECK(target.sizes() == input.sizes(), "fused_ce: probability target must have shape ",
                   input.sizes(), ", got ", target.sizes());
  } else {
    FUSED_CE_CHECK(target.scalar_type() == at::kLong,
                   "fused_ce: class-index target must be int64, got ", target.scalar_type());
    FUSED_CE_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D,
                   "fused_ce: class-index target must have shape (", N, ", ", D, "), got ",
                   target.sizes());
  }
  if (weight.has_value() && weight->defined()) {
    FUSED_CE_CHECK(weight->dim() == 1 && weight->size(0) == C,
                   "fused_ce: weight must have shape (", C, "), got ", weight->sizes());
    FUSED_CE_CHECK(weight->scalar_type() == input.scalar_type(),
                   "fused_ce: weight must have the input's dtype ", input.scalar_type(), ", got ",
                   weight->scalar_type());
    FUSED_CE_CHECK(weight->device() == input.device(), "fused_ce: weight is on ", weight->device(),
                   " but input is on ", input.device());
  }
  FUSED_CE_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                 "fused_ce: label_smoothing must be in [0, 1], got ", label_smoothing);
  return ProblemShape{N, C, D, probability_target};
}

void check_loss_options(double z_loss, double softcap) {
  FUSED_CE_CHECK(z_loss >= 0.0 && z_loss < INFINITY, "fused_ce: z_loss must be finite and >= 0, got ",
                 z_loss);
  FUSED_CE_CHECK(softcap >= 0.0 && softcap < INFINITY,
                 "fused_ce: softcap must be finite and > 0 (or 0 for none), got ", softcap);
}

void check_per_element(const at::Tensor& t, const char* name, const at::Tensor& input,
                       const ProblemShape& shape) {
  FUSED_CE_CHECK(t.dim() == 2 && t.size(0) == shape.N && t.size(1) == shape.D, "fused_ce: ", name,
                 " must have shape (", shape.N, ", ", shape.D, "), got ", t.sizes());
  FUSED_CE_CHECK(t.scalar_type() == accumulate_type(input.scalar_type()), "fused_ce: ", name,
                 " must be ", accumulate_type(input.scalar_type()), ", got ", t.scalar_type());
  FUSED_CE_CHECK(t.device() == input.device(), "fused_ce: ", name, " is on ", t.device(),
                 " but input is on ", input.device());
}

void check_scale_gradient(const at::Tensor& grad, const at::Tensor& scale) {
  FUSED_CE_CHECK(at::isFloatingType(grad.scalar_type()),
                 "fused_ce: scale_gradient_ needs a floating point gradient, got ", grad.scalar_type());
  FUSED_CE_CHECK(grad.is_non_overlapping_and_dense(),
                 "fused_ce: scale_gradient_ needs a dense, non-overlapping gradient");
  FUSED_CE_CHECK(scale.numel() == 1, "fused_ce: scale_gradient_ needs a one-element scale, got ",
                 scale.numel(), " elements");
  FUSED_CE_CHECK(scale.device() == grad.device(), "fused_ce: scale is on ", scale.device(),
                 " but grad is on ", grad.device());
}

void check_reduce_loss(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                       at::ScalarType dtype) {
  FUSED_CE_CHECK(reduction == static_cast<int64_t>(Reduction::Mean) ||
                     reduction == static_cast<int64_t>(Reduction::Sum),
                 "fused_ce: reduce_loss needs reduction 1 (mean) or 2 (sum), got ", reduction);
  FUSED_CE_CHECK(at::isFloatingType(dtype), "fused_ce: reduce_loss needs a floating point dtype, got ", dtype);
  FUSED_CE_CHECK(loss.scalar_type() == accumulate_type(dtype), "fused_ce: reduce_loss needs a ",
                 accumulate_type(dtype), " loss for dtype ", dtype, ", got ", loss.scalar_type());
  FUSED_CE_CHECK(total_weight.numel() == 1 && total_weight.scalar_type() == loss.scalar_type(),
                 "fused_ce: reduce_loss needs a one-element ", loss.scalar_type(), " total_weight, got ",
                 total_weight.numel(), " elements of ", total_weight.scalar_type());
  FUSED_CE_CHECK(total_weight.device() == loss.device(), "fused_ce: total_weight is on ", total_weight.device(),
                 " but loss is on ", loss.device());
}

at::Tensor weight_in_accumulate_type(const std::optional<at::Tensor>& weight,
                                     const at::Tensor& input) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(accumulate_type(input.scalar_type())).contiguous();
}

}  // namespace fused_ce
