// The float instantiation of the CUDA launchers and kernels (torch-free; see
// FUSED_CE_INSTANTIATE_LAUNCHERS in cross_entropy_kernels.cuh).
#include "cross_entropy_kernels.cuh"

namespace fused_ce {
namespace cuda {

FUSED_CE_INSTANTIATE_LAUNCHERS(float)

}  // namespace cuda
}  // namespace fused_ce
