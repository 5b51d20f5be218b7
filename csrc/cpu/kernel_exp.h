// exp for the CPU kernels, per storage type: the shorter exp that the
// rounding of half-type results allows, and exp(x - shift) over a row with
// the shift folded into the exp's first step for half types.
//
// Part of the CPU kernels (cross_entropy_kernel_impl.h): included once per
// vector width, everything with internal linkage.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cross_entropy_kernel.h"
#include "simd.h"

namespace fused_ce {
namespace cpu {
namespace {

template <typename T>
constexpr bool kIsHalf = std::is_same<T, BFloat16Bits>::value || std::is_same<T, Float16Bits>::value;

// The significant bits of a half type's results: what the shorter exp is
// fitted for (Simd<float>::exp_for_rounding_to).
template <typename T>
constexpr int kResultBits = std::is_same<T, BFloat16Bits>::value ? 8 : 11;

// exp for the logits of storage type T, computed in acc_t<T>: the results
// for half types are rounded to 8 or 11 bits, which the shorter exp leaves
// unaffected but for rare one-step roundings (see
// Simd<float>::exp_for_rounding_to).
template <typename T, typename Vec>
FUSED_CE_INLINE Vec exp_for(Vec x) {
  if constexpr (kIsHalf<T>) {
    return Simd<float>::template exp_for_rounding_to<kResultBits<T>>(x);
  } else {
    return Simd<acc_t<T>>::exp(x);
  }
}

// exp(x - shift) for the elements of one row of storage type T, computed in
// acc_t<T>: the plain form, for every type and every shift.
template <typename T>
class PlainShiftedExp {
  using Acc = acc_t<T>;

 public:
  explicit PlainShiftedExp(Acc shift) : shift_(shift) {}
  template <typename Vec>
  FUSED_CE_INLINE Vec operator()(Vec x) const {
    return exp_for<T>(x - shift_);
  }
  // The log of the factor that every result carries (see FoldedShiftedExp).
  Acc log_bias() const { return 0; }

 private:
  Acc shift_;
};

// The same for half types, with the subtraction folded into the exp's first
// multiply: 2^(x log2(e) - hi), hi = shift log2(e) rounded to float, is one
// fused multiply-add where x - shift and its product with log2(e) are two
// operations, and the half-type exp pass is bound by those (7% of a
// bfloat16 row).
//
// Inside the FMA the product x log2(e) is exact, so the argument is
// (x - shift) log2(e) + lo, rounded once, where lo = shift log2(e) - hi is
// what hi's rounding dropped: the plain form's argument (also rounded about
// once) plus a constant of the row. Every result carries the factor 2^lo,
// which cancels from p = e / sum; only the log of the sum must take it out
// (log_bias). |lo| <= 2 while |shift| <= 2^24, so the results stay in
// range. Beyond that (bfloat16 only) the argument is x - shift itself:
// bfloat16 values that large are at least 2^16 apart, so exp(x - shift) is
// exactly 1 at the max and 0 elsewhere, and so is 2^(x - shift). That form
// also keeps the plain one's results for an infinite or NaN shift.
template <typename T>
class FoldedShiftedExp {
  static_assert(kIsHalf<T>, "the exp for half-type results");

 public:
  explicit FoldedShiftedExp(float shift) {
    if (std::fabs(shift) <= 0x1p24f) {
      scale_ = Simd<float>::kLog2e;
      offset_ = shift * scale_;
      log_bias_ = std::fma(shift, scale_, -offset_) * Simd<float>::kLn2;
    } else {
      scale_ = 1;
      offset_ = shift;
      log_bias_ = 0;
    }
  }
  template <typename Vec>
  FUSED_CE_INLINE Vec operator()(Vec x) const {
    return Simd<float>::template exp2_for_rounding_to<kResultBits<T>>(x * scale_ - offset_);
  }
  float log_bias() const { return log_bias_; }

 private:
  float scale_, offset_, log_bias_;
};

// Whether this build's multiply-adds are fused (one rounding): the AVX2 and
// AVX-512 builds' are (their translation units say so), the baseline x86-64
// build's are not, where the folded form's product x log2(e) is rounded
// before the shift is taken from it, an error that grows with the shift
// (3e-5 in the loss of a row whose largest bfloat16 logit is 1000).
#ifndef FUSED_CE_FUSED_MULTIPLY_ADD
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define FUSED_CE_FUSED_MULTIPLY_ADD 1
#else
#define FUSED_CE_FUSED_MULTIPLY_ADD 0
#endif
#endif

// The shifted exp that a row of storage type T uses: the folded form for
// half types where multiply-adds are fused.
template <typename T>
using ShiftedExp = typename std::conditional<kIsHalf<T> && FUSED_CE_FUSED_MULTIPLY_ADD, FoldedShiftedExp<T>,
                                             PlainShiftedExp<T>>::type;

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
