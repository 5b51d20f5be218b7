// Portable SIMD building blocks for the CPU kernels.
//
// Written with GCC/Clang vector extensions instead of intrinsics so that one
// source compiles to SSE2, AVX2 or AVX-512 code depending on the target of
// the entry point it is inlined into (kernel_entry_points.h). Deliberately
// free of torch headers: nothing here may be instantiated with ISA flags
// that leak into shared inline functions.
//
// The vector width is FUSED_CE_VECTOR_BYTES, set by the translation unit
// before it includes this header (32 unless set). Each unit that includes it
// gets its own copy (an unnamed namespace), so units of different widths can
// be linked together.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#ifndef FUSED_CE_VECTOR_BYTES
#define FUSED_CE_VECTOR_BYTES 32
#endif

// The 64-byte builds only ever run under AVX-512 (their entry points are
// compiled for x86-64-v4), so with GCC on x86-64 their inline functions
// carry that target too and may use AVX-512 intrinsics where the vector
// extensions compile poorly: GCC splits a 16-lane widening conversion into
// six instructions, and the vector extensions have no scalef or streaming
// store. Everything here has internal linkage, so the attribute cannot reach
// code outside the translation unit. FUSED_CE_AVX512 tells the code paths
// apart; a unit that also defines FUSED_CE_AVX512_BF16 adds AVX512_BF16's
// float32 -> bfloat16 conversion.
#ifndef FUSED_CE_AVX512_BF16
#define FUSED_CE_AVX512_BF16 0
#endif
#if FUSED_CE_VECTOR_BYTES == 64 && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_CE_AVX512 1
#if FUSED_CE_AVX512_BF16
#define FUSED_CE_INLINE_ATTRIBUTES \
  __attribute__((always_inline, target("arch=x86-64-v4,avx512bf16")))
#else
#define FUSED_CE_INLINE_ATTRIBUTES __attribute__((always_inline, target("arch=x86-64-v4")))
#endif
#include <immintrin.h>
#else
#define FUSED_CE_AVX512 0
#define FUSED_CE_INLINE_ATTRIBUTES __attribute__((always_inline))
#endif
// For functions; lambdas take FUSED_CE_INLINE_ATTRIBUTES alone.
#define FUSED_CE_INLINE inline FUSED_CE_INLINE_ATTRIBUTES

namespace fused_ce {
namespace cpu {
namespace {

// 32 bytes: one AVX2 register, two SSE registers; 64: one AVX-512 register.
// A width is only used for instruction sets that hold it in one or two
// registers: GCC lowers wider generic vectors to spills, which cost far
// more than the wider arithmetic gains.
constexpr int kVectorBytes = FUSED_CE_VECTOR_BYTES;
static_assert(kVectorBytes == 32 || kVectorBytes == 64, "vector widths with a kernel build");

typedef float VecF __attribute__((vector_size(kVectorBytes)));
typedef int32_t VecI32 __attribute__((vector_size(kVectorBytes)));
typedef double VecD __attribute__((vector_size(kVectorBytes)));

// The integer vector with the lanes of a float vector: lane masks (the
// result of comparisons), lane indices and shuffle masks.
template <typename Vec>
struct IntLanes;
template <>
struct IntLanes<VecF> {
  using type = VecI32;
};
template <>
struct IntLanes<VecD> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename Vec>
using int_lanes_t = typename IntLanes<Vec>::type;

// The vector in which long sums of a vector type's lanes are accumulated:
// float lanes in double (two registers), double lanes as they are.
template <typename Vec>
struct WideLanes;
template <>
struct WideLanes<VecF> {
  typedef double type __attribute__((vector_size(2 * kVectorBytes)));
};
template <>
struct WideLanes<VecD> {
  using type = VecD;
};
template <typename Vec>
using wide_lanes_t = typename WideLanes<Vec>::type;

// As many int64 lanes as a float vector has lanes (class targets).
template <typename Vec>
struct Int64Lanes;
template <>
struct Int64Lanes<VecF> {
  typedef int64_t type __attribute__((vector_size(2 * kVectorBytes)));
};
template <>
struct Int64Lanes<VecD> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename Vec>
using int64_lanes_t = typename Int64Lanes<Vec>::type;

// Lane-wise max; where either lane is NaN, b's (x86's max instructions
// behave so). The row max leaves NaN to the exp pass: a NaN logit makes its
// exp, and so the row's sum and log-sum-exp, NaN whatever the max is.
template <typename Vec>
FUSED_CE_INLINE Vec max_vec(Vec a, Vec b) {
  return a > b ? a : b;
}

// Per accumulate type: the vector type, its lane count and a vector exp().
template <typename Acc>
struct Simd;

template <>
struct Simd<float> {
  using Vec = VecF;
  static constexpr int kLanes = kVectorBytes / sizeof(float);
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2 = 0.693147180559945309f;
  // ln 2 split in two (Cody-Waite): kLn2Hi has few significant bits, so
  // n * kLn2Hi is exact and x - n ln 2 loses nothing whatever n is.
  static constexpr float kLn2Hi = 0.693145751953125f;
  static constexpr float kLn2Lo = 1.428606765330187e-06f;

