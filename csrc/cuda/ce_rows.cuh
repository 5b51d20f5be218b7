// Row bookkeeping shared by the kernels: mapping a flat row index to (n, d),
// reading and validating class targets, and the per-row loop that keeps
// whole groups in step for their collective reductions.
#pragma once

#include <cstdint>

#include "ce_common.cuh"
#include "ce_memory.cuh"

namespace fused_ce {
namespace cuda {

// A "row" is one (n, d) element: the C logits input[n, :, d].  Rows are
// numbered r = n * D + d, which is also their index in loss/lse.
struct RowCoord {
  int64_t n, d;
};

__device__ __forceinline__ RowCoord split_row(int64_t row, int64_t D) {
  // D == 1 is the (N, C) case: skip the 64-bit division.
  if (D == 1) return RowCoord{row, 0};
  return RowCoord{row / D, row % D};
}

// The class of a row's target y: y, or -1 when the row is ignored.  A
// target that is neither ignore_index nor a valid class is a user error:
// assert like PyTorch does, and then treat the row as ignored so that
// nothing outside the tensors is ever touched.
__device__ __forceinline__ int64_t checked_class_target(int64_t y, int64_t ignore_index, int64_t num_classes) {
  if (y == ignore_index) return -1;
  FUSED_CE_KERNEL_ASSERT(y >= 0 && y < num_classes && "target out of bounds");
  return (y >= 0 && y < num_classes) ? y : -1;
}

// Reads the class target of a row and checks it (checked_class_target).
__device__ __forceinline__ int64_t read_class_target(const int64_t* target, int64_t offset,
                                                     int64_t ignore_index, int64_t num_classes) {
  return checked_class_target(load_global<CachePolicy::kKeep>(target + offset), ignore_index, num_classes);
}

// Rows handled by one block: BLOCK / TPR groups of TPR threads, one row each
// per step.  The step loop runs on a block-uniform counter and hands each
// group an `active` flag instead of letting groups leave early, because
// groups narrower than a warp share their warp's shuffles and must all reach
// them.
template <int TPR, int BLOCK>
struct RowSchedule {
  static_assert(BLOCK % TPR == 0, "a block holds whole groups");
  static constexpr int kRowsPerBlock = BLOCK / TPR;

  __device__ __forceinline__ static int lane() { return static_cast<int>(threadIdx.x) % TPR; }
  __device__ __forceinline__ static int group() { return static_cast<int>(threadIdx.x) / TPR; }
  __device__ __forceinline__ static int64_t first_base() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  }
  __device__ __forceinline__ static int64_t base_step() {
    return static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  }
};

}  // namespace cuda
}  // namespace fused_ce
