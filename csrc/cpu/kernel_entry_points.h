// The CPU kernels compiled once per instruction set, for run_kernel()
// (cross_entropy_kernel.cpp) to choose from. Each entry point inlines the
// whole of cross_entropy_kernel_impl.h under its own target attribute;
// only the functions declared here cross translation units.
#pragma once

#include <cstdint>

#include "cross_entropy_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Besides the baseline (SSE2): AVX2 + FMA + F16C (x86-64-v3), AVX-512
// (x86-64-v4) and AVX-512 with AVX512_BF16 (for bfloat16 only: the rest
// would be the same code). Explicit entry points rather than target_clones, whose
// resolver cannot be overridden: the tests run every instruction set the
// machine has, not only its best. The attribute is part of each
// declaration: GCC treats a function declared with and without one as two
// versions of it.
#define FUSED_CE_X86_TARGETS 1
#define FUSED_CE_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define FUSED_CE_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FUSED_CE_TARGET_AVX512_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define FUSED_CE_X86_TARGETS 0
#endif

namespace fused_ce {
namespace cpu {

// 32-byte vectors, in cross_entropy_kernel.cpp.
template <typename T>
void run_kernel_default(const KernelArgs<T>& args, int64_t begin, int64_t end);

#if FUSED_CE_X86_TARGETS
// 32-byte vectors, in cross_entropy_kernel_avx2.cpp.
template <typename T>
FUSED_CE_TARGET_AVX2 void run_kernel_avx2(const KernelArgs<T>& args, int64_t begin, int64_t end);

// 64-byte vectors, in cross_entropy_kernel_avx512.cpp.
template <typename T>
FUSED_CE_TARGET_AVX512 void run_kernel_avx512(const KernelArgs<T>& args, int64_t begin,
                                              int64_t end);

// 64-byte vectors and AVX512_BF16's conversion, in
// cross_entropy_kernel_avx512_bf16.cpp.
FUSED_CE_TARGET_AVX512_BF16 void run_kernel_avx512_bf16(const KernelArgs<BFloat16Bits>& args,
                                                        int64_t begin, int64_t end);
#endif

// Instantiates an entry point for every storage type.
#define FUSED_CE_INSTANTIATE_ENTRY_POINT(name)                                              \
  template void name<float>(const KernelArgs<float>&, int64_t, int64_t);                 \
  template void name<double>(const KernelArgs<double>&, int64_t, int64_t);               \
  template void name<BFloat16Bits>(const KernelArgs<BFloat16Bits>&, int64_t, int64_t);   \
  template void name<Float16Bits>(const KernelArgs<Float16Bits>&, int64_t, int64_t)

}  // namespace cpu
}  // namespace fused_ce