  // exp(x) for float lanes, accurate to about 1 ulp on the range the kernels
  // use: arguments <= 0 (logits minus their max or their log-sum-exp) or
  // NaN. There is no upper clamp: above 88 the result is wrong, not inf, and
  // every caller guarantees that cannot happen.
  //
  // exp(x) = 2^n * exp(r) with x = n ln 2 + r (reduce_by_ln2); exp(r) is a
  // degree-6 polynomial fitted for minimal relative error on [-ln2/2, ln2/2]
  // (< 2e-9, below float rounding; one term shorter than the Taylor series
  // of the same accuracy, and the exp is most of the kernels' arithmetic).
  // NaN passes through every step unchanged.
  static FUSED_CE_INLINE Vec exp(Vec x) {
    const LnTwoReduction reduced = reduce_by_ln2(clamp_exp_argument(x));
    const Vec r = reduced.r;
    Vec p = r * 1.383678258e-03f + 8.374798799e-03f;
    p = p * r + 4.166822561e-02f;
    p = p * r + 1.666642038e-01f;
    p = p * r + 4.999999208e-01f;
    p = p * r + 1.000000036e+00f;
    p = p * r + 1.000000001e+00f;
    return times_two_to_n(p, reduced.n, reduced.n_magic);
  }

  // exp(x) on the same arguments for results that will be rounded to
  // kResultBits significant bits (8 for bfloat16, 11 for float16), with
  // fewer operations than exp() (the exp is the larger part of a half-type
  // row's time). Relative error, against exp()'s 1e-7:
  //
  //   kResultBits   polynomial   x in [-16, 0]   down to FLT_MIN
  //        11        degree 5        1.1e-6           4e-6
  //         8        degree 4        4.3e-6          7.2e-6
  //
  // 1/1000 of the spacing of the results or less, so all it can do is move
  // a rare result across a rounding boundary, by one step (more only where
  // a gradient's terms nearly cancel): on N(0, 2) logits with 1000 and 32000
  // classes, 0.02-0.16% of bfloat16 gradient elements (the most with label
  // smoothing) and under 0.002% of float16 ones, against the same logits
  // computed in float32. Log-sum-exp outputs, which stay in float32, move
  // by the same relative amounts.
  //
  // exp(x) = 2^t with t = x log2(e) = n + f, f in [0, 1) or [-1/2, 1/2],
  // 2^f a polynomial fitted for minimal relative error (3.4e-6 and 1.8e-7
  // for the two degrees, evaluated in float) under the constraint that it
  // is exact at f = 0, and for f in [0, 1) at f = 1 too: exp(0) is exactly
  // 1, so a row's largest logit adds exactly 1 to its sum, whose log is
  // then never below 0 (unconstrained, the polynomials' error there gave a
  // certain prediction a loss of 2.6e-6 in bfloat16, -6e-8 in float16,
  // where the exact loss and PyTorch's are 0). The error that grows with
  // |x| is t's rounding, which f inherits absolutely (1e-6 at t = -23).
  template <int kResultBits>
  static FUSED_CE_INLINE Vec exp_for_rounding_to(Vec x) {
    return exp2_for_rounding_to<kResultBits>(x * kLog2e);
  }

