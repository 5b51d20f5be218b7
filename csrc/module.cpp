// The Python extension module fused_ce._C. Importing it loads this shared
// library, which registers the operators with the dispatcher; the few
// functions below describe how the library was built, control the CPU
// gradient cache and give Python the C++ fast path of cross_entropy.

#include <torch/extension.h>

#include "autograd.h"
#include "compiled_autograd_step.h"
#include "cpu/cross_entropy_kernel.h"
#include "cpu/gradient_cache.h"

namespace {

bool built_with_cuda() {
#ifdef FUSED_CE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool compiled_autograd_nodes() { return FUSED_CE_COMPILED_AUTOGRAD == 1; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ce native library: registers torch.ops.fused_ce.*";
  m.def("cpu_capability", &fused_ce::cpu::cpu_capability,
        "Instruction set the CPU kernels run with (avx512, avx2 or default): the best the CPU "
        "supports unless FUSED_CE_CPU_CAPABILITY names a lower one.");
  m.def("supported_cpu_capabilities", &fused_ce::cpu::supported_cpu_capabilities,
        "Instruction sets the CPU kernels can run with on this CPU, from default up.");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
  m.def("compiled_autograd_nodes", &compiled_autograd_nodes,
        "Whether the autograd nodes take part in compiled autograd (built against torch 2.7+).");
  m.def("empty_gradient_cache", &fused_ce::cpu::empty_gradient_cache,
        "Frees the cached CPU gradient buffer, if any.");
  m.def("set_gradient_cache_enabled", &fused_ce::cpu::set_gradient_cache_enabled,
        "Turns the CPU gradient cache on or off; returns the previous setting.");
  m.def("gradient_cache_bytes", &fused_ce::cpu::gradient_cache_bytes,
        "Bytes the CPU gradient cache holds right now.");
  m.def("cross_entropy_loss", &fused_ce::cross_entropy_loss,
        "The loss of batched arguments with its autograd node in C++ (see csrc/autograd.h): "
        "fused_ce.cross_entropy's path for the common cases.",
        py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("reduction"),
        py::arg("device_scaled"));
}
