// CUDA implementations of the fused_ce operators (schemas: csrc/ops.cpp).
//
// A thin layer: check arguments, allocate outputs, translate tensors into the
// torch-free parameter blocks of cross_entropy_kernels.cuh and launch on the
// current stream.  No host synchronisation anywhere (CUDA-graph capturable):
// every reduction the operators need, including total_weight and the
// forward_with_grad scale 1 / total_weight, stays on the device.
//
// Output conventions (operator spec): loss and lse are (N, D) in the
// accumulation dtype (float64 for float64 input, else float32), total_weight
// is 0-d in that dtype, gradients are laid out like torch.empty_like of the
// tensor they belong to (the input, or a probability target), and a gradient
// that is not requested is an empty (0,) tensor of that tensor's dtype.  The
// kernels write contiguous (N, C, D) gradients, or contiguous (N, D, C) ones
// where the positions fold into rows (class-last logits seen through a
// transpose, channels-last images: ce::fold_positions in ce_params.cuh): for
// any other layout the binding copies them once into the result.  The
// in-place forward_with_grad writes the gradient over its (contiguous) input
// instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cross_entropy.h"
#include "../error_message.h"
// Declarations only: the launchers are compiled in launchers_<dtype>.cu.
#include "ce_params.cuh"

namespace {

namespace ce = fused_ce::cuda;

// ATen's 16-bit types and CUDA's share their bit layout; the kernels use the
// CUDA ones.
template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};
static_assert(sizeof(at::Half) == sizeof(__half), "at::Half and __half must have the same layout");
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16),
              "at::BFloat16 and __nv_bfloat16 must have the same layout");

template <typename scalar_t>
const typename KernelType<scalar_t>::type* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename KernelType<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename KernelType<scalar_t>::type* kernel_mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename KernelType<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Validated operator inputs in the canonical layout.
struct Inputs {
  int64_t N = 0, C = 0, D = 0;
  bool prob = false;   // probability targets
  at::Tensor target;   // int64 (N, D) or input-dtype (N, C, D)
  at::Tensor weight;   // undefined or contiguous (C,)
};

Inputs check_inputs(const char* op, const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const fused_ce::LossOptions& options) {
  FUSED_CE_CHECK(input.is_cuda(), op, ": expected a CUDA input, got one on ", input.device());
  FUSED_CE_CHECK(input.dim() == 3, op, ": expected the canonical (N, C, D) input, got ", input.dim(),
                 " dimensions");
  FUSED_CE_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
                 " but input is on ", input.device());
  FUSED_CE_CHECK(options.label_smoothing >= 0.0 && options.label_smoothing <= 1.0,
                 "label_smoothing must be between 0.0 and 1.0. Got: ", options.label_smoothing);
  fused_ce::check_loss_options(options.z_loss, options.softcap);

  Inputs in;
  in.N = input.size(0);
  in.C = input.size(1);
  in.D = input.size(2);
  FUSED_CE_CHECK(in.C > 0 || in.N * in.D == 0, op, ": the class dimension is empty");

  in.prob = at::isFloatingType(target.scalar_type());
  if (in.prob) {
    FUSED_CE_CHECK(target.sizes() == input.sizes(), op, ": probability target of shape ", target.sizes(),
                   " does not match input of shape ", input.sizes());
    FUSED_CE_CHECK(target.scalar_type() == input.scalar_type(), op, ": expected target dtype ",
                   input.scalar_type(), " but got ", target.scalar_type());
    in.target = target;
  } else {
    FUSED_CE_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kByte,
                   "expected target dtype to be Long or Byte, but got ", target.scalar_type());
    FUSED_CE_CHECK(target.dim() == 2 && target.size(0) == in.N && target.size(1) == in.D, op,
                   ": expected a class-index target of shape [", in.N, ", ", in.D, "], got ",
                   target.sizes());
    in.target = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  }

  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    FUSED_CE_CHECK(w.device() == input.device(), op, ": weight is on ", w.device(), " but input is on ",
                   input.device());
    FUSED_CE_CHECK(w.scalar_type() == input.scalar_type(), "expected scalar type ", input.scalar_type(),
                   " but found ", w.scalar_type());
    FUSED_CE_CHECK(w.dim() == 1 && w.numel() == in.C, "weight tensor should be defined either for all ",
                   in.C, " classes or no classes but got weight tensor of shape: ", w.sizes());
    in.weight = w.contiguous();
  }
  return in;
}

