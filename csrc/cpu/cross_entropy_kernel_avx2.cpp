// The CPU kernels for AVX2 + FMA + F16C (x86-64-v3), with 32-byte vectors.
// A translation unit of its own, as each instruction set has, so that the
// builds of the kernels (the slowest sources of the extension) run in
// parallel. Selected by run_kernel() in cross_entropy_kernel.cpp.
#define FUSED_CE_VECTOR_BYTES 32
// This unit's entry point runs with FMA, into which kernel_exp.h folds the
// shift of half-type rows.
#define FUSED_CE_FUSED_MULTIPLY_ADD 1
#include "cross_entropy_kernel_impl.h"
#include "kernel_entry_points.h"

#if FUSED_CE_X86_TARGETS
namespace fused_ce {
namespace cpu {

template <typename T>
FUSED_CE_TARGET_AVX2 void run_kernel_avx2(const KernelArgs<T>& args, int64_t begin, int64_t end) {
  run_kernel_impl(args, begin, end);
}
FUSED_CE_INSTANTIATE_ENTRY_POINT(run_kernel_avx2);

}  // namespace cpu
}  // namespace fused_ce
#endif
