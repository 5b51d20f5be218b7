// Torch-free translation unit for CI: instantiates every launcher (and with
// them every kernel variant the launchers can pick) for every storage type,
// so a bare nvcc compiles all template paths.  Not part of the extension
// build; see .ci/nvcc_check.sh.
#include "cross_entropy_kernels.cuh"

namespace fused_ce {
namespace cuda {

#define FUSED_CE_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_cross_entropy_forward<T>(const CrossEntropyForwardParams<T>&,       \
                                                       cudaStream_t);                            \
  template cudaError_t launch_cross_entropy_forward_with_grad<T>(const CrossEntropyForwardParams<T>&, \
                                                                 cudaStream_t);                  \
  template cudaError_t launch_cross_entropy_backward<T>(const CrossEntropyBackwardParams<T>&,     \
                                                        cudaStream_t);

FUSED_CE_INSTANTIATE(float)
FUSED_CE_INSTANTIATE(double)
FUSED_CE_INSTANTIATE(__half)
FUSED_CE_INSTANTIATE(__nv_bfloat16)

#undef FUSED_CE_INSTANTIATE

}  // namespace cuda
}  // namespace fused_ce
