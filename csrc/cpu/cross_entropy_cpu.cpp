// CPU implementations of the fused_ce operators: argument unpacking, target
// validation and threading around the SIMD kernels of
// cross_entropy_kernel.cpp.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../cross_entropy.h"
#include "../error_message.h"
#include "cross_entropy_kernel.h"
#include "gradient_cache.h"

namespace fused_ce {
namespace {

// The kernels' torch-free storage type for each ATen scalar type.
template <typename scalar_t>
struct StorageOf {
  using type = scalar_t;
};
template <>
struct StorageOf<at::BFloat16> {
  using type = cpu::BFloat16Bits;
};
template <>
struct StorageOf<at::Half> {
  using type = cpu::Float16Bits;
};

cpu::Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Fills the problem description shared by every mode.
template <typename T>
cpu::KernelArgs<T> make_args(const at::Tensor& input, const at::Tensor& target,
                             const at::Tensor& weight_acc, const ProblemShape& shape,
                             const LossOptions& options) {
  using Acc = cpu::acc_t<T>;
  cpu::KernelArgs<T> args;
  args.N = shape.N;
  args.C = shape.C;
  args.D = shape.D;
  args.input = reinterpret_cast<const T*>(input.const_data_ptr());
  args.input_strides = strides3(input);
  if (shape.probability_target) {
    args.prob_target = reinterpret_cast<const T*>(target.const_data_ptr());
    args.prob_target_strides = strides3(target);
  } else {
    args.class_target = target.const_data_ptr<int64_t>();
    args.class_target_stride_n = target.stride(0);
    args.class_target_stride_d = target.stride(1);
  }
  if (weight_acc.defined()) {
    args.weight = weight_acc.const_data_ptr<Acc>();
    args.weight_sum = weight_acc.sum(at::kDouble).item<double>();
  } else {
    args.weight_sum = Acc(shape.C);
  }
  args.ignore_index = options.ignore_index;
  args.label_smoothing = Acc(options.label_smoothing);
  args.z_loss = Acc(options.z_loss);
  args.softcap = Acc(options.softcap);
  args.use_row_kernel = !shape.probability_target && input.stride(1) == 1 &&
                        shape.C >= cpu::kRowKernelMinClasses;
  return args;
}

// Calls visit(k, target) for the targets of positions [begin, end), k
// counting from 0. Positions are n * D + d; when consecutive positions are
// a fixed stride apart in memory (D == 1, or a dense (N, D) target) the walk
// is a plain strided loop the compiler can unroll.
template <typename Visit>
void for_each_target(const int64_t* y, int64_t sn, int64_t sd, int64_t D, int64_t begin,
                     int64_t end, Visit&& visit) {
  const bool uniform = D == 1 || sn == D * sd;
  if (uniform) {
    const int64_t stride = D == 1 ? sn : sd;
    const int64_t* p = y + (D == 1 ? begin * sn : begin * sd);
    for (int64_t k = 0; k < end - begin; ++k) visit(k, p[k * stride]);
    return;
  }
  int64_t n = begin / D, d = begin - n * D;
  for (int64_t k = 0; k < end - begin; ++k) {
    visit(k, y[n * sn + d * sd]);
    if (++d == D) {
      d = 0;
      ++n;
    }
  }
}

// Checks every class-index target and returns the mean's denominator: the
// sum of the targets' weights over non-ignored elements (their count without
// weights), or the number of elements for probability targets. Accumulates
// in float64 so that counts stay exact far beyond 2^24 elements.
//
// Runs in parallel over fixed blocks of positions whose partial sums are
// added in block order, so the result does not depend on the thread count.
// The loops carry no branch: the bounds test is or-ed into a flag and only
// a block that fails it is walked again for the error message, and the
// count without weights is an integer (a float64 sum would make every
// element wait on the previous one's addition).
double validate_targets_and_total_weight(const at::Tensor& target, const at::Tensor& weight_acc,
                                         const ProblemShape& shape, int64_t ignore_index) {
  if (shape.probability_target) return double(shape.N) * double(shape.D);
  const at::Tensor weight64 = weight_acc.defined() ? weight_acc.to(at::kDouble) : at::Tensor();
  const double* w = weight64.defined() ? weight64.const_data_ptr<double>() : nullptr;
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t sn = target.stride(0), sd = target.stride(1);
  const int64_t C = shape.C, D = shape.D, positions = shape.N * shape.D;
  constexpr int64_t kBlock = int64_t(1) << 14;
  const int64_t blocks = (positions + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    for (int64_t b = first_block; b < end_block; ++b) {
      const int64_t begin = b * kBlock, end = std::min(positions, begin + kBlock);
      bool out_of_bounds = false;
      if (w) {
        double sums[4] = {0, 0, 0, 0};  // four chains of additions, not one
        for_each_target(y, sn, sd, D, begin, end, [&](int64_t k, int64_t t) {
          const bool ignored = t == ignore_index;
          const bool in_bounds = uint64_t(t) < uint64_t(C);
          out_of_bounds |= !ignored && !in_bounds;
          sums[k & 3] += ignored || !in_bounds ? 0.0 : w[t];
        });
        partial[b] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
      } else {
        int64_t kept = 0;
        for_each_target(y, sn, sd, D, begin, end, [&](int64_t, int64_t t) {
          const bool ignored = t == ignore_index;
          out_of_bounds |= !ignored && uint64_t(t) >= uint64_t(C);
          kept += !ignored;
        });
        partial[b] = double(kept);
      }
      if (out_of_bounds) {
        for_each_target(y, sn, sd, D, begin, end, [&](int64_t, int64_t t) {
          FUSED_CE_CHECK_INDEX(t == ignore_index || (t >= 0 && t < C), "Target ", t,
                               " is out of bounds.");
        });
      }
    }
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

template <typename T>
void launch(const cpu::KernelArgs<T>& args) {
  const int64_t items = cpu::num_work_items(args);
  if (items == 0) return;
  // About 64k elements per task: enough to amortise scheduling, small
  // enough to balance rows across threads.
  const int64_t elements_per_item = args.C * cpu::positions_per_work_item(args);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / elements_per_item);
  at::parallel_for(0, items, grain,
                   [&](int64_t begin, int64_t end) { cpu::run_kernel(args, begin, end); });
}

// Checks everything the operators have in common and returns the sizes.
ProblemShape check_all(const at::Tensor& input, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const LossOptions& options) {
  const ProblemShape shape = check_arguments(input, target, weight, options.label_smoothing);
  check_loss_options(options.z_loss, options.softcap);
  return shape;
}

// Shared body of the forward operators. grad_input is undefined for the
// plain forward, and may be the input itself for the in-place one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const LossOptions& options, Reduction reduction, const at::Tensor& grad_input) {
  const ProblemShape shape = check_all(input, target, weight, options);
  const at::Tensor weight_acc = weight_in_accumulate_type(weight, input);
  const double total_weight =
      validate_targets_and_total_weight(target, weight_acc, shape, options.ignore_index);
  const auto acc_options = input.options().dtype(accumulate_type(input.scalar_type()));
  at::Tensor loss = at::empty({shape.N, shape.D}, acc_options);
  at::Tensor lse = at::empty({shape.N, shape.D}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_ce_forward_cpu", [&] {
    using T = typename StorageOf<scalar_t>::type;
    using Acc = cpu::acc_t<T>;
    cpu::KernelArgs<T> args = make_args<T>(input, target, weight_acc, shape, options);
    args.loss = loss.mutable_data_ptr<Acc>();
    args.lse = lse.mutable_data_ptr<Acc>();
    if (grad_input.defined()) {
      // d(mean)/d(loss_i) = 1 / total_weight: inf when every target is
      // ignored, but ignored positions get an exact 0 and there are no others.
      args.grad_scale = reduction == Reduction::Mean ? Acc(1.0 / total_weight) : Acc(1);
      args.grad_input = reinterpret_cast<T*>(grad_input.mutable_data_ptr());
      args.grad_input_strides = strides3(grad_input);
    }
    launch(args);
  });
  return {loss, lse, at::scalar_tensor(total_weight, acc_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  return forward_impl(input, target, weight, {ignore_index, label_smoothing, z_loss, softcap},
                      Reduction::None, at::Tensor());
}

Reduction checked_reduction(int64_t reduction) {
  FUSED_CE_CHECK(reduction == int64_t(Reduction::Mean) || reduction == int64_t(Reduction::Sum),
                 "fused_ce: forward_with_grad needs reduction 1 (mean) or 2 (sum), got ", reduction);
  return Reduction(reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    int64_t reduction) {
  const Reduction checked = checked_reduction(reduction);
  // Same strides as the input when it is dense, so that the gradient of a
  // channels-last or transposed input keeps its layout.
  at::Tensor grad_input = cpu::empty_gradient_like(input);
  auto [loss, lse, total_weight] = forward_impl(
      input, target, weight, {ignore_index, label_smoothing, z_loss, softcap}, checked, grad_input);
  return {loss, lse, total_weight, grad_input};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad_inplace_cpu(
    at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    int64_t reduction) {
  const Reduction checked = checked_reduction(reduction);
  // Overlapping elements (an expanded input) would receive several
  // gradients; the contract asks for a contiguous input.
  FUSED_CE_CHECK(input.is_contiguous(),
                 "fused_ce: the in-place forward_with_grad needs a contiguous input");
  return forward_impl(input, target, weight, {ignore_index, label_smoothing, z_loss, softcap},
                      checked, input);
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, bool input_grad, bool target_grad) {
  const LossOptions options{ignore_index, label_smoothing, z_loss, softcap};
  const ProblemShape shape = check_all(input, target, weight, options);
  check_per_element(grad_loss, "grad_loss", input, shape);
  const bool has_grad_lse = grad_lse.has_value() && grad_lse->defined();
  if (has_grad_lse) check_per_element(*grad_lse, "grad_lse", input, shape);
  // lse is part of the operator's contract (the CUDA backward uses it), but
  // the CPU kernels recompute the row statistics: see KernelArgs.
  check_per_element(lse, "lse", input, shape);
  FUSED_CE_CHECK(!target_grad || shape.probability_target,
                 "fused_ce: target_grad needs probability targets");
  const at::Tensor weight_acc = weight_in_accumulate_type(weight, input);
  validate_targets_and_total_weight(target, weight_acc, shape, ignore_index);
  at::Tensor grad_input =
      input_grad ? cpu::empty_gradient_like(input) : at::empty({0}, input.options());
  at::Tensor grad_target = target_grad ? at::empty_like(target) : at::empty({0}, target.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_ce_backward_cpu", [&] {
    using T = typename StorageOf<scalar_t>::type;
    using Acc = cpu::acc_t<T>;
    cpu::KernelArgs<T> args = make_args<T>(input, target, weight_acc, shape, options);
    args.grad_loss = grad_loss.const_data_ptr<Acc>();
    args.grad_loss_stride_n = grad_loss.stride(0);
    args.grad_loss_stride_d = grad_loss.stride(1);
    if (has_grad_lse) {
      args.grad_lse = grad_lse->const_data_ptr<Acc>();
      args.grad_lse_stride_n = grad_lse->stride(0);
      args.grad_lse_stride_d = grad_lse->stride(1);
    }
    if (input_grad) {
      args.grad_input = reinterpret_cast<T*>(grad_input.mutable_data_ptr());
      args.grad_input_strides = strides3(grad_input);
    }
    if (target_grad) {
      args.grad_target = reinterpret_cast<T*>(grad_target.mutable_data_ptr());
      args.grad_target_strides = strides3(grad_target);
    }
    if (input_grad || target_grad) launch(args);
  });
  return {grad_input, grad_target};
}

// grad *= scale in place, nothing when scale is 1: reading a CPU scalar
// costs no synchronisation.
void scale_gradient_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_gradient(grad, scale);
  if (scale.item<double>() != 1.0) grad.mul_(scale.reshape({}));
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CPU, m) {
  m.impl("cross_entropy_forward", &forward_cpu);
  m.impl("cross_entropy_forward_with_grad", &forward_with_grad_cpu);
  m.impl("cross_entropy_forward_with_grad_inplace", &forward_with_grad_inplace_cpu);
  m.impl("cross_entropy_backward", &backward_cpu);
  m.impl("scale_gradient_", &scale_gradient_cpu);
}

}  // namespace fused_ce
