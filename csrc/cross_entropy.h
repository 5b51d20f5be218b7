// Shared by the CPU and CUDA operator implementations: the contract of the
// canonical operator arguments (see ops.cpp) and small type helpers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fused_ce {

// Same numbering as at::Reduction.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// float64 inputs accumulate in float64, every other floating type in float32.
inline at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

// Sizes of the canonical (N, C, D) problem.
struct ProblemShape {
  int64_t N, C, D;
  bool probability_target;
};

// The scalar options every operator takes, in schema order.
struct LossOptions {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  double softcap;  // 0: none
};

// Validates the operator arguments (the Python layer has already produced
// friendly, PyTorch-style errors for user input; these checks guard direct
// calls of torch.ops.fused_ce.*) and returns the problem sizes.
ProblemShape check_arguments(const at::Tensor& input, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, double label_smoothing);

// Checks the options for large-vocabulary training: z_loss >= 0 and
// softcap >= 0 (0 turns the softcap off), both finite.
void check_loss_options(double z_loss, double softcap);

// Checks a backward's grad_loss / lse, both (N, D) in the accumulate type.
void check_per_element(const at::Tensor& t, const char* name, const at::Tensor& input,
                       const ProblemShape& shape);

// Checks scale_gradient_'s arguments: a dense, non-overlapping floating
// point gradient and a one-element scale on the same device.
void check_scale_gradient(const at::Tensor& grad, const at::Tensor& scale);

// Checks reduce_loss's arguments: reduction 1 (mean) or 2 (sum), a loss in
// the accumulate type of the floating point `dtype`, and a one-element
// total_weight of the same type and device.
void check_reduce_loss(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                       at::ScalarType dtype);

// The class weights in the accumulate type, contiguous (undefined if none).
at::Tensor weight_in_accumulate_type(const std::optional<at::Tensor>& weight,
                                     const at::Tensor& input);

}  // namespace fused_ce
