// Scalar building blocks shared by every fused_ce CUDA kernel: the
// accumulation type of each storage type, conversions, the exp/log flavour
// used in the hot loops and the always-on device assertion.
//
// Torch-free on purpose: this header (and everything under csrc/cuda/*.cuh)
// must compile with a bare nvcc so CI can check it on machines without a
// CUDA build of torch.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Out-of-range class targets are a user error that PyTorch reports with a
// device-side assertion; we do the same.  A plain assert() would vanish when
// the extension is compiled with -DNDEBUG, so, like PyTorch's
// CUDA_KERNEL_ASSERT, call the runtime's assertion hook directly on glibc
// platforms.  Callers must still treat the element as "skip" afterwards so no
// out-of-bounds access can happen even where the hook is unavailable.  The
// CPU emulator of tests/cuda_emulator defines its own, which records the
// failure for the launch to report.
#if defined(FUSED_CE_KERNEL_ASSERT)
// Provided by the includer.
#elif defined(__CUDA_ARCH__) && defined(__GNUC__) && !defined(__APPLE__) && !defined(_WIN32)
#define FUSED_CE_KERNEL_ASSERT(cond)                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__),     \
                    __func__);                                                \
    }                                                                         \
  } while (0)
#else
#include <cassert>
#define FUSED_CE_KERNEL_ASSERT(cond) assert(cond)
#endif

// The block's dynamic shared memory (the launch's third configuration
// argument), 16-byte aligned.  The CPU emulator hands each block a buffer of
// the launch's size.
#ifdef FUSED_CE_CUDA_EMULATION
#define FUSED_CE_DYNAMIC_SHARED(name) unsigned char* const name = static_cast<unsigned char*>(::emu::dynamic_shared_memory())
#else
#define FUSED_CE_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// libdevice's tanhf (about 2 ulp).  Declared here to be called by name: see
// accurate_tanh.
extern "C" __device__ float __nv_tanhf(float);

namespace fused_ce {
namespace cuda {

// float32 accumulation for every storage type except float64 (DESIGN §2).
template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccTypeOf<T>::type;

// Conversions are spelled out with intrinsics because torch builds CUDA
// sources with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__,
// which remove the implicit ones.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// -inf in the storage type: the padding value of partially filled vector
// slots, chosen so max() ignores it and exp() turns it into 0.
template <typename T>
__device__ __forceinline__ T storage_neg_inf();
template <>
__device__ __forceinline__ float storage_neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double storage_neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}
template <>
__device__ __forceinline__ __half storage_neg_inf<__half>() {
  return __ushort_as_half(static_cast<unsigned short>(0xFC00U));
}
template <>
__device__ __forceinline__ __nv_bfloat16 storage_neg_inf<__nv_bfloat16>() {
  return __ushort_as_bfloat16(static_cast<unsigned short>(0xFF80U));
}

template <typename Acc>
__device__ __forceinline__ Acc acc_neg_inf();
template <>
__device__ __forceinline__ float acc_neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double acc_neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

template <typename Acc>
__device__ __forceinline__ Acc acc_nan();
template <>
__device__ __forceinline__ float acc_nan<float>() { return __int_as_float(0x7fffffff); }
template <>
__device__ __forceinline__ double acc_nan<double>() {
  return __longlong_as_double(static_cast<long long>(0x7fffffffffffffffULL));
}

// exp is evaluated once or twice per logit, so the float path is a multiply
// and one MUFU op: ex2.approx.ftz(x * log2 e).  Its relative error (~2^-22
// plus the rounding of the product) is far below what float32 parity tests
// resolve.  The arguments are always x - max <= 0, so the only special range
// is results below 2^-126, which flush to 0 (the .ftz form; plain __expf adds
// four instructions to produce those denormals exactly, and they are
// negligible next to the row's largest term, which is 1).  float64 keeps the
// accurate libdevice exp.
__device__ __forceinline__ float fast_exp(float x) {
#ifdef FUSED_CE_CUDA_EMULATION
  // The CPU emulator (tests/cuda_emulator) has no PTX: the same maths.
  const float y = exp2f(x * 1.4426950408889634f);
  return y < 1.17549435e-38f ? 0.0f : y;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#endif
}
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
// log of a row's rescaled sum of exponentials, which is >= 1 (the maximum
// contributes exp(0)) or 0 for an all -inf row.  log1pf(s - 1) is exact in
// s - 1 over [1, 2] and, unlike logf, is not swapped for the approximate
// __logf under --use_fast_math: confident predictions have s = 1 + tiny and a
// loss of about `tiny`, so the log's absolute error near 1 matters.
__device__ __forceinline__ float acc_log(float x) { return log1pf(x - 1.0f); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return fma(a, b, c); }

// tanh for the softcap.  The extension is built with --use_fast_math, under
// which nvcc compiles tanhf() to the tanh.approx.f32 instruction (relative
// error about 2^-11, visible in every capped logit); calling libdevice's
// tanhf by name bypasses that substitution.  float64 is unaffected by fast
// math.
__device__ __forceinline__ float accurate_tanh(float x) { return __nv_tanhf(x); }
__device__ __forceinline__ double accurate_tanh(double x) { return tanh(x); }

// Reduction codes shared with the operator schema (0 none, 1 mean, 2 sum).
enum Reduction : int { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

}  // namespace cuda
}  // namespace fused_ce
