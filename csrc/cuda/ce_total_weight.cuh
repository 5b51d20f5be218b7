// Deterministic reductions that do not depend on the logits:
//
//   total_weight = sum over non-ignored rows of w[y]  (count without weights)
//   scale        = 1 / total_weight (mean) or 1 (sum), for forward_with_grad
//   weight_sum   = sum_c w_c, for the label-smoothed backward
//
// total_weight only needs the targets (8 bytes per row), so it is computed
// before the row kernels rather than inside them: that is what lets
// forward_with_grad write the final, scaled gradient in the same pass that
// reads the logits.  No atomics: stage 1 gives each block a fixed
// contiguous range of rows and writes one partial per block, stage 2 (one
// block) folds the partials in index order; up to kMinRowsPerPartial rows,
// one block does both.  The number of partials depends
// only on N * D, so results are bitwise reproducible on any GPU.
#pragma once

#include <cstdint>

#include "ce_common.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"
#include "ce_reduce.cuh"
#include "ce_rows.cuh"

namespace fused_ce {
namespace cuda {

constexpr int kReduceThreads = 256;
// Rows per stage-1 block before a second block is worth it.
constexpr int64_t kMinRowsPerPartial = 8 * kReduceThreads;
// Targets a thread loads before it adds their weights (strided_sum).
constexpr int kReduceUnroll = 8;
// FUSED_CE_CUDA_WIDE_REDUCTIONS (ce_reduce_loss.cuh): one block of
// kWideReduceThreads sums the weights of up to kWideReduceRows rows (64
// rows a thread: 8 waits for memory; 16 targets in flight, 32 registers of
// them, spilled 96 bytes on sm_75, where a block of 1024 threads has 64).
constexpr int kWideReduceThreads = 1024;
constexpr int64_t kWideReduceRows = 65536;

// total_weight and the gradient scale from the final sum (thread 0).
template <typename Acc>
__device__ __forceinline__ void write_total_weight(Acc total, int reduction, Acc* total_weight, Acc* workspace) {
  *total_weight = total;
  // 0 / 0 for an all-ignored mean stays the caller's business (NaN loss);
  // the gradient of ignored rows is written as exact zeros regardless.
  workspace[kWorkspaceScaleSlot] = reduction == kReductionMean ? Acc(1) / total : Acc(1);
}

// Stage 1: partials[b] = sum of w[y] over rows [b * chunk, (b + 1) * chunk),
// by a block of THREADS.  FINAL (a grid of one block, for up to
// kMinRowsPerPartial rows, or kWideReduceRows in a wide block): the block
// writes total_weight and the scale itself, one launch instead of two (what
// a small batch's step costs is mostly launches); the same bits, since stage
// 2 would add zeros to the one partial.
template <typename T, bool FINAL, int THREADS = kReduceThreads>
__global__ void __launch_bounds__(THREADS)
    ce_target_weight_partials_kernel(const CrossEntropyForwardParams<T> p, int64_t chunk) {
  using Acc = acc_t<T>;
  const int64_t rows = p.N * p.D;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < rows ? begin + chunk : rows;
  auto target_of = [&](int64_t row) {
    const RowCoord rc = split_row(row, p.D);
    return load_global<CachePolicy::kKeep>(p.target + rc.n * p.target_stride_n + rc.d * p.target_stride_d);
  };
  auto weight_of = [&](int64_t target) {
    const int64_t y = checked_class_target(target, p.ignore_index, p.C);
    return y >= 0 ? class_weight(p.weight, y) : Acc(0);
  };
  Acc sum = strided_sum<kReduceUnroll, Acc>(begin + threadIdx.x, end, THREADS, target_of, weight_of);
  sum = group_sum<THREADS, THREADS>(sum);
  if (threadIdx.x == 0) {
    if constexpr (FINAL) {
      write_total_weight(sum, p.reduction, p.total_weight, p.workspace);
    } else {
      p.workspace[blockIdx.x] = sum;
    }
  }
}

// Stage 2 (one block): total = base + sum(partials[0:num_partials]).
// Probability targets pass num_partials = 0 and base = N * D.
template <typename Acc>
__global__ void __launch_bounds__(kReduceThreads)
    ce_finalize_total_weight_kernel(Acc* workspace, int num_partials, Acc base, int reduction,
                                    Acc* total_weight) {
  Acc sum = strided_sum<kReduceUnroll, Acc>(
      threadIdx.x, num_partials, kReduceThreads, [&](int64_t i) { return workspace[i]; }, [](Acc v) { return v; });
  sum = group_sum<kReduceThreads, kReduceThreads>(sum);
  if (threadIdx.x == 0) write_total_weight(base + sum, reduction, total_weight, workspace);
}

// sum_c w_c into workspace[kWorkspaceWeightSumSlot] (one block).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    ce_weight_sum_kernel(const T* weight, int64_t num_classes, acc_t<T>* workspace) {
  using Acc = acc_t<T>;
  Acc sum = Acc(0);
  for (int64_t c = threadIdx.x; c < num_classes; c += kReduceThreads) sum += class_weight(weight, c);
  sum = group_sum<kReduceThreads, kReduceThreads>(sum);
  if (threadIdx.x == 0) workspace[kWorkspaceWeightSumSlot] = sum;
}

}  // namespace cuda
}  // namespace fused_ce
