// The Python extension module fused_ce._C. Importing it loads this shared
// library, which registers the operators with the dispatcher; the few
// functions below only describe how the library was built.

#include <torch/extension.h>

#include "cpu/cross_entropy_kernel.h"

namespace {

bool built_with_cuda() {
#ifdef FUSED_CE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ce native library: registers torch.ops.fused_ce.*";
  m.def("cpu_capability", &fused_ce::cpu::cpu_capability,
        "Instruction set the CPU kernels run with on this machine (avx512, avx2 or default).");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
