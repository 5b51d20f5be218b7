// The backward of a gradient computed in the forward: grad *= upstream, in
// place, and nothing at all when the upstream gradient is exactly 1.
//
// forward_with_grad writes the gradient of the reduced loss for an upstream
// gradient of 1.  The backward then only has to multiply it by the actual
// upstream gradient, a 0-dim device tensor, which is 1 for a loss at the end
// of the graph (loss.backward()).  Finding that out on the host would need a
// synchronisation; here every block reads the scalar itself and returns at
// once when it is 1, so forward + backward stays one read and one write of
// the logits, and the step can still be captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ce_common.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"

namespace fused_ce {
namespace cuda {

constexpr int kScaleThreads = 256;
// Enough resident blocks to stream at full bandwidth on every current GPU
// (132 SMs x 8 blocks of 256 threads on an H100) without a device query;
// a grid-stride loop covers the rest.
constexpr int64_t kScaleMaxBlocks = 1056;

// VEC elements per access; VEC > 1 needs `grad` aligned to 16 bytes. The
// scale is read as S: the accumulation type, or T itself.
template <typename T, int VEC, typename S>
__global__ void __launch_bounds__(kScaleThreads)
    ce_scale_gradient_kernel(T* __restrict__ grad, int64_t numel, const S* __restrict__ scale) {
  using Acc = acc_t<T>;
  const Acc s = to_acc(*scale);
  if (s == Acc(1)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kScaleThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScaleThreads + threadIdx.x;
  const int64_t packs = numel / VEC;
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T, VEC>* ptr = reinterpret_cast<Pack<T, VEC>*>(grad) + i;
    Pack<T, VEC> v = load_global<CachePolicy::kStream>(ptr);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_acc<T>(to_acc(v.v[j]) * s);
    store_global<CachePolicy::kStream>(ptr, v);
  }
  // The last numel % VEC elements, one per thread of the first block.
  const int64_t tail = packs * VEC + first;
  if (tail < numel && first < VEC) grad[tail] = from_acc<T>(to_acc(grad[tail]) * s);
}

template <typename T>
cudaError_t launch_scale_gradient(T* grad, int64_t numel, GradientScale<T> scale, cudaStream_t stream) {
  if ((scale.acc == nullptr) == (scale.storage == nullptr)) return cudaErrorInvalidValue;  // exactly one
  if (numel < 0 || (numel > 0 && grad == nullptr)) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = vector_width<T>();
  const bool aligned = reinterpret_cast<uintptr_t>(grad) % kVectorBytes == 0;
  const int64_t packs = aligned ? numel / kVec : numel;
  int64_t blocks = (packs + kScaleThreads - 1) / kScaleThreads;
  if (blocks > kScaleMaxBlocks) blocks = kScaleMaxBlocks;
  if (blocks < 1) blocks = 1;
  const unsigned int grid = static_cast<unsigned int>(blocks);
  auto launch = [&](const auto* s) {
    using S = std::remove_cv_t<std::remove_pointer_t<decltype(s)>>;
    if (aligned) {
      ce_scale_gradient_kernel<T, kVec, S><<<grid, kScaleThreads, 0, stream>>>(grad, numel, s);
    } else {
      ce_scale_gradient_kernel<T, 1, S><<<grid, kScaleThreads, 0, stream>>>(grad, numel, s);
    }
  };
  if (scale.acc != nullptr) {
    launch(scale.acc);
  } else {
    launch(scale.storage);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fused_ce
