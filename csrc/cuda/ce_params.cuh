// The host-side contract between the torch binding and the CUDA kernels:
// parameter blocks (raw pointers, sizes, element strides) and the launcher
// entry points.  Nothing here knows about torch.
//
// Layout conventions (see the operator spec):
//   input        canonical (N, C, D) view with arbitrary element strides
//   target       class indices: int64 (N, D), arbitrary strides
//   target_prob  probabilities: same dtype and (N, C, D) shape as input
//   weight       nullptr or contiguous (C,) of the input dtype
//   loss, lse    contiguous (N, D), accumulation dtype
//   grad_*       contiguous (N, C, D), input dtype; forward_with_grad's
//                grad_input may be `input` itself (the in-place operator),
//                which then has to be contiguous (N, C, D) too
//   grad_loss, grad_lse, saved lse   (N, D), accumulation dtype, any strides
//
// Loss options (operator spec): label_smoothing in [0, 1], z_loss >= 0,
// softcap > 0 or 0 for none.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "ce_common.cuh"

namespace fused_ce {
namespace cuda {

// Scratch every launcher needs, in accumulation-type elements; the caller
// allocates it (uninitialised) on the launch device.  Layout:
//   [0, kMaxWeightPartials)   per-block partial sums of the target weights
//   kWorkspaceScaleSlot       grad_output scale used by forward_with_grad
//   kWorkspaceWeightSumSlot   sum of the class weights (backward)
constexpr int kMaxWeightPartials = 1024;
constexpr int kWorkspaceScaleSlot = kMaxWeightPartials;
constexpr int kWorkspaceWeightSumSlot = kMaxWeightPartials + 1;
constexpr int kWorkspaceElems = kMaxWeightPartials + 2;

// reduce_loss (ce_reduce_loss.cuh) sums up to kLossElemsPerPartial
// elements in one block; beyond, it needs scratch for one partial sum per
// block, at most kMaxLossPartials of them.
constexpr int64_t kLossElemsPerPartial = 4096;
constexpr int kMaxLossPartials = 1024;
// Under FUSED_CE_CUDA_WIDE_REDUCTIONS, up to kWideReduceElems in one block.
constexpr int64_t kWideReduceElems = 65536;

// Whether reduce_loss sums up to kWideReduceElems elements in one wide block
// rather than in partials past kLossElemsPerPartial, from
// FUSED_CE_CUDA_WIDE_REDUCTIONS (read once per process): "1", or any other
// value and unset for the partials.  With total_weight's wide block
// (cross_entropy_kernels.cuh) a 65536-row step launches two kernels fewer:
// an experiment for the rows of 10 classes, whose step is bound by launches
// (on the H200 65536 x 10 fp32 took 0.19 ms launched, eager 0.29; 44 us
// replayed from a CUDA graph, eager 105).  Not timed yet.
inline bool wide_reductions() {
  static const bool on = [] {
    const char* v = std::getenv("FUSED_CE_CUDA_WIDE_REDUCTIONS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// Whether reduce_loss sums n elements through partials, in a workspace of
// kMaxLossPartials elements (the caller allocates one only then).
inline bool reduce_loss_uses_workspace(int64_t n) {
  return n > kLossElemsPerPartial && !(n <= kWideReduceElems && wide_reductions());
}

template <typename T>
struct CrossEntropyForwardParams {
  using Acc = acc_t<T>;

  // Logits.
  const T* input = nullptr;
  int64_t N = 0, C = 0, D = 0;
  int64_t input_stride_n = 0, input_stride_c = 0, input_stride_d = 0;

  // Exactly one of `target` (class indices) and `target_prob` is non-null.
  const int64_t* target = nullptr;
  int64_t target_stride_n = 0, target_stride_d = 0;
  const T* target_prob = nullptr;
  int64_t prob_stride_n = 0, prob_stride_c = 0, prob_stride_d = 0;

  const T* weight = nullptr;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;

  // Outputs.
  Acc* loss = nullptr;          // (N, D)
  Acc* lse = nullptr;           // (N, D), also for ignored elements
  Acc* total_weight = nullptr;  // 0-d
  Acc* workspace = nullptr;     // kWorkspaceElems

  // forward_with_grad only: gradient of the reduced loss (grad_output = 1).
  T* grad_input = nullptr;  // (N, C, D); may equal `input` (in place)
  int reduction = kReductionMean;
};

template <typename T>
struct CrossEntropyBackwardParams {
  using Acc = acc_t<T>;

  // dL/dloss_i, (N, D), arbitrary strides (0 for a broadcast scalar).
  const Acc* grad_loss = nullptr;
  int64_t grad_loss_stride_n = 0, grad_loss_stride_d = 0;
  // dL/dlse_i, (N, D), arbitrary strides, or nullptr (no gradient of lse).
  const Acc* grad_lse = nullptr;
  int64_t grad_lse_stride_n = 0, grad_lse_stride_d = 0;

  const T* input = nullptr;
  int64_t N = 0, C = 0, D = 0;
  int64_t input_stride_n = 0, input_stride_c = 0, input_stride_d = 0;

  const int64_t* target = nullptr;
  int64_t target_stride_n = 0, target_stride_d = 0;
  const T* target_prob = nullptr;
  int64_t prob_stride_n = 0, prob_stride_c = 0, prob_stride_d = 0;

  const T* weight = nullptr;

  // Log-sum-exp saved by the forward, (N, D), arbitrary strides.
  const Acc* lse = nullptr;
  int64_t lse_stride_n = 0, lse_stride_d = 0;

  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;

  // Either may be null (not requested); grad_target only for probabilities.
  T* grad_input = nullptr;   // (N, C, D)
  T* grad_target = nullptr;  // (N, C, D)
  Acc* workspace = nullptr;  // kWorkspaceElems
};

// ---------------------------------------------------------------------------
// Positions folded into rows.
//
// The kernels' fast paths (a thread group per row, 16-byte accesses, rows held
// on chip) need class-contiguous rows and a class-contiguous gradient, and
// the gradient they write is laid out as a contiguous (N, C, D): so a problem
// with D > 1 takes one thread per position, whose row is one long strided
// walk. Yet a class-contiguous (N, C, D) problem whose positions (n, d)
// follow one another at one stride, in every tensor they index, is the 2-D
// problem (N * D, C): F.cross_entropy(logits.transpose(1, 2), target) on
// (B, T, V) logits, or channels-last images. fold_positions() rewrites the
// parameter block as that problem, which runs exactly as the 2-D call would;
// the caller then hands the kernels gradients laid out as its rows, i.e.
// (N, C, D) tensors of strides (D * C, 1, C) (an (N, D, C) contiguous
// tensor, transposed). FUSED_CE_CUDA_FOLD_POSITIONS=0 turns it off (read once
// per process), for comparisons.

// Whether the positions (n, d) of a tensor with these strides are one
// sequence of step stride_d (position n * D + d at (n * D + d) * stride_d).
inline bool positions_in_sequence(int64_t N, int64_t D, int64_t stride_n, int64_t stride_d) {
  return N <= 1 || stride_n == D * stride_d;
}

inline bool fold_positions_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FUSED_CE_CUDA_FOLD_POSITIONS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

namespace detail {

template <typename Params>
bool inputs_fold(const Params& p) {
  if (p.D <= 1 || p.N * p.D == 0 || !fold_positions_enabled()) return false;
  if ((p.input_stride_c != 1 && p.C != 1) || !positions_in_sequence(p.N, p.D, p.input_stride_n, p.input_stride_d))
    return false;
  if (p.target_prob != nullptr)
    return (p.prob_stride_c == 1 || p.C == 1) && positions_in_sequence(p.N, p.D, p.prob_stride_n, p.prob_stride_d);
  return positions_in_sequence(p.N, p.D, p.target_stride_n, p.target_stride_d);
}

template <typename Params>
void fold_inputs(Params& p) {
  p.input_stride_n = p.input_stride_d;
  p.prob_stride_n = p.prob_stride_d;
  p.target_stride_n = p.target_stride_d;
  p.N *= p.D;
  p.D = 1;
}

}  // namespace detail

// Whether fold_positions(p) applies: decided from the inputs' strides (and,
// for the backward, those of grad_loss, grad_lse and lse); the gradients'
// pointers play no part.  The loss and lse a forward writes are contiguous
// (N, D), the same memory as the folded (N * D, 1).
template <typename T>
bool positions_fold(const CrossEntropyForwardParams<T>& p) {
  return detail::inputs_fold(p);
}

template <typename T>
bool positions_fold(const CrossEntropyBackwardParams<T>& p) {
  return detail::inputs_fold(p) && positions_in_sequence(p.N, p.D, p.grad_loss_stride_n, p.grad_loss_stride_d) &&
         (p.grad_lse == nullptr || positions_in_sequence(p.N, p.D, p.grad_lse_stride_n, p.grad_lse_stride_d)) &&
         positions_in_sequence(p.N, p.D, p.lse_stride_n, p.lse_stride_d);
}

// (N, C, D) -> (N * D, C, 1), where positions_fold(p).
template <typename T>
void fold_positions(CrossEntropyForwardParams<T>& p) {
  detail::fold_inputs(p);
}

template <typename T>
void fold_positions(CrossEntropyBackwardParams<T>& p) {
  p.grad_loss_stride_n = p.grad_loss_stride_d;
  p.grad_lse_stride_n = p.grad_lse_stride_d;
  p.lse_stride_n = p.lse_stride_d;
  detail::fold_inputs(p);
}

// Launchers: enqueue the work on `stream` without synchronising and return
// cudaGetLastError() (or cudaErrorInvalidValue for a contract violation).
// All three accept N * D == 0 (they then only write total_weight).
//
// loss, lse, total_weight.
template <typename T>
cudaError_t launch_cross_entropy_forward(const CrossEntropyForwardParams<T>& p, cudaStream_t stream);

// loss, lse, total_weight and grad_input (p.grad_input must be set; p.reduction
// is kReductionMean or kReductionSum).  p.grad_input == p.input computes the
// gradient in place; every other overlap of grad_input with an input is
// unsupported.
template <typename T>
cudaError_t launch_cross_entropy_forward_with_grad(const CrossEntropyForwardParams<T>& p,
                                                   cudaStream_t stream);

// grad_input and/or grad_target.
template <typename T>
cudaError_t launch_cross_entropy_backward(const CrossEntropyBackwardParams<T>& p, cudaStream_t stream);

// The upstream gradient by which scale_gradient multiplies, one device
// scalar: exactly one of the two pointers is set. In the accumulation type,
// or in T itself, which spares the caller a conversion kernel when the
// upstream gradient has the gradient's 16-bit dtype (a bfloat16 loss's).
template <typename T>
struct GradientScale {
  const acc_t<T>* acc = nullptr;
  const T* storage = nullptr;
};

// grad[0, numel) *= scale in place (a dense gradient from forward_with_grad
// and the upstream gradient); the kernel returns at once, on the device,
// when the scale is 1.  See ce_scale_gradient.cuh.
template <typename T>
cudaError_t launch_scale_gradient(T* grad, int64_t numel, GradientScale<T> scale, cudaStream_t stream);

// *out = sum of loss[0, n), divided by *total_weight for kReductionMean
// (kReductionSum: the sum), in T; workspace holds kMaxLossPartials
// elements (it may be null where !reduce_loss_uses_workspace(n)).  See
// ce_reduce_loss.cuh.
template <typename T>
cudaError_t launch_reduce_loss(const acc_t<T>* loss, int64_t n, const acc_t<T>* total_weight, int reduction,
                               acc_t<T>* workspace, T* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_ce