  // 2^t, with exp_for_rounding_to's precision: the part of it after t.
  // Callers that subtract a shift from x first can fold the subtraction
  // into t's multiply (see FoldedShiftedExp).
  template <int kResultBits>
  static FUSED_CE_INLINE Vec exp2_for_rounding_to(Vec t) {
    static_assert(kResultBits == 8 || kResultBits == 11, "coefficients for bfloat16 and float16");
#if FUSED_CE_AVX512
    // vreduceps gives f = t - floor(t) in one instruction and vscalefps
    // multiplies by 2^floor(t) itself, so n is never formed. No clamp
    // either: for t = -inf, f is 0 and 2^-inf is 0; NaN stays NaN; results
    // below FLT_MIN come out as the subnormals they are. 6 operations (7
    // for float16) after t, where exp() takes 12.
    const Vec f = Vec(_mm512_reduce_ps(__m512(t), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    Vec p;
    if constexpr (kResultBits == 8) {
      p = f * 1.355574746e-02f + 5.203237012e-02f;
      p = p * f + 2.413797677e-01f;
      p = p * f + 6.930321455e-01f;
      p = p * f + 1.0f;
    } else {
      p = f * 1.879318617e-03f + 8.990994655e-03f;
      p = p * f + 5.581867695e-02f;
      p = p * f + 2.401592731e-01f;
      p = p * f + 6.931517124e-01f;
      p = p * f + 1.0f;
    }
    return Vec(_mm512_scalef_ps(__m512(p), __m512(t)));
#else
    // Clamped below at -127 as clamp_exp_argument does (there in units of
    // ln 2), so that 2^-inf comes out as 0.
    const Vec clamped = max_vec(Vec{} + -127.0f, t);
    const Vec n_magic = clamped + kRoundMagic;
    const Vec n = n_magic - kRoundMagic;
    const Vec f = clamped - n;  // exact: n is the integer nearest to t
    Vec p;
    if constexpr (kResultBits == 8) {
      p = f * 9.582862258e-03f + 5.590646341e-02f;
      p = p * f + 2.402409911e-01f;
      p = p * f + 6.931241751e-01f;
      p = p * f + 1.0f;
    } else {
      p = f * 1.326473663e-03f + 9.671516716e-03f;
      p = p * f + 5.550733581e-02f;
      p = p * f + 2.402224243e-01f;
      p = p * f + 6.931470037e-01f;
      p = p * f + 1.0f;
    }
    return times_two_to_n(p, n, n_magic);
#endif
  }

  // expm1(t) = exp(t) - 1 for t in [0, 20] (tanh_vec's arguments), to a
  // few ulp: 2^n expm1(r) + (2^n - 1) with t = n ln 2 + r (reduce_by_ln2).
  // expm1(r) is its Taylor series to r^7 without the constant term
  // (truncation below 2e-8 relative for |r| <= ln2 / 2), so small t lose
  // nothing to the cancellation of exp(t) - 1; for n >= 1 the two terms
  // have the same sign.
  static FUSED_CE_INLINE Vec expm1_of_nonnegative(Vec t) {
    const LnTwoReduction reduced = reduce_by_ln2(t);
    const Vec r = reduced.r;
    Vec p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
    p = p * r + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    const Vec expm1_r = (r * r) * p + r;
    const Vec two_to_n = times_two_to_n(Vec{} + 1.0f, reduced.n, reduced.n_magic);
    return expm1_r * two_to_n + (two_to_n - 1.0f);
  }

  // Natural log for positive, normal, finite lanes (the kernels take the log
  // of sums of exponentials, which lie in [1, C]); NaN passes through.
  //
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)); with s = (m - 1) / (m + 1),
  // log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| < 0.172, so the
  // series to s^9 is accurate to float precision.
  static FUSED_CE_INLINE Vec log(Vec x) {
    VecI32 bits;
    std::memcpy(&bits, &x, sizeof bits);
    VecI32 exponent = (bits >> 23) - 127;
    const VecI32 mantissa_bits = (bits & 0x007FFFFF) | 0x3F800000;  // m in [1, 2)
    Vec m;
    std::memcpy(&m, &mantissa_bits, sizeof m);
    const VecI32 above_sqrt2 = m > 1.41421356f;  // lanes of -1 where true
    m = above_sqrt2 ? m * 0.5f : m;
    exponent -= above_sqrt2;
    const Vec s = (m - 1.0f) / (m + 1.0f);
    const Vec s2 = s * s;
    Vec series = s2 * (1.0f / 9.0f) + (1.0f / 7.0f);
    series = series * s2 + (1.0f / 5.0f);
    series = series * s2 + (1.0f / 3.0f);
    series = series * s2 + 1.0f;
    const Vec e = __builtin_convertvector(exponent, Vec);
    const Vec result = e * kLn2Hi + (e * kLn2Lo + 2.0f * s * series);
    return x != x ? x : result;
  }

