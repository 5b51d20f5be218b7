// Portable SIMD building blocks for the CPU kernels.
//
// Written with GCC/Clang vector extensions instead of intrinsics so that one
// source compiles to SSE2, AVX2 or AVX-512 code depending on the target the
// enclosing function is compiled for (see FUSED_CE_MULTIVERSION in
// cross_entropy_kernel.cpp). Deliberately free of torch headers: nothing here
// may be instantiated with ISA flags that leak into shared inline functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define FUSED_CE_INLINE inline __attribute__((always_inline))

namespace fused_ce {
namespace cpu {

// 64 bytes: one AVX-512 register, two AVX2 registers, four SSE registers.
constexpr int kVectorBytes = 64;

typedef float VecF __attribute__((vector_size(kVectorBytes)));
typedef int32_t VecI32 __attribute__((vector_size(kVectorBytes)));
typedef double VecD __attribute__((vector_size(kVectorBytes)));

// Per accumulate type: the vector type, its lane count and a vector exp().
template <typename Acc>
struct Simd;

template <>
struct Simd<float> {
  using Vec = VecF;
  static constexpr int kLanes = kVectorBytes / sizeof(float);

  // exp(x) for float lanes, accurate to about 1 ulp on the range the kernels
  // use (arguments <= ~0: logits minus their max or their log-sum-exp).
  //
  // exp(x) = 2^n * exp(r) with n = round(x / ln 2) and r = x - n ln 2 in
  // [-ln2/2, ln2/2]; exp(r) is a degree-7 Taylor polynomial (truncation error
  // < 6e-9 relative). NaN passes through every step unchanged; arguments
  // below the smallest normal result (including -inf) give exactly 0, as the
  // softmax of a masked (-inf) logit must.
  static FUSED_CE_INLINE Vec exp(Vec x) {
    const float kMaxArg = 88.0f;  // keeps 2^n finite (n <= 127)
    const float kMinArg = -87.33654475f;  // log(FLT_MIN)
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693145751953125f;  // ln 2 split in two (Cody-Waite)
    const float kLn2Lo = 1.428606765330187e-06f;
    const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const Vec max_arg = Vec{} + kMaxArg, min_arg = Vec{} + kMinArg;
    Vec clamped = x > max_arg ? max_arg : x;
    clamped = clamped < min_arg ? min_arg : clamped;
    Vec n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
    Vec r = clamped - n * kLn2Hi;
    r = r - n * kLn2Lo;
    Vec p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
    p = p * r + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // 2^n assembled directly in the exponent field. For NaN lanes n is
    // garbage, but p is NaN and so is the product.
    VecI32 exponent = (__builtin_convertvector(n, VecI32) + 127) << 23;
    Vec two_to_n;
    std::memcpy(&two_to_n, &exponent, sizeof two_to_n);
    Vec result = p * two_to_n;
    return x < min_arg ? Vec{} : result;
  }
};

template <>
struct Simd<double> {
  using Vec = VecD;
  static constexpr int kLanes = kVectorBytes / sizeof(double);

  // float64 is the precision reference path: libm's exp, lane by lane.
  static FUSED_CE_INLINE Vec exp(Vec x) {
    for (int i = 0; i < kLanes; ++i) x[i] = std::exp(x[i]);
    return x;
  }
};

template <typename Vec>
FUSED_CE_INLINE Vec load_vec(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename Vec>
FUSED_CE_INLINE void store_vec(void* p, Vec v) {
  std::memcpy(p, &v, sizeof v);
}

// Lane-wise max that lets NaN win, so that a NaN logit poisons its row the
// way it does in PyTorch (a NaN max makes every exp() NaN).
template <typename Vec>
FUSED_CE_INLINE Vec max_vec(Vec a, Vec b) {
  return ((a > b) | (a != a)) ? a : b;
}

template <typename Scalar>
FUSED_CE_INLINE Scalar max_scalar(Scalar a, Scalar b) {
  return (a > b || a != a) ? a : b;
}

template <typename Acc, typename Vec>
FUSED_CE_INLINE Acc reduce_max(Vec v) {
  Acc m = v[0];
  for (int i = 1; i < int(sizeof(Vec) / sizeof(Acc)); ++i) m = max_scalar(m, Acc(v[i]));
  return m;
}

template <typename Acc, typename Vec>
FUSED_CE_INLINE Acc reduce_sum(Vec v) {
  Acc s = 0;
  for (int i = 0; i < int(sizeof(Vec) / sizeof(Acc)); ++i) s += v[i];
  return s;
}

}  // namespace cpu
}  // namespace fused_ce