// Fills the fields shared by the forward and backward parameter blocks.
template <typename scalar_t, typename Params>
void fill_common(Params& p, const at::Tensor& input, const Inputs& in, const fused_ce::LossOptions& options) {
  p.input = kernel_ptr<scalar_t>(input);
  p.N = in.N;
  p.C = in.C;
  p.D = in.D;
  p.input_stride_n = input.stride(0);
  p.input_stride_c = input.stride(1);
  p.input_stride_d = input.stride(2);
  if (in.prob) {
    p.target_prob = kernel_ptr<scalar_t>(in.target);
    p.prob_stride_n = in.target.stride(0);
    p.prob_stride_c = in.target.stride(1);
    p.prob_stride_d = in.target.stride(2);
  } else {
    p.target = in.target.const_data_ptr<int64_t>();
    p.target_stride_n = in.target.stride(0);
    p.target_stride_d = in.target.stride(1);
  }
  p.weight = in.weight.defined() ? kernel_ptr<scalar_t>(in.weight) : nullptr;
  p.ignore_index = options.ignore_index;
  p.label_smoothing = options.label_smoothing;
  p.z_loss = options.z_loss;
  p.softcap = options.softcap;
}

// (N, D) per-element tensor of a backward (grad_loss, grad_lse, lse) on the
// input's device, in the accumulation dtype the kernels read (converted
// defensively; a no-op for what the forward produced).
at::Tensor per_element(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                       const Inputs& in) {
  FUSED_CE_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(), ", got ",
                 t.device());
  FUSED_CE_CHECK(t.dim() == 2 && t.size(0) == in.N && t.size(1) == in.D, op, ": ", name,
                 " must have shape [", in.N, ", ", in.D, "], got ", t.sizes());
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  return t.scalar_type() == acc ? t : t.to(acc);
}

// Where forward_impl puts the gradient.
enum class GradOutput { kNone, kNewTensor, kInPlace };

// A gradient shaped and laid out like `like` (the operator's result), and the
// tensor the kernels write, contiguous (N, C, D), or (N, D, C) transposed
// where the positions are folded into rows (ce::fold_positions): the result
// itself in the usual case, else a scratch tensor that finish() copies into
// the result.
struct GradientOutput {
  at::Tensor result;
  at::Tensor kernel_out;

  GradientOutput(const at::Tensor& like, bool rows_folded) : result(at::empty_like(like)) {
    if (rows_folded) {
      kernel_out = result.transpose(1, 2).is_contiguous()
                       ? result
                       : at::empty({like.size(0), like.size(2), like.size(1)}, like.options()).transpose(1, 2);
    } else {
      kernel_out = result.is_contiguous() ? result : at::empty(like.sizes(), like.options());
    }
  }
  // The result, once the kernels have written kernel_out.
  at::Tensor finish() {
    if (!kernel_out.is_same(result)) result.copy_(kernel_out);
    return result;
  }
};

// An optional gradient's operator result: the finished gradient, or, when it
// was not requested, the empty (0,) tensor of `like`'s dtype.
at::Tensor finished_or_empty(std::optional<GradientOutput>& gradient, const at::Tensor& like) {
  return gradient ? gradient->finish() : at::empty({0}, like.options());
}

void check_reduction(const char* op, int64_t reduction) {
  FUSED_CE_CHECK(reduction == ce::kReductionMean || reduction == ce::kReductionSum, op,
                 ": reduction must be 1 (mean) or 2 (sum), got ", reduction);
}

