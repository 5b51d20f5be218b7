// Interface between the torch-facing CPU operators (cross_entropy_cpu.cpp)
// and the SIMD kernels (cross_entropy_kernel.cpp). Free of torch headers so
// the kernels can be compiled once per instruction set without pulling
// torch's inline functions into ISA-specific code.
#pragma once

#include <cstdint>
#include <vector>

namespace fused_ce {
namespace cpu {

// Storage types for the half-precision inputs, bit-compatible with
// c10::BFloat16 and c10::Half.
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};

// Accumulation type: float64 for float64 inputs, float32 for the rest.
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

// Element strides of the canonical (N, C, D) view of a tensor.
struct Strides3 {
  int64_t n, c, d;
};

// Everything one kernel launch needs. Positions are the N * D (n, d) pairs;
// each position has one softmax over the C classes of axis 1.
//
// Every launch computes the row statistics from the logits; what it writes
// depends on the pointers set:
//   loss, lse    the forward outputs (nullptr in the backward)
//   grad_input   the gradient, scaled per position by grad_loss (backward)
//                or by grad_scale when grad_loss is nullptr (the forward
//                with the gradient of a reduced loss). It may be the input
//                itself (same strides): each row or tile is read in full
//                before any of its gradient is written.
//   grad_target  probability targets only
// The backward deliberately recomputes the statistics instead of reading a
// saved log-sum-exp: the logits are read anyway, and lse alone cannot give
// exp(x - lse) accurately when |x| is large (for a row of 1e30s, lse equals
// the max to float precision and the log of the sum is lost).
template <typename T>
struct KernelArgs {
  using Acc = acc_t<T>;

  int64_t N = 0, C = 0, D = 0;
  const T* input = nullptr;
  Strides3 input_strides{};

  // Exactly one of the two target kinds is set.
  const int64_t* class_target = nullptr;  // (N, D) class indices
  int64_t class_target_stride_n = 0, class_target_stride_d = 0;
  const T* prob_target = nullptr;  // (N, C, D) probabilities
  Strides3 prob_target_strides{};

  const Acc* weight = nullptr;  // (C) contiguous, nullptr means all ones
  Acc weight_sum = 0;           // sum of weight (C without weight)
  int64_t ignore_index = -100;
  Acc label_smoothing = 0;
  Acc z_loss = 0;   // adds z_loss * w_target * lse^2 per element (w = 1 for probabilities)
  Acc softcap = 0;  // > 0: every logit x is read as softcap * tanh(x / softcap)

  Acc* loss = nullptr;  // (N * D) contiguous, or nullptr
  Acc* lse = nullptr;   // (N * D) contiguous, set together with loss

  const Acc* grad_loss = nullptr;  // backward: d(loss)/d(loss_i), any strides
  int64_t grad_loss_stride_n = 0, grad_loss_stride_d = 0;
  Acc grad_scale = 1;  // forward with grad: d(loss)/d(loss_i) for every i
  const Acc* grad_lse = nullptr;  // backward, optional: d(loss)/d(lse_i), any strides
  int64_t grad_lse_stride_n = 0, grad_lse_stride_d = 0;

  T* grad_input = nullptr;  // (N, C, D), nullptr when not wanted
  Strides3 grad_input_strides{};
  T* grad_target = nullptr;  // (N, C, D), probability targets only
  Strides3 grad_target_strides{};

  // True when the row-wise kernel applies: class stride 1, class-index
  // targets and enough classes to fill vectors. Otherwise positions are
  // processed in tiles with one position per SIMD lane.
  bool use_row_kernel = false;
};

// Positions handled per work item by the tile kernel: one per lane of a
// vector of the accumulate type, `vector_bytes` wide.
template <typename T>
constexpr int64_t tile_positions(int vector_bytes) {
  return vector_bytes / int64_t(sizeof(acc_t<T>));
}

// Width in bytes of the vectors of the kernels run_kernel dispatches to (64
// for AVX-512, 32 otherwise).
int vector_bytes();

// Fewest classes for which the row-wise kernel beats the tile kernel.
constexpr int64_t kRowKernelMinClasses = 64;

// Positions per work item: one row for the row kernel, a tile of
// tile_positions<T>() positions otherwise.
template <typename T>
int64_t positions_per_work_item(const KernelArgs<T>& args) {
  return args.use_row_kernel ? 1 : tile_positions<T>(vector_bytes());
}

template <typename T>
int64_t num_work_items(const KernelArgs<T>& args) {
  const int64_t per_item = positions_per_work_item(args);
  return (args.N * args.D + per_item - 1) / per_item;
}

// Runs work items [begin, end). Thread-safe for disjoint ranges. Runs the
// code compiled for the best instruction set the CPU supports, or for a
// lower one named by the environment variable FUSED_CE_CPU_CAPABILITY
// ("avx2", "default"), read once, on first use.
void run_kernel(const KernelArgs<float>& args, int64_t begin, int64_t end);
void run_kernel(const KernelArgs<double>& args, int64_t begin, int64_t end);
void run_kernel(const KernelArgs<BFloat16Bits>& args, int64_t begin, int64_t end);
void run_kernel(const KernelArgs<Float16Bits>& args, int64_t begin, int64_t end);

// Name of the instruction set run_kernel dispatches to: "avx512", "avx2" or
// "default" (the compiler's baseline).
const char* cpu_capability();

// The instruction sets this CPU can run, from "default" up.
std::vector<const char*> supported_cpu_capabilities();

}  // namespace cpu
}  // namespace fused_ce