 private:
  static constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer

  // x = n ln 2 + r with n = round(x / ln 2) and r in [-ln2/2, ln2/2], exact
  // (see kLn2Hi); n_magic = n + kRoundMagic, which times_two_to_n takes too.
  struct LnTwoReduction {
    Vec r, n, n_magic;
  };
  static FUSED_CE_INLINE LnTwoReduction reduce_by_ln2(Vec x) {
    LnTwoReduction out;
    out.n_magic = x * kLog2e + kRoundMagic;
    out.n = out.n_magic - kRoundMagic;
    out.r = x - out.n * kLn2Hi;
    out.r = out.r - out.n * kLn2Lo;
    return out;
  }

  // The exp argument clamped below (a max, whose NaN operand wins when it is
  // the second), so that -inf, whose softmax must be exactly 0, still gives
  // a finite reduced argument, and the power of two comes out as 0.
  static FUSED_CE_INLINE Vec clamp_exp_argument(Vec x) {
#if FUSED_CE_AVX512
    // -160 ln 2: scalef's 2^-160 takes any p < 2 exactly to 0, and the
    // results from there up to FLT_MIN come out as the subnormals they are.
    // (GCC makes a compare and a blend of max_vec here, not one vmaxps.)
    return Vec(_mm512_max_ps(__m512(Vec{} + -110.9035489f), __m512(x)));
#else
    // -127 ln 2: 2^n assembled with n = -127 has an exponent field, and so a
    // value, of exactly 0; everything whose exp is below about FLT_MIN / 1.4
    // comes out as 0 without a final select.
    return max_vec(Vec{} + -88.02969193f, x);
#endif
  }

