// reduce_loss on the device: the per-element losses summed, divided by
// total_weight for the mean, and written as one element of the caller's
// dtype.
//
// It replaces ATen's sum, division and cast (three kernels, and the host
// work of three TensorIterator calls) by one kernel for up to
// kLossElemsPerPartial elements (kWideReduceElems in one wide block, under
// FUSED_CE_CUDA_WIDE_REDUCTIONS) and two beyond. No atomics: stage 1 gives
// each block a fixed contiguous range and writes one partial per block,
// stage 2 (one block) folds the partials in index order. The partition
// depends only on the element count, so the bits do not depend on the GPU.
#pragma once

#include <cstdint>

#include "ce_common.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"
#include "ce_reduce.cuh"

namespace fused_ce {
namespace cuda {

constexpr int kLossReduceThreads = 256;
// Elements per thread in a block of stage 1 (ce_params.cuh): few enough
// that one block reads them in a few microseconds.
static_assert(kLossElemsPerPartial == 16 * kLossReduceThreads, "16 elements per thread");
// Losses a thread loads before it adds them (strided_sum).
constexpr int kLossReduceUnroll = 8;
// The wide block of FUSED_CE_CUDA_WIDE_REDUCTIONS (wide_reductions() in
// ce_params.cuh) and the losses each of its threads has in flight (64 each:
// 4 waits).
constexpr int kWideLossReduceThreads = 1024;
constexpr int kWideLossReduceUnroll = 16;

// The mean's division, correctly rounded even under --use_fast_math (which
// turns float `/` into an approximation), like ATen's.
__device__ __forceinline__ float divide_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide_rn(double a, double b) { return a / b; }

// Stage 1: partials[b] = sum of values[b * chunk, min((b + 1) * chunk, n)).
template <typename Acc>
__global__ void __launch_bounds__(kLossReduceThreads)
    ce_loss_partials_kernel(const Acc* __restrict__ values, int64_t n, int64_t chunk, Acc* __restrict__ partials) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const Acc sum = group_sum<kLossReduceThreads, kLossReduceThreads>(strided_sum<kLossReduceUnroll, Acc>(
      begin + threadIdx.x, end, kLossReduceThreads, [&](int64_t i) { return values[i]; }, [](Acc v) { return v; }));
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// Stage 2, one block of THREADS: *out = sum of values[0, n), over
// *total_weight for the mean. A total weight of 0 (every target ignored or
// of class weight 0) gives NaN, as PyTorch's mean: it divides the NLL term
// (0 there) and the label smoothing term by it apart, and 0 / 0 is NaN
// whatever the other.
template <typename T, int THREADS = kLossReduceThreads>
__global__ void __launch_bounds__(THREADS)
    ce_finish_loss_kernel(const acc_t<T>* __restrict__ values, int64_t n, const acc_t<T>* __restrict__ total_weight,
                          int reduction, T* __restrict__ out) {
  using Acc = acc_t<T>;
  constexpr int U = THREADS == kWideLossReduceThreads ? kWideLossReduceUnroll : kLossReduceUnroll;
  const Acc sum = group_sum<THREADS, THREADS>(strided_sum<U, Acc>(
      threadIdx.x, n, THREADS, [&](int64_t i) { return values[i]; }, [](Acc v) { return v; }));
  if (threadIdx.x == 0) {
    Acc result = sum;
    if (reduction == kReductionMean) {
      const Acc total = *total_weight;
      result = total == Acc(0) ? acc_nan<Acc>() : divide_rn(sum, total);
    }
    *out = from_acc<T>(result);
  }
}

template <typename T>
cudaError_t launch_reduce_loss(const acc_t<T>* loss, int64_t n, const acc_t<T>* total_weight, int reduction,
                               acc_t<T>* workspace, T* out, cudaStream_t stream) {
  if (n < 0 || out == nullptr || total_weight == nullptr || (n > 0 && loss == nullptr) ||
      (reduction != kReductionMean && reduction != kReductionSum))
    return cudaErrorInvalidValue;
  if (!reduce_loss_uses_workspace(n)) {
    if (n <= kLossElemsPerPartial) {
      ce_finish_loss_kernel<T><<<1, kLossReduceThreads, 0, stream>>>(loss, n, total_weight, reduction, out);
    } else {
      ce_finish_loss_kernel<T, kWideLossReduceThreads>
          <<<1, kWideLossReduceThreads, 0, stream>>>(loss, n, total_weight, reduction, out);
    }
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  int64_t blocks = (n + kLossElemsPerPartial - 1) / kLossElemsPerPartial;
  if (blocks > kMaxLossPartials) blocks = kMaxLossPartials;
  const int64_t chunk = (n + blocks - 1) / blocks;
  ce_loss_partials_kernel<acc_t<T>>
      <<<static_cast<unsigned int>(blocks), kLossReduceThreads, 0, stream>>>(loss, n, chunk, workspace);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ce_finish_loss_kernel<T><<<1, kLossReduceThreads, 0, stream>>>(workspace, blocks, total_weight, reduction, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fused_ce
