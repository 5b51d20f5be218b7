// The bfloat16 CPU kernel for AVX-512 CPUs with AVX512_BF16 (Sapphire
// Rapids, Zen 4 and later): the 64-byte build of
// cross_entropy_kernel_avx512.cpp, except that the gradient is narrowed to
// bfloat16 by one instruction instead of eight. That is a tenth of a
// bfloat16 row's time. Selected by run_kernel() in cross_entropy_kernel.cpp.
#define FUSED_CE_VECTOR_BYTES 64
#define FUSED_CE_AVX512_BF16 1
// This unit's entry point runs with FMA, into which kernel_exp.h folds the
// shift of half-type rows.
#define FUSED_CE_FUSED_MULTIPLY_ADD 1
#include "cross_entropy_kernel_impl.h"
#include "kernel_entry_points.h"

#if FUSED_CE_X86_TARGETS
namespace fused_ce {
namespace cpu {

FUSED_CE_TARGET_AVX512_BF16 void run_kernel_avx512_bf16(const KernelArgs<BFloat16Bits>& args,
                                                        int64_t begin, int64_t end) {
  run_kernel_impl(args, begin, end);
}

}  // namespace cpu
}  // namespace fused_ce
#endif