  // p * 2^n for integral n, given also n_magic = n + kRoundMagic.
  static FUSED_CE_INLINE Vec times_two_to_n(Vec p, Vec n, Vec n_magic) {
#if FUSED_CE_AVX512
    (void)n_magic;
    return Vec(_mm512_scalef_ps(__m512(p), __m512(n)));
#else
    // 2^n assembled directly in the exponent field: the bits of n_magic are
    // those of kRoundMagic (whose low 9 bits are 0) plus n, so shifting them
    // left by 23 leaves n << 23 in two's complement. For NaN lanes that is
    // garbage, but p is NaN and so is the product.
    (void)n;
    typedef uint32_t Bits __attribute__((vector_size(kVectorBytes)));  // wraps, no UB
    Bits exponent;
    std::memcpy(&exponent, &n_magic, sizeof exponent);
    exponent = (exponent << 23) + (127u << 23);
    Vec two_to_n;
    std::memcpy(&two_to_n, &exponent, sizeof two_to_n);
    return p * two_to_n;
#endif
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

  static FUSED_CE_INLINE Vec log(Vec x) {
    for (int i = 0; i < kLanes; ++i) x[i] = std::log(x[i]);
    return x;
  }
};

// tanh for the logit softcap, accurate to a few ulp in either precision.
//
// Away from 0, tanh|u| = (1 - e) / (1 + e) with e = exp(-2|u|), which
// saturates cleanly to 1 (also for |u| = inf). Near 0 that difference
// cancels, so |u| < 1/8 uses the odd Taylor series to u^15 instead (the
// first omitted term is below 1e-17 relative there). NaN passes through.
template <typename Acc>
FUSED_CE_INLINE typename Simd<Acc>::Vec tanh_vec(typename Simd<Acc>::Vec u) {
  using Vec = typename Simd<Acc>::Vec;
  const Vec magnitude = u < Acc(0) ? -u : u;
  const Vec e = Simd<Acc>::exp(Acc(-2) * magnitude);
  const Vec saturating = (Acc(1) - e) / (Acc(1) + e);
  const Vec u2 = u * u;
  Vec series = u2 * Acc(-929569.0 / 638512875.0) + Acc(21844.0 / 6081075.0);
  series = series * u2 + Acc(-1382.0 / 155925.0);
  series = series * u2 + Acc(62.0 / 2835.0);
  series = series * u2 + Acc(-17.0 / 315.0);
  series = series * u2 + Acc(2.0 / 15.0);
  series = series * u2 + Acc(-1.0 / 3.0);
  series = series * u2 + Acc(1);
  const Vec near_zero = u * series;
  const Vec away = u < Acc(0) ? -saturating : saturating;
  return magnitude < Acc(0.125) ? near_zero : away;
}

// float: tanh|u| = m / (m + 2) with m = expm1(2|u|), a single formula for
// every |u| (expm1 does not cancel near 0) and a third fewer operations
// than the two above. |u| is clamped at 10, past which tanh rounds to 1.
template <>
FUSED_CE_INLINE VecF tanh_vec<float>(VecF u) {
  // |u| and, at the end, u's sign bit back on the result (tanh(-0) is -0),
  // as bit operations.
  VecI32 u_bits;
  std::memcpy(&u_bits, &u, sizeof u_bits);
  const VecI32 magnitude_bits = u_bits & INT32_MAX;
  VecF magnitude;
  std::memcpy(&magnitude, &magnitude_bits, sizeof magnitude);
  const VecF m = Simd<float>::expm1_of_nonnegative(2.0f * (magnitude < 10.0f ? magnitude : VecF{} + 10.0f));
  const VecF t = m / (m + 2.0f);
  VecI32 t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  t_bits |= u_bits & INT32_MIN;
  VecF signed_t;
  std::memcpy(&signed_t, &t_bits, sizeof signed_t);
  return u != u ? u : signed_t;  // NaN passes through
}

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

template <typename Scalar>
FUSED_CE_INLINE Scalar max_scalar(Scalar a, Scalar b) {
  return a > b ? a : b;
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

// Transposes the square matrix whose rows are the vectors m[0, lanes):
// afterwards m[j][i] holds what m[i][j] held. The tile kernel uses it to
// turn `lanes` rows of a row-major (N, C) tensor into class-major vectors and
// back, with whole-vector loads and stores instead of one scalar per element.
//
// One butterfly stage per bit h of the lane index: rows i and i + h (bit h
// of i clear) exchange the elements whose column has bit h set with those of
// the partner whose column has it clear. That swaps bit h of every element's
// row and column; after all stages row and column are swapped. Each stage is
// two two-input shuffles per row pair (unpack / shufps / vperm2f128 class).

namespace detail {
template <typename Mask, int kLanes, int kBit, bool kUpper, int... P>
constexpr Mask butterfly_mask(std::integer_sequence<int, P...>) {
  // Indices into the concatenation (a, b): lanes < kLanes are a's.
  return Mask{(P & kBit) == 0 ? P + (kUpper ? kBit : 0) : kLanes + P - (kUpper ? 0 : kBit)...};
}

template <typename Vec, int kBit>
FUSED_CE_INLINE void transpose_stage(Vec* m) {
  constexpr int kLanes = int(sizeof(Vec) / sizeof(m[0][0]));
  using Mask = int_lanes_t<Vec>;
  constexpr Mask lower = butterfly_mask<Mask, kLanes, kBit, false>(std::make_integer_sequence<int, kLanes>{});
  constexpr Mask upper = butterfly_mask<Mask, kLanes, kBit, true>(std::make_integer_sequence<int, kLanes>{});
  for (int i = 0; i < kLanes; ++i) {
    if (i & kBit) continue;
    const Vec a = m[i], b = m[i + kBit];
    m[i] = __builtin_shuffle(a, b, lower);
    m[i + kBit] = __builtin_shuffle(a, b, upper);
  }
  if constexpr (kBit > 1) transpose_stage<Vec, kBit / 2>(m);
}
}  // namespace detail

template <typename Vec>
FUSED_CE_INLINE void transpose_square(Vec* m) {
  constexpr int kLanes = int(sizeof(Vec) / sizeof(m[0][0]));
  detail::transpose_stage<Vec, kLanes / 2>(m);
}

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
