// The CPU kernels' entry point for the baseline instruction set (32-byte
// vectors; the other instruction sets' are in cross_entropy_kernel_avx2.cpp,
// cross_entropy_kernel_avx512.cpp and cross_entropy_kernel_avx512_bf16.cpp),
// and run_kernel(), which picks one per the CPU or FUSED_CE_CPU_CAPABILITY.
#define FUSED_CE_VECTOR_BYTES 32
#include "cross_entropy_kernel_impl.h"
#include "kernel_entry_points.h"

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fused_ce {
namespace cpu {

template <typename T>
void run_kernel_default(const KernelArgs<T>& args, int64_t begin, int64_t end) {
  run_kernel_impl(args, begin, end);
}
FUSED_CE_INSTANTIATE_ENTRY_POINT(run_kernel_default);

namespace {

// Instruction sets with an entry point, in increasing order.
enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };
constexpr const char* kIsaNames[] = {"default", "avx2", "avx512", "avx512_bf16"};

Isa best_supported_isa() {
#if FUSED_CE_X86_TARGETS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

// The best supported instruction set, or a lower one that
// FUSED_CE_CPU_CAPABILITY names (anything else there is ignored; the Python
// package warns about it). Chosen once, on first use.
Isa active_isa() {
  static const Isa isa = [] {
    const Isa best = best_supported_isa();
    if (const char* requested = std::getenv("FUSED_CE_CPU_CAPABILITY")) {
      for (int i = 0; i <= int(best); ++i) {
        if (std::strcmp(requested, kIsaNames[i]) == 0) return Isa(i);
      }
    }
    return best;
  }();
  return isa;
}

template <typename T>
void dispatch(const KernelArgs<T>& args, int64_t begin, int64_t end) {
  switch (active_isa()) {
#if FUSED_CE_X86_TARGETS
    case Isa::kAvx512Bf16:
      // Only bfloat16 has code of its own here.
      if constexpr (std::is_same<T, BFloat16Bits>::value) return run_kernel_avx512_bf16(args, begin, end);
      return run_kernel_avx512(args, begin, end);
    case Isa::kAvx512:
      return run_kernel_avx512(args, begin, end);
    case Isa::kAvx2:
      return run_kernel_avx2(args, begin, end);
#endif
    default:
      return run_kernel_default(args, begin, end);
  }
}

}  // namespace

int vector_bytes() { return active_isa() >= Isa::kAvx512 ? 64 : 32; }

void run_kernel(const KernelArgs<float>& args, int64_t begin, int64_t end) {
  dispatch(args, begin, end);
}
void run_kernel(const KernelArgs<double>& args, int64_t begin, int64_t end) {
  dispatch(args, begin, end);
}
void run_kernel(const KernelArgs<BFloat16Bits>& args, int64_t begin, int64_t end) {
  dispatch(args, begin, end);
}
void run_kernel(const KernelArgs<Float16Bits>& args, int64_t begin, int64_t end) {
  dispatch(args, begin, end);
}

const char* cpu_capability() { return kIsaNames[int(active_isa())]; }

std::vector<const char*> supported_cpu_capabilities() {
  std::vector<const char*> names;
  for (int i = 0; i <= int(best_supported_isa()); ++i) names.push_back(kIsaNames[i]);
  return names;
}

}  // namespace cpu
}  // namespace fused_ce
