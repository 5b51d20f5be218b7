// The CPU kernels for AVX-512 (x86-64-v4), with 64-byte vectors: half the
// instructions per element of the 32-byte build, which matters most in the
// exp pass and in the bfloat16 conversions (AVX-512 narrows a register in
// one instruction). Selected by run_kernel() in cross_entropy_kernel.cpp.
#define FUSED_CE_VECTOR_BYTES 64
// This unit's entry point runs with FMA, into which kernel_exp.h folds the
// shift of half-type rows.
#define FUSED_CE_FUSED_MULTIPLY_ADD 1
#include "cross_entropy_kernel_impl.h"
#include "kernel_entry_points.h"

#if FUSED_CE_X86_TARGETS
namespace fused_ce {
namespace cpu {

template <typename T>
FUSED_CE_TARGET_AVX512 void run_kernel_avx512(const KernelArgs<T>& args, int64_t begin,
                                              int64_t end) {
  run_kernel_impl(args, begin, end);
}
FUSED_CE_INSTANTIATE_ENTRY_POINT(run_kernel_avx512);

}  // namespace cpu
}  // namespace fused_ce
#endif
