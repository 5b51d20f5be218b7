// Fused log-softmax + NLL kernels for the CPU: forward, forward with the
// gradient, and backward, for class-index and probability targets.
//
// Two loop structures share one set of formulas (DESIGN.md section 2):
//
//  * RowKernel (row_kernel.h): the class axis is contiguous and long
//    (language models, ImageNet classifiers). One position at a time,
//    vectorised along the classes. The row stays in L1/L2 between its
//    passes, so memory sees one read of the logits and, with a gradient,
//    one write.
//  * TileKernel (tile_kernel.h): everything else (few classes,
//    class-strided (N, C, d...) layouts, probability targets). One position
//    per SIMD lane: a tile of positions is gathered into a class-major
//    buffer and the classes are walked with the positions side by side in
//    the vector lanes.
//
// Both read and write memory through kernel_memory.h and take their exp
// from kernel_exp.h. This header picks the kernel for a call.
//
// Included by one translation unit per instruction set, at its vector
// width (simd.h's kVectorBytes): cross_entropy_kernel.cpp (the baseline)
// and cross_entropy_kernel_avx2.cpp (32 bytes), cross_entropy_kernel_avx512.cpp
// and cross_entropy_kernel_avx512_bf16.cpp (64 bytes). Everything here has
// internal linkage, so the widths never meet, and is inlined into those
// entry points (kernel_entry_points.h), which carry the instruction set as
// a target attribute.
#pragma once

#include "cross_entropy_kernel.h"
#include "row_kernel.h"
#include "tile_kernel.h"

namespace fused_ce {
namespace cpu {
namespace {

template <typename T>
FUSED_CE_INLINE void run_kernel_impl(const KernelArgs<T>& args, int64_t begin, int64_t end) {
  if (args.use_row_kernel) {
    RowKernel<T> kernel(args);
    for (int64_t i = begin; i < end; ++i) kernel.run(i, i + 1 < end ? i + 1 : -1);
    kernel.finish();
  } else {
    TileKernel<T> kernel(args);
    kernel.run_range(begin, end);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