// The three forward operators.  grad_input is undefined for kNone and is
// `input` itself for kInPlace.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const char* op, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const fused_ce::LossOptions& options, int64_t reduction,
    GradOutput grad_output) {
  const Inputs in = check_inputs(op, input, target, weight, options);
  if (grad_output == GradOutput::kInPlace) {
    // The kernels rely on the gradient of element (n, c, d) landing exactly
    // on that element (see ce_stream_kernels.cuh), and on nothing else they
    // read being overwritten.
    FUSED_CE_CHECK(input.is_contiguous(), op, ": input must be contiguous (the gradient overwrites it)");
    at::assert_no_overlap(input, in.target);
    if (in.weight.defined()) at::assert_no_overlap(input, in.weight);
  }
  c10::cuda::CUDAGuard device_guard(input.device());

  const auto acc_options = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({in.N, in.D}, acc_options);
  at::Tensor lse = at::empty({in.N, in.D}, acc_options);
  at::Tensor total_weight = at::empty({}, acc_options);
  std::optional<GradientOutput> new_grad;
  // What the kernel writes the gradient into.
  at::Tensor grad_input;
  if (grad_output == GradOutput::kInPlace) grad_input = input;
  at::Tensor workspace = at::empty({ce::kWorkspaceElems}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // The dispatch name must be a literal (it is a constexpr inside the macro).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_ce_forward_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    ce::CrossEntropyForwardParams<T> p;
    fill_common<scalar_t>(p, input, in, options);
    const bool fold = ce::positions_fold(p);
    if (fold) ce::fold_positions(p);
    if (grad_output == GradOutput::kNewTensor) {
      new_grad.emplace(input, fold);
      grad_input = new_grad->kernel_out;
    }
    p.loss = loss.mutable_data_ptr<Acc>();
    p.lse = lse.mutable_data_ptr<Acc>();
    p.total_weight = total_weight.mutable_data_ptr<Acc>();
    p.workspace = workspace.mutable_data_ptr<Acc>();
    if (grad_input.defined()) {
      p.grad_input = kernel_mutable_ptr<scalar_t>(grad_input);
      p.reduction = static_cast<int>(reduction);
      C10_CUDA_CHECK(ce::launch_cross_entropy_forward_with_grad(p, stream));
    } else {
      C10_CUDA_CHECK(ce::launch_cross_entropy_forward(p, stream));
    }
  });
  if (new_grad) grad_input = new_grad->finish();
  return {loss, lse, total_weight, grad_input};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  auto out = forward_impl("fused_ce::cross_entropy_forward", input, target, weight,
                          {ignore_index, label_smoothing, z_loss, softcap}, /*reduction=*/-1,
                          GradOutput::kNone);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t reduction) {
  const char* op = "fused_ce::cross_entropy_forward_with_grad";
  check_reduction(op, reduction);
  return forward_impl(op, input, target, weight, {ignore_index, label_smoothing, z_loss, softcap},
                      reduction, GradOutput::kNewTensor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_with_grad_inplace_cuda(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t reduction) {
  const char* op = "fused_ce::cross_entropy_forward_with_grad_inplace";
  check_reduction(op, reduction);
  auto out = forward_impl(op, input, target, weight, {ignore_index, label_smoothing, z_loss, softcap},
                          reduction, GradOutput::kInPlace);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool input_grad,
    bool target_grad) {
  const char* op = "fused_ce::cross_entropy_backward";
  const fused_ce::LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
  const Inputs in = check_inputs(op, input, target, weight, options);
  FUSED_CE_CHECK(!target_grad || in.prob, op, ": a target gradient exists only for probability targets");
  const at::Tensor grad_loss_acc = per_element(op, "grad_loss", grad_loss, input, in);
  const at::Tensor lse_acc = per_element(op, "lse", lse, input, in);
  const bool has_grad_lse = grad_lse.has_value() && grad_lse->defined();
  const at::Tensor grad_lse_acc =
      has_grad_lse ? per_element(op, "grad_lse", *grad_lse, input, in) : at::Tensor();
  c10::cuda::CUDAGuard device_guard(input.device());

  std::optional<GradientOutput> grad_input, grad_target;
  if (!input_grad && !target_grad) {
    return {finished_or_empty(grad_input, input), finished_or_empty(grad_target, target)};
  }
  at::Tensor workspace =
      at::empty({ce::kWorkspaceElems}, input.options().dtype(acc_dtype(input.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_ce_backward_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    ce::CrossEntropyBackwardParams<T> p;
    fill_common<scalar_t>(p, input, in, options);
    p.grad_loss = grad_loss_acc.const_data_ptr<Acc>();
    p.grad_loss_stride_n = grad_loss_acc.stride(0);
    p.grad_loss_stride_d = grad_loss_acc.stride(1);
    if (has_grad_lse) {
      p.grad_lse = grad_lse_acc.const_data_ptr<Acc>();
      p.grad_lse_stride_n = grad_lse_acc.stride(0);
      p.grad_lse_stride_d = grad_lse_acc.stride(1);
    }
    p.lse = lse_acc.const_data_ptr<Acc>();
    p.lse_stride_n = lse_acc.stride(0);
    p.lse_stride_d = lse_acc.stride(1);
    const bool fold = ce::positions_fold(p);
    if (fold) ce::fold_positions(p);
    if (input_grad) grad_input.emplace(input, fold);
    if (target_grad) grad_target.emplace(target, fold);
    p.grad_input = input_grad ? kernel_mutable_ptr<scalar_t>(grad_input->kernel_out) : nullptr;
    p.grad_target = target_grad ? kernel_mutable_ptr<scalar_t>(grad_target->kernel_out) : nullptr;
    p.workspace = workspace.mutable_data_ptr<Acc>();
    C10_CUDA_CHECK(ce::launch_cross_entropy_backward(p, stream));
  });
  return {finished_or_empty(grad_input, input), finished_or_empty(grad_target, target)};
}

// grad *= scale in place, skipped on the device when scale is exactly 1 (see
// ce_scale_gradient.cuh): the backward of a gradient computed in the forward.
void scale_gradient_cuda(at::Tensor& grad, const at::Tensor& scale) {
  fused_ce::check_scale_gradient(grad, scale);
  if (grad.numel() == 0) return;
  c10::cuda::CUDAGuard device_guard(grad.device());
  // The scale as it is when it has the gradient's dtype (a bfloat16 loss's
  // upstream gradient: no conversion kernel), else in the accumulation type.
  const bool storage_typed = scale.scalar_type() == grad.scalar_type();
  const at::Tensor scale_arg = storage_typed ? scale : scale.to(acc_dtype(grad.scalar_type()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fused_ce_scale_gradient_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    ce::GradientScale<T> gradient_scale;
    if (storage_typed) {
      gradient_scale.storage = kernel_ptr<scalar_t>(scale_arg);
    } else {
      gradient_scale.acc = scale_arg.const_data_ptr<ce::acc_t<T>>();
    }
    // Dense and non-overlapping: numel elements from the lowest address,
    // whatever the strides.
    C10_CUDA_CHECK(ce::launch_scale_gradient(kernel_mutable_ptr<scalar_t>(grad), grad.numel(), gradient_scale,
                                             stream));
  });
}

// The loss from its per-element values (see ce_reduce_loss.cuh).
at::Tensor reduce_loss_cuda(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                            at::ScalarType dtype) {
  fused_ce::check_reduce_loss(loss, total_weight, reduction, dtype);
  c10::cuda::CUDAGuard device_guard(loss.device());
  const at::Tensor values = loss.contiguous();
  at::Tensor out = at::empty({}, loss.options().dtype(dtype));
  const at::Tensor workspace =
      ce::reduce_loss_uses_workspace(values.numel()) ? at::empty({ce::kMaxLossPartials}, loss.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_ce_reduce_loss_cuda", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    C10_CUDA_CHECK(ce::launch_reduce_loss<T>(values.const_data_ptr<Acc>(), values.numel(),
                                          total_weight.const_data_ptr<Acc>(), static_cast<int>(reduction),
                                          workspace.defined() ? workspace.mutable_data_ptr<Acc>() : nullptr,
                                          kernel_mutable_ptr<scalar_t>(out), stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward_cuda);
  m.impl("cross_entropy_forward_with_grad", &cross_entropy_forward_with_grad_cuda);
  m.impl("cross_entropy_forward_with_grad_inplace", &cross_entropy_forward_with_grad_inplace_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
  m.impl("scale_gradient_", &scale_gradient_cuda);
  m.impl("reduce_loss", &reduce_loss_cuda);
}
