// Fused log-softmax + NLL kernels for the CPU: forward, forward with the
// gradient, and backward, for class-index and probability targets.
//
// Two loop structures share one set of formulas (DESIGN.md section 2):
//
//  * RowKernel: the class axis is contiguous and long (language models,
//    ImageNet classifiers). One position at a time, vectorised along the
//    classes. The row stays in L1/L2 between its passes, so memory sees one
//    read of the logits and, with a gradient, one write.
//  * TileKernel: everything else (few classes, class-strided (N, C, d...)
//    layouts, probability targets). One position per SIMD lane: a tile of
//    positions is gathered into a class-major buffer and the classes are
//    walked with the positions side by side in the vector lanes.
//
// Included by one translation unit per vector width (simd.h's
// kVectorBytes): cross_entropy_kernel.cpp (32 bytes: the baseline and AVX2
// entry points) and cross_entropy_kernel_avx512.cpp (64 bytes). Everything
// here has internal linkage, so the widths never meet, and is inlined into
// those entry points (kernel_entry_points.h), which carry the instruction
// set as a target attribute.
#pragma once

#include "cross_entropy_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include "simd.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fused_ce {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// Conversions between storage and accumulate types.

FUSED_CE_INLINE float to_acc(float v) { return v; }
FUSED_CE_INLINE double to_acc(double v) { return v; }
FUSED_CE_INLINE float to_acc(BFloat16Bits v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
FUSED_CE_INLINE float to_acc(Float16Bits v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof h);
  return float(h);
}

template <typename T>
FUSED_CE_INLINE T from_acc(acc_t<T> v) {
  return T(v);
}
template <>
FUSED_CE_INLINE BFloat16Bits from_acc<BFloat16Bits>(float v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if (v != v) return BFloat16Bits{0x7FC0};
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return BFloat16Bits{uint16_t(bits >> 16)};
}
template <>
FUSED_CE_INLINE Float16Bits from_acc<Float16Bits>(float v) {
  const _Float16 h = _Float16(v);
  Float16Bits out;
  std::memcpy(&out.bits, &h, sizeof h);
  return out;
}

// Vectorised conversion of contiguous rows between the half types and
// float32 (a scalar loop with the NaN test of from_acc does not vectorise,
// and at one element per several cycles it would dominate a bfloat16 row).
typedef uint16_t VecU16 __attribute__((vector_size(kVectorBytes / 2)));
typedef uint32_t VecU32 __attribute__((vector_size(kVectorBytes)));
typedef _Float16 VecF16 __attribute__((vector_size(kVectorBytes / 2)));
constexpr int kConvertLanes = kVectorBytes / sizeof(float);

#if FUSED_CE_VECTOR_BYTES == 32
// The same 32 bytes as 16 bfloat16-sized lanes, and as 4 quadwords.
typedef uint16_t VecU16x16 __attribute__((vector_size(kVectorBytes)));
typedef uint64_t VecU64 __attribute__((vector_size(kVectorBytes)));
#define FUSED_CE_SHUFFLE_CONVERSIONS 1
#else
// AVX-512 extends and narrows a whole register in one instruction.
#define FUSED_CE_SHUFFLE_CONVERSIONS 0
#endif

// A bfloat16 is the upper half of a float32: interleaving zeros below the
// values is the whole conversion. For 8 values, written as one shuffle, it
// compiles to two instructions on AVX2 (a quadword permute and an unpack),
// where the zero-extend-and-shift form became five (GCC splits the 256-bit
// extend); for 16 (AVX-512) GCC splits it too, hence the intrinsics there.
FUSED_CE_INLINE VecF widen(VecU16 bfloat16_bits) {
  VecF out;
#if FUSED_CE_AVX512
  // vpmovzxwd + vpslld; the generic form below becomes six instructions.
  out = VecF(_mm512_slli_epi32(_mm512_cvtepu16_epi32(__m256i(bfloat16_bits)), 16));
#elif FUSED_CE_SHUFFLE_CONVERSIONS && defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  const VecU16x16 wide = __builtin_shufflevector(bfloat16_bits, VecU16{}, 8, 0, 8, 1, 8, 2, 8, 3, 8,
                                                 4, 8, 5, 8, 6, 8, 7);
  std::memcpy(&out, &wide, sizeof out);
#else
  const VecU32 bits = __builtin_convertvector(bfloat16_bits, VecU32) << 16;
  std::memcpy(&out, &bits, sizeof out);
#endif
  return out;
}
FUSED_CE_INLINE VecF widen(VecF16 halves) { return __builtin_convertvector(halves, VecF); }

// Rounds to nearest even in the upper half of each float32 lane and keeps
// those halves. NaN becomes the quiet NaN 0x7FC0 (rounding could carry a
// NaN's payload into the sign). On AVX2 the halves are gathered with an
// in-lane byte shuffle and a quadword permute: 9 instructions per 8 values,
// where shifting down and narrowing with saturation took 14. AVX-512 has a
// truncating narrow (vpmovdw).
FUSED_CE_INLINE void narrow(VecF v, VecU16* bfloat16_bits) {
#if FUSED_CE_AVX512 && FUSED_CE_AVX512_BF16
  // One instruction for all of it (vcvtneps2bf16), with two differences
  // from c10's rounding: NaN keeps its sign and payload (still a quiet NaN),
  // and values below FLT_MIN in magnitude become zero instead of bfloat16
  // subnormals, an absolute difference below 1.2e-38.
  *bfloat16_bits = VecU16(_mm512_cvtneps_pbh(__m512(v)));
#else
  VecU32 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const VecU32 nan = VecU32{} + 0x7FC00000u;
  const VecU32 rounded = v != v ? nan : bits + 0x7FFFu + ((bits >> 16) & 1u);
#if FUSED_CE_AVX512
  // The truncating narrow, vpmovdw (the generic conversion becomes a
  // two-register permute).
  *bfloat16_bits = VecU16(_mm512_cvtepi32_epi16(__m512i(rounded >> 16)));
#elif !FUSED_CE_SHUFFLE_CONVERSIONS
  *bfloat16_bits = __builtin_convertvector(rounded >> 16, VecU16);
#else
  VecU16x16 halves;
  std::memcpy(&halves, &rounded, sizeof halves);
  // Each 128-bit lane's upper halves to its low 8 bytes, then quadwords 0, 2.
  halves = __builtin_shuffle(halves, VecU16x16{1, 3, 5, 7, 1, 3, 5, 7, 9, 11, 13, 15, 9, 11, 13, 15});
  VecU64 quads;
  std::memcpy(&quads, &halves, sizeof quads);
  quads = __builtin_shuffle(quads, VecU64{0, 2, 0, 2});
  std::memcpy(bfloat16_bits, &quads, sizeof *bfloat16_bits);
#endif
#endif  // FUSED_CE_AVX512_BF16
}
FUSED_CE_INLINE void narrow(VecF v, VecF16* halves) { *halves = __builtin_convertvector(v, VecF16); }

template <typename T>
struct PackedHalf;  // the vector of half-type lanes matching a VecF
template <>
struct PackedHalf<BFloat16Bits> {
  using type = VecU16;
};
template <>
struct PackedHalf<Float16Bits> {
  using type = VecF16;
};

// One vector of the accumulate type from consecutive elements of storage
// type T: a plain load for float32 and float64, widened for the half types.
// The passes over a row read the input through this, so half rows need no
// float32 copy in scratch (its write and reread were a third of a bfloat16
// row's cache traffic).
template <typename Vec, typename T>
FUSED_CE_INLINE Vec load_widened(const T* p) {
  if constexpr (std::is_same<T, acc_t<T>>::value) {
    return load_vec<Vec>(p);
  } else {
    return widen(load_vec<typename PackedHalf<T>::type>(p));
  }
}

// The inverse of load_widened: stores one vector as storage type T.
template <typename T, typename Vec>
FUSED_CE_INLINE void store_narrowed(T* p, Vec v) {
  if constexpr (std::is_same<T, acc_t<T>>::value) {
    store_vec(p, v);
  } else {
    typename PackedHalf<T>::type packed;
    narrow(v, &packed);
    store_vec(p, packed);
  }
}

#if FUSED_CE_AVX512
// The lanes of p selected by `mask` as one vector (of the accumulate type),
// `fill` in the others, and the inverse store. AVX-512's masked moves touch
// no memory in the masked-off lanes and never fault there, so the short
// ends of rows, even at the very end of a tensor, are read and written in
// place and at vector speed.
template <typename Vec, typename T>
FUSED_CE_INLINE Vec load_widened_masked(const T* p, uint32_t mask, acc_t<T> fill) {
  if constexpr (std::is_same<T, double>::value) {
    return Vec(_mm512_mask_loadu_pd(_mm512_set1_pd(fill), __mmask8(mask), p));
  } else if constexpr (std::is_same<T, float>::value) {
    return Vec(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), __mmask16(mask), p));
  } else {
    using Packed = typename PackedHalf<T>::type;
    const Vec widened = widen(Packed(_mm256_maskz_loadu_epi16(__mmask16(mask), p)));
    return Vec(_mm512_mask_mov_ps(_mm512_set1_ps(fill), __mmask16(mask), __m512(widened)));
  }
}

template <typename T, typename Vec>
FUSED_CE_INLINE void store_narrowed_masked(T* p, Vec v, uint32_t mask) {
  if constexpr (std::is_same<T, double>::value) {
    _mm512_mask_storeu_pd(p, __mmask8(mask), __m512d(v));
  } else if constexpr (std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, __mmask16(mask), __m512(v));
  } else {
    typename PackedHalf<T>::type packed;
    narrow(v, &packed);
    _mm256_mask_storeu_epi16(p, __mmask16(mask), __m256i(packed));
  }
}

// The mask of lanes [0, count).
FUSED_CE_INLINE uint32_t first_lanes(int64_t count) { return (uint32_t(1) << count) - 1; }
#endif

// Copies kBytes (16, 32 or 64) from src to dst, a kBytes-aligned address,
// with non-temporal stores. The gradient is written once and not read again
// by this kernel: streaming it past the cache saves the read-for-ownership
// of every destination line, a third of the memory traffic of forward +
// backward. The 32-byte build writes 16-byte pieces, which every x86-64
// target has; callers must fence (finish_streaming) before the data is used.
template <int kBytes>
FUSED_CE_INLINE void stream_bytes(void* dst, const void* src) {
  static_assert(kBytes % 16 == 0, "whole 16-byte stores");
#if FUSED_CE_AVX512
  if constexpr (kBytes == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), load_vec<__m512i>(src));
    return;
  } else if constexpr (kBytes == 32) {
    _mm256_stream_si256(static_cast<__m256i*>(dst), load_vec<__m256i>(src));
    return;
  }
#endif
  for (int i = 0; i < kBytes / 16; ++i) {
#if defined(__x86_64__)
    _mm_stream_si128(static_cast<__m128i*>(dst) + i,
                     load_vec<__m128i>(static_cast<const char*>(src) + 16 * i));
#else
    std::memcpy(static_cast<char*>(dst) + 16 * i, static_cast<const char*>(src) + 16 * i, 16);
#endif
  }
}

// The bytes of one VecF in storage type T: the alignment stream_vec needs.
template <typename T>
constexpr int kStreamBytes = kConvertLanes * int(sizeof(T));

// Streams one VecF to dst (kStreamBytes<T>-aligned) as storage type T.
template <typename T>
FUSED_CE_INLINE void stream_vec(T* dst, VecF v) {
  if constexpr (std::is_same<T, float>::value) {
    stream_bytes<sizeof v>(dst, &v);
  } else {
    typename PackedHalf<T>::type packed;
    narrow(v, &packed);
    stream_bytes<sizeof packed>(dst, &packed);
  }
}

FUSED_CE_INLINE void finish_streaming() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// The last step of a row's gradient, from the row's exp(x - max) in scratch:
//   grad_c = scale * e_c - coef_w * w_c   (w_c = 1 without weights)
// and the target class additionally loses target_delta. The default is the
// identity, for rows whose gradient is already complete in scratch.
template <typename Acc>
struct GradientFinish {
  using Vec = typename Simd<Acc>::Vec;
  static constexpr int kLanes = Simd<Acc>::kLanes;

  Acc scale = 1, coef_w = 0, target_delta = 0;
  const Acc* weight = nullptr;  // nullptr: all ones
  int64_t target = -1;          // -1: none
  // A softcapped row's capped logits y (nullptr: not capped): the gradient
  // is then multiplied by 1 - (y / softcap)^2, the chain rule through
  // softcap * tanh(x / softcap).
  const Acc* capped = nullptr;
  Acc inv_cap = 0;

  // Elements [c, c + kLanes) of the gradient. kCapped (capped != nullptr)
  // is a template argument so that the loops over a row test it once, not
  // per vector: as a branch inside vec() it made 1000-class float32 rows
  // 8-19% slower.
  template <bool kCapped>
  FUSED_CE_INLINE Vec vec(const Acc* e, int64_t c) const {
    const Vec w = weight ? load_vec<Vec>(weight + c) : Vec{} + Acc(1);
    Vec v = scale * load_vec<Vec>(e + c) - coef_w * w;
    const int64_t lane = target - c;
    if (uint64_t(lane) < uint64_t(kLanes)) {
      // A lane select, not v[lane]: indexing a vector by a variable makes
      // GCC keep v in memory on every iteration, not only on this one.
      using Lanes = int_lanes_t<Vec>;
      using LaneIndex = typename std::remove_reference<decltype(Lanes{}[0])>::type;
      Lanes ids;
      for (int i = 0; i < kLanes; ++i) ids[i] = i;
      v -= ids == LaneIndex(lane) ? Vec{} + target_delta : Vec{};
    }
    if constexpr (kCapped) {
      const Vec t = load_vec<Vec>(capped + c) * inv_cap;
      v *= Acc(1) - t * t;
    }
    return v;
  }

  // The same value as a lane of vec(), whatever the context it is inlined
  // into: vec() compiles to one fused multiply-subtract where there is FMA,
  // and an unfused scalar expression may or may not be contracted at each
  // call site, so the head of a row (written before the first aligned
  // vector) came out one rounding apart depending on which rows a thread
  // was given.
  template <bool kCapped>
  FUSED_CE_INLINE Acc scalar(const Acc* e, int64_t c) const {
    Acc v = std::fma(scale, e[c], -(coef_w * (weight ? weight[c] : Acc(1))));
    if (c == target) v -= target_delta;
    if constexpr (kCapped) {
      const Acc t = capped[c] * inv_cap;
      v *= std::fma(-t, t, Acc(1));  // as vec() computes it
    }
    return v;
  }

  // e[0, C) becomes the gradient, for rows stored other than by PendingRow.
  FUSED_CE_INLINE void apply_in_place(Acc* e, int64_t C) const {
    if (capped) {
      apply_in_place<true>(e, C);
    } else {
      apply_in_place<false>(e, C);
    }
  }

 private:
  template <bool kCapped>
  FUSED_CE_INLINE void apply_in_place(Acc* e, int64_t C) const {
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) store_vec(e + c, vec<kCapped>(e, c));
    for (; c < C; ++c) e[c] = scalar<kCapped>(e, c);
  }
};

// A gradient row waiting to be finished (GradientFinish) and streamed out of
// cache-resident scratch, written a chunk at a time by advance() so that the
// stores can be spread over the next row's compute-bound exp pass instead of
// leaving the core idle while the memory bus drains them (see RowKernel).
// Finishing on the way out saves a pass over the row in scratch.
template <typename T>
class PendingRow {
 public:
  void start(const float* src, int64_t count, T* dst, const GradientFinish<float>& finish) {
    src_ = src;
    dst_ = dst;
    count_ = count;
    finish_ = finish;
    // The first chunk also takes the elements up to a vector-aligned
    // address in dst, so that every later chunk of whole vectors is aligned.
    done_ = 0;
    head_ = 0;
    while (head_ < count_ && !aligned(dst_ + head_)) ++head_;
  }

  // Streams the next `chunk` elements (fewer at the end of the row).
  FUSED_CE_INLINE void advance(int64_t chunk) {
    if (done_ >= count_) return;
    int64_t end = (done_ == 0 ? head_ : done_) + chunk;
    if (end > count_) end = count_;
    write(done_, end);
    done_ = end;
  }

  FUSED_CE_INLINE void finish() {
    if (done_ < count_) write(done_, count_);
    done_ = count_;
  }

 private:
  static bool aligned(const T* p) {
    return reinterpret_cast<uintptr_t>(p) % kStreamBytes<T> == 0;
  }

  // Elements [begin, end); dst + begin is aligned unless begin = 0.
  FUSED_CE_INLINE void write(int64_t begin, int64_t end) {
    if (finish_.capped) {
      write<true>(begin, end);
    } else {
      write<false>(begin, end);
    }
  }

  template <bool kCapped>
  FUSED_CE_INLINE void write(int64_t begin, int64_t end) {
    int64_t c = begin;
    for (; c < end && !aligned(dst_ + c); ++c) {
      dst_[c] = from_acc<T>(finish_.template scalar<kCapped>(src_, c));
    }
    for (; c + kConvertLanes <= end; c += kConvertLanes) {
      stream_vec(dst_ + c, finish_.template vec<kCapped>(src_, c));
    }
    for (; c < end; ++c) dst_[c] = from_acc<T>(finish_.template scalar<kCapped>(src_, c));
  }

  const float* src_ = nullptr;
  T* dst_ = nullptr;
  int64_t count_ = 0, done_ = 0, head_ = 0;
  GradientFinish<float> finish_;
};

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

// The shifted exp that a row of storage type T uses.
template <typename T>
using ShiftedExp = typename std::conditional<kIsHalf<T>, FoldedShiftedExp<T>, PlainShiftedExp<T>>::type;

// ---------------------------------------------------------------------------
// Helpers for contiguous rows, read in the storage type, computed in the
// accumulate type.

// Loads `count` (< lanes) elements from p (converted from storage type T)
// as one vector; the other lanes hold `fill`.
template <typename Vec, typename T, typename Acc>
FUSED_CE_INLINE Vec load_partial(const T* p, int64_t count, Acc fill) {
#if FUSED_CE_AVX512
  return load_widened_masked<Vec>(p, first_lanes(count), fill);
#else
  constexpr int kLanes = sizeof(Vec) / sizeof(Acc);
  Acc tmp[kLanes];
  for (int i = 0; i < kLanes; ++i) tmp[i] = i < count ? to_acc(p[i]) : fill;
  return load_vec<Vec>(tmp);
#endif
}

template <typename Vec, typename Acc>
FUSED_CE_INLINE void store_partial(Acc* p, Vec v, int64_t count) {
#if FUSED_CE_AVX512
  store_narrowed_masked(p, v, first_lanes(count));
#else
  for (int64_t i = 0; i < count; ++i) p[i] = v[i];
#endif
}

// A heap array of T starting on a cache line, so that whole-vector loads
// and stores at multiples of the vector width from its start never straddle
// two lines. (std::vector's allocations are 16-byte aligned, and it loses
// the alignment of over-aligned vector typedefs used through templates.)
template <typename T>
class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 64;

  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  // Discards the contents.
  void resize(int64_t count) {
    std::free(data_);
    data_ = nullptr;
    // aligned_alloc wants a multiple of the alignment.
    bytes_ = (size_t(count) * sizeof(T) + kAlignment - 1) / kAlignment * kAlignment;
    if (bytes_ == 0) return;
    data_ = static_cast<T*>(std::aligned_alloc(kAlignment, bytes_));
    if (!data_) throw std::bad_alloc();
  }
  void set_to_zero() { std::memset(static_cast<void*>(data_), 0, bytes_); }
  T* data() const { return data_; }

 private:
  T* data_ = nullptr;
  size_t bytes_ = 0;
};

// Row reductions, unrolled over independent accumulators so that the loop
// is limited by loads and arithmetic rather than by one dependency chain.
constexpr int kUnroll = 4;

template <typename Acc, typename T>
FUSED_CE_INLINE Acc max_of_row(const T* x, int64_t C) {
  using Vec = typename Simd<Acc>::Vec;
  constexpr int kLanes = Simd<Acc>::kLanes;
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  Vec m[kUnroll];
  for (int u = 0; u < kUnroll; ++u) m[u] = Vec{} + minus_infinity;
  int64_t c = 0;
  for (; c + kUnroll * kLanes <= C; c += kUnroll * kLanes) {
    for (int u = 0; u < kUnroll; ++u) m[u] = max_vec(m[u], load_widened<Vec>(x + c + u * kLanes));
  }
  for (; c + kLanes <= C; c += kLanes) m[0] = max_vec(m[0], load_widened<Vec>(x + c));
#if FUSED_CE_AVX512
  // The tail as one masked vector, not element by element.
  if (c < C) m[1] = max_vec(m[1], load_partial<Vec>(x + c, C - c, minus_infinity));
  return reduce_max<Acc>(max_vec(max_vec(m[0], m[1]), max_vec(m[2], m[3])));
#else
  Acc result = reduce_max<Acc>(max_vec(max_vec(m[0], m[1]), max_vec(m[2], m[3])));
  for (; c < C; ++c) result = max_scalar(result, to_acc(x[c]));
  return result;
#endif
}

// sum_c w_c (x_c - shift) (w_c = 1 without weights).
template <bool kHasWeight, typename Acc, typename T>
FUSED_CE_INLINE Acc weighted_sum_of_row(const T* x, const Acc* w, int64_t C, Acc shift) {
  using Vec = typename Simd<Acc>::Vec;
  constexpr int kLanes = Simd<Acc>::kLanes;
  Vec s[kUnroll] = {};
  int64_t c = 0;
  for (; c + kUnroll * kLanes <= C; c += kUnroll * kLanes) {
    for (int u = 0; u < kUnroll; ++u) {
      const Vec v = load_widened<Vec>(x + c + u * kLanes) - shift;
      s[u] += kHasWeight ? v * load_vec<Vec>(w + c + u * kLanes) : v;
    }
  }
  for (; c + kLanes <= C; c += kLanes) {
    const Vec v = load_widened<Vec>(x + c) - shift;
    s[0] += kHasWeight ? v * load_vec<Vec>(w + c) : v;
  }
  Acc result = reduce_sum<Acc>((s[0] + s[1]) + (s[2] + s[3]));
  for (; c < C; ++c) result += kHasWeight ? (to_acc(x[c]) - shift) * w[c] : to_acc(x[c]) - shift;
  return result;
}

// sum_c exp(x_c - shift), optionally storing each exp into keep[c], with
// exp(x - shift) given by shifted_exp (PlainShiftedExp, FoldedShiftedExp).
//
// This is the compute-heavy pass, and it runs on a row already in cache, so
// it also keeps the memory bus busy meanwhile: it prefetches the next row
// (prefetch_row, `row_bytes` long; nullptr for none), and before each chunk
// of kChunk elements it calls store_step(kChunk), which streams out that
// many elements of the previous row's gradient. Otherwise the bus idles
// here, the next row's first pass waits on DRAM and the gradient's stores
// wait on the bus alone.
template <bool kKeep, typename Acc, typename T, typename ShiftedExp, typename StoreStep>
FUSED_CE_INLINE Acc sum_exp_of_row(const T* x, int64_t C, const ShiftedExp& shifted_exp, Acc* keep,
                                   const char* prefetch_row, int64_t row_bytes,
                                   StoreStep&& store_step) {
  using Vec = typename Simd<Acc>::Vec;
  constexpr int kLanes = Simd<Acc>::kLanes;
  constexpr int64_t kCacheLine = 64;
  // Two exps per iteration already give the out-of-order core enough
  // independent work; four made the exp's constants spill out of the 16
  // AVX2 registers, and the reloads cost more than the unrolling gained.
  constexpr int64_t kStep = 2 * kLanes;
  // Gradient stores go out in chunks of 2 KiB of float32 scratch:
  // storing a line per iteration measured slower than not interleaving at
  // all (the DRAM keeps turning the bus around between reads and writes),
  // chunks of 1-4 KiB about 8% faster. The stores sit in a loop of their
  // own around the exp loop: inside it, their many live values made the
  // compiler keep the sums on the stack, a store-to-load round trip per
  // iteration (bfloat16 rows 10% slower).
  constexpr int64_t kChunk = 2048 / sizeof(Acc);
  static_assert(kChunk % kStep == 0, "whole iterations per chunk");
  // The next row, as many lines per iteration as kStep accumulate-type
  // values fill: an iteration reads kStep elements of this row, and the
  // storage type is never wider than the accumulate type, so the prefetches
  // stay ahead of the next row's reads and spread evenly over the memory
  // bus's idle time.
  constexpr int kLinesPerStep = int(kStep * sizeof(Acc) / kCacheLine);
  static_assert(kLinesPerStep * kCacheLine == kStep * sizeof(Acc), "whole lines per iteration");
  const char* next_line = prefetch_row;
  const char* const prefetch_end = prefetch_row ? prefetch_row + row_bytes : nullptr;
  const int64_t vectorised_end = C - C % kStep;
  Vec s0 = {}, s1 = {};
  int64_t c = 0;
  for (; c < vectorised_end; c += kChunk) {
    store_step(kChunk);
    const int64_t chunk_end = c + kChunk < vectorised_end ? c + kChunk : vectorised_end;
    for (int64_t i = c; i < chunk_end; i += kStep) {
      if (next_line < prefetch_end) {
        // Into L2 (prefetcht1), not L1: a row does not fit into L1, and
        // there it evicted the lines of this row and of the scratch in use
        // (forward + backward 12-17% faster on Zen 4, float32 and bfloat16).
        for (int l = 0; l < kLinesPerStep; ++l) {
          __builtin_prefetch(next_line + l * kCacheLine, /*rw=*/0, /*locality=*/2);
        }
        next_line += kLinesPerStep * kCacheLine;
      }
      const Vec e0 = shifted_exp(load_widened<Vec>(x + i));
      const Vec e1 = shifted_exp(load_widened<Vec>(x + i + kLanes));
      s0 += e0;
      s1 += e1;
      if (kKeep) {
        store_vec(keep + i, e0);
        store_vec(keep + i + kLanes, e1);
      }
    }
  }
  c = vectorised_end;
  for (; c + kLanes <= C; c += kLanes) {
    const Vec e = shifted_exp(load_widened<Vec>(x + c));
    s0 += e;
    if (kKeep) store_vec(keep + c, e);
  }
  if (c < C) {
    // -inf padding contributes exp(-inf) = 0.
    const Vec e = shifted_exp(load_partial<Vec>(x + c, C - c, -std::numeric_limits<Acc>::infinity()));
    s0 += e;
    if (kKeep) store_partial(keep + c, e, C - c);
  }
  return reduce_sum<Acc>(s0 + s1);
}

// dst[c] = softcap * tanh(src[c] / softcap), in the accumulate type;
// returns the row max of dst (as max_of_row, which it saves a pass of).
template <typename Acc, typename T>
FUSED_CE_INLINE Acc softcap_row(const T* src, int64_t C, Acc softcap, Acc* dst) {
  using Vec = typename Simd<Acc>::Vec;
  constexpr int kLanes = Simd<Acc>::kLanes;
  const Acc inv_cap = Acc(1) / softcap;
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  Vec row_max = Vec{} + minus_infinity;
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) {
    const Vec y = softcap * tanh_vec<Acc>(load_widened<Vec>(src + c) * inv_cap);
    store_vec(dst + c, y);
    row_max = max_vec(row_max, y);
  }
  if (c < C) {
    store_partial(dst + c, softcap * tanh_vec<Acc>(load_partial<Vec>(src + c, C - c, Acc(0)) * inv_cap),
                  C - c);
    row_max = max_vec(row_max, load_partial<Vec>(dst + c, C - c, minus_infinity));
  }
  return reduce_max<Acc>(row_max);
}

// ---------------------------------------------------------------------------
// Row kernel: class stride 1, class-index targets.

template <typename T>
class RowKernel {
  using Acc = acc_t<T>;
  using Vec = typename Simd<Acc>::Vec;
  static constexpr int kLanes = Simd<Acc>::kLanes;

 public:
  explicit RowKernel(const KernelArgs<T>& args) : a_(args) {
    if (a_.softcap != Acc(0)) {
      capped_rows_[0].resize(a_.C);
      capped_rows_[1].resize(a_.C);
    }
    if (a_.grad_input) {
      grad_[0].resize(a_.C);
      grad_[1].resize(a_.C);
    }
  }

  // Writes out the last row's gradient; call after the last run().
  FUSED_CE_INLINE void finish() {
    if constexpr (kDeferStores) pending_.finish();
    finish_streaming();
  }

  // Processes row `pos`; `next_pos` (or -1) is the row that follows, which
  // is prefetched meanwhile.
  FUSED_CE_INLINE void run(int64_t pos, int64_t next_pos) {
    const int64_t n = pos / a_.D, d = pos - n * a_.D;
    const T* row = a_.input + n * a_.input_strides.n + d * a_.input_strides.d;
    if (a_.softcap != Acc(0)) {
      // Every pass reads the capped row, computed once into scratch, with
      // its max. The gradient's chain rule reads it again while the row is
      // streamed out, during the next row: so two rows, like grad_.
      Acc* capped = capped_rows_[current_].data();
      const Acc capped_max = softcap_row(row, a_.C, a_.softcap, capped);
      run_weighted<true>(capped, capped_max, n, d, pos, next_pos);
    } else {
      run_weighted<false>(row, Acc(0), n, d, pos, next_pos);
    }
  }

 private:
  template <bool kCapped, typename X>
  FUSED_CE_INLINE void run_weighted(const X* x, Acc capped_max, int64_t n, int64_t d, int64_t pos,
                                    int64_t next_pos) {
    if (a_.weight) {
      run_row<true, kCapped>(x, capped_max, n, d, pos, next_pos);
    } else {
      run_row<false, kCapped>(x, capped_max, n, d, pos, next_pos);
    }
  }

  // The row x: the input row itself (storage type T), or with kCapped its
  // softcapped version in scratch (accumulate type), whose max softcap_row
  // has taken already (capped_max).
  template <bool kHasWeight, bool kCapped, typename X>
  FUSED_CE_INLINE void run_row(const X* x, Acc capped_max, int64_t n, int64_t d, int64_t pos,
                               int64_t next_pos) {
    const int64_t C = a_.C;
    const int64_t target = a_.class_target[n * a_.class_target_stride_n + d * a_.class_target_stride_d];
    const bool ignored = target == a_.ignore_index;
    const Acc w_target = ignored ? Acc(0) : (kHasWeight ? a_.weight[target] : Acc(1));
    const Acc eps = a_.label_smoothing;
    const Acc eps_per_class = eps / Acc(C);

    T* grad_out = a_.grad_input ? a_.grad_input + n * a_.grad_input_strides.n +
                                      d * a_.grad_input_strides.d
                                : nullptr;
    // The gradient row is assembled in cache-resident scratch and written
    // out once: during the next row's exp pass where it can be streamed
    // (PendingRow), at the end of this row otherwise.
    Acc* grad_row = grad_out ? grad_[current_].data() : nullptr;

    // Pass 1 (memory): the row max. Pass 2 (cache): sum of exp(x - max),
    // keeping the exponentials when the gradient follows so that each
    // element costs one exp in total. Label smoothing adds a pass for
    // sum_c w_c (x_c - max).
    //
    // Everything is expressed relative to the max, never as lse - x: for
    // logits of large magnitude (a constant row of 1000s, 1e30) lse
    // itself has lost the digits the loss consists of.
    const bool need_smoothing = eps != Acc(0) && !ignored;
    const Acc row_max = kCapped ? capped_max : max_of_row<Acc>(x, C);
    const Acc shifted_wx =
        need_smoothing ? weighted_sum_of_row<kHasWeight>(x, a_.weight, C, row_max) : Acc(0);
    Acc* keep = (grad_row && !ignored) ? grad_row : nullptr;
    const char* next_row = nullptr;
    if (next_pos >= 0) {
      const int64_t next_n = next_pos / a_.D, next_d = next_pos - next_n * a_.D;
      next_row = reinterpret_cast<const char*>(a_.input + next_n * a_.input_strides.n +
                                               next_d * a_.input_strides.d);
    }
    const int64_t row_bytes = C * int64_t(sizeof(T));
    auto store_previous_row = [this](int64_t elements) FUSED_CE_INLINE_ATTRIBUTES {
      if constexpr (kDeferStores) pending_.advance(elements);
    };
    // sum (and keep) may carry a factor common to the row: see ShiftedExp.
    const ShiftedExp<X> shifted_exp(row_max);
    const Acc sum = keep ? sum_exp_of_row<true>(x, C, shifted_exp, keep, next_row, row_bytes,
                                                store_previous_row)
                         : sum_exp_of_row<false>(x, C, shifted_exp, keep, next_row, row_bytes,
                                                 store_previous_row);
    if constexpr (kDeferStores) pending_.finish();
    const Acc log_sum = std::log(sum) - shifted_exp.log_bias();
    const Acc lse = row_max + log_sum;
    const Acc inv_sum = Acc(1) / sum;

    Acc loss = 0;
    if (!ignored) {
      // -lp[y] = (max - x_y) + log_sum;  -sum_c w_c lp_c = W log_sum - sum_c w_c (x_c - max)
      loss = (Acc(1) - eps) * w_target * ((row_max - to_acc(x[target])) + log_sum);
      if (need_smoothing) loss += eps_per_class * (a_.weight_sum * log_sum - shifted_wx);
      if (a_.z_loss != Acc(0)) loss += a_.z_loss * w_target * lse * lse;
    }
    if (a_.loss) {
      a_.loss[pos] = loss;
      a_.lse[pos] = lse;
    }
    if (!grad_out) return;

    // The gradient: grad_c = coef_p * p_c - coef_w * w_c, and the target
    // class additionally loses g * (1 - eps) * w_target. An ignored element
    // has zero loss coefficients (even when the mean of an all-ignored batch
    // makes g infinite), yet, as in PyTorch's 0 - p * 0, its gradient is
    // NaN wherever p is. The z-loss adds 2 z w_target lse to coef_p, and an
    // upstream gradient of the lse output adds itself (ignored or not).
    const Acc g = ignored ? Acc(0)
                : a_.grad_loss
                    ? a_.grad_loss[n * a_.grad_loss_stride_n + d * a_.grad_loss_stride_d]
                    : a_.grad_scale;
    const Acc g_lse =
        a_.grad_lse ? a_.grad_lse[n * a_.grad_lse_stride_n + d * a_.grad_lse_stride_d] : Acc(0);
    Acc coef_p = g * ((Acc(1) - eps) * w_target + eps_per_class * a_.weight_sum) + g_lse;
    // Only where the term exists: 0 * lse is NaN for an infinite lse.
    if (a_.z_loss != Acc(0) && !ignored) coef_p += g * Acc(2) * a_.z_loss * w_target * lse;
    const Acc coef_w = g * eps_per_class;

    // Pass 3, usually fused into the streamed store (see PendingRow).
    GradientFinish<Acc> finish;
    finish.coef_w = coef_w;
    finish.weight = kHasWeight ? a_.weight : nullptr;
    if (!ignored) {
      // grad_row holds exp(x - max); p = that / sum.
      finish.scale = coef_p * inv_sum;
      finish.target = target;
      finish.target_delta = g * (Acc(1) - eps) * w_target;
    } else {
      // No exponentials were kept: grad_row = p = exp(x - lse).
      finish.scale = coef_p;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) {
        store_vec(grad_row + c, exp_for<X>(load_widened<Vec>(x + c) - lse));
      }
      if (c < C) {
        // Padding lanes read lse itself: exp(0), never an overflow.
        store_partial(grad_row + c, exp_for<X>(load_partial<Vec>(x + c, C - c, lse) - lse), C - c);
      }
    }
    if constexpr (kCapped) {
      finish.capped = x;
      finish.inv_cap = Acc(1) / a_.softcap;
    }

    if constexpr (kDeferStores) {
      if (a_.grad_input_strides.c == 1) {
        pending_.start(grad_row, C, grad_out, finish);
        current_ ^= 1;
        return;
      }
    }
    finish.apply_in_place(grad_row, C);
    store_gradient_row(grad_row, grad_out);
  }

  // The gradient rows that are not deferred: float64, or a class stride
  // other than 1.
  FUSED_CE_INLINE void store_gradient_row(const Acc* grad_row, T* grad_out) const {
    const int64_t C = a_.C, stride = a_.grad_input_strides.c;
    for (int64_t k = 0; k < C; ++k) grad_out[k * stride] = from_acc<T>(grad_row[k]);
  }

  // Streamed, deferred gradient stores (PendingRow handles float32 scratch).
  static constexpr bool kDeferStores = std::is_same<Acc, float>::value;

  const KernelArgs<T>& a_;
  AlignedBuffer<Acc> capped_rows_[2];  // softcapped rows, in the accumulate type: as grad_
  AlignedBuffer<Acc> grad_[2];     // gradient rows: this one, and the previous one while pending
  int current_ = 0;
  PendingRow<T> pending_;        // the previous row's gradient, from grad_[current_ ^ 1]
};

// ---------------------------------------------------------------------------
// Tile kernel: one position per lane, any strides, either target kind.

template <typename T>
class TileKernel {
  using Acc = acc_t<T>;
  using Vec = typename Simd<Acc>::Vec;
  static constexpr int kLanes = Simd<Acc>::kLanes;
  static_assert(kLanes == tile_positions<T>(kVectorBytes), "a tile is one vector of positions");

 public:
  // Tiles per cache line of the input in the (N, C, H, W) layout: see
  // run_line_group().
  static constexpr int64_t kLineGroup = 64 / (kLanes * int64_t(sizeof(T)));

  explicit TileKernel(const KernelArgs<T>& args) : a_(args) {
    // At least kLanes vectors each: with fewer classes, gather() writes and
    // scatter() transposes a whole square (g_ zeroed for that).
    const int64_t tile_vectors = std::max<int64_t>(a_.C * kLineGroup, kLanes);
    x_.resize(tile_vectors);
    if (a_.prob_target) t_.resize(std::max<int64_t>(a_.C, kLanes));
    if (a_.grad_input || a_.grad_target) {
      g_.resize(tile_vectors);
      g_.set_to_zero();
    }
    line_groups_ = kLineGroup > 1 && !a_.prob_target && a_.input_strides.d == 1 &&
                   (!a_.grad_input || a_.grad_input_strides.d == 1);
    // Position p = n * D + d's target at class_target[p] (a contiguous (N, D) target).
    targets_in_position_order_ =
        a_.class_target != nullptr &&
        (a_.D == 1 ? a_.class_target_stride_n == 1
                   : a_.class_target_stride_d == 1 && a_.class_target_stride_n == a_.D);
  }

  // Runs tiles [begin, end) in order.
  FUSED_CE_INLINE void run_range(int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      if (i + kLineGroup <= end && starts_line_group(i)) {
        run_line_group(i);
        i += kLineGroup;
      } else {
        run(i);
        ++i;
      }
    }
    finish_streaming();  // scatter()'s non-temporal stores (stream_rows)
  }

 private:
  // One tile on its own.
  FUSED_CE_INLINE void run(int64_t tile_index) {
    const int64_t positions = a_.N * a_.D;
    const int64_t first = tile_index * kLanes;
    const int valid = int(positions - first < kLanes ? positions - first : kLanes);
    // Per-lane coordinates. Lanes past the end repeat the last position so
    // that every load stays in bounds; their results are never stored.
    int64_t n[kLanes], d[kLanes];
    locate(first, valid, n, d);
    // A full tile within one n covers kLanes consecutive d: with a unit d
    // stride ((N, C, H, W) layouts) each class is one contiguous vector.
    const bool consecutive = valid == kLanes && n[0] == n[kLanes - 1];
    if (consecutive && a_.input_strides.d == 1) {
      prefetch_ahead(a_.input + n[0] * a_.input_strides.n + d[0]);
    }
    gather(a_.input, a_.input_strides, n, d, consecutive, x_.data());
    compute(first, valid, n, d, consecutive, x_.data(), g_.data(), /*store_grad_input=*/true);
  }

  // In the (N, C, H, W) layout a tile reads one run from each of C class
  // planes: C streams at once, and as many written. Asking for the line
  // kPrefetchBytes further along in every plane made 8 x 21 x 128 x 128
  // float32 forward + gradient 17% faster on Zen 4 (4 to 16 lines ahead
  // measured alike). Into L2: into L1 it gained nothing, as the C lines of
  // a planes' stride that is a multiple of 4 KiB share one L1 set. Past the
  // end of a plane a prefetch is only a wasted hint, never a fault. Not for
  // the half types: half the bytes per element, and bfloat16 measured 7%
  // slower with it (AVX2 float32 6% faster).
  FUSED_CE_INLINE void prefetch_ahead(const T* first) const {
    if constexpr (sizeof(T) < sizeof(float)) return;
    const char* ahead = reinterpret_cast<const char*>(first) + kPrefetchBytes;
    const int64_t plane_bytes = a_.input_strides.c * int64_t(sizeof(T));
    for (int64_t c = 0; c < a_.C; ++c) __builtin_prefetch(ahead + c * plane_bytes, /*rw=*/0, /*locality=*/2);
  }
  static constexpr int64_t kPrefetchBytes = 8 * 64;

  // In the (N, C, H, W) layout the tile's classes are kLanes-long runs D
  // elements apart, and D is usually a power of two (128 x 128 pixels): all
  // C runs then fall into one set of the L1 and L2 caches, more lines than
  // the sets have ways. A tile that uses half a line finds its other half
  // evicted when the next tile comes for it, and its gradient lines are
  // written back half-filled. So whole lines are read and written at once:
  // this runs the kLineGroup tiles of one line-aligned stretch of d
  // (measured 40% faster at D = 16384, and as fast as an odd D).
  FUSED_CE_INLINE bool starts_line_group(int64_t tile_index) {
    if (!line_groups_) return false;
    int64_t n, d;
    locate_first(tile_index * kLanes, &n, &d);
    if (d + kLineGroup * kLanes > a_.D) return false;
    const T* start = a_.input + n * a_.input_strides.n + d;
    return (reinterpret_cast<uintptr_t>(start) & 63) == 0;
  }

  FUSED_CE_INLINE void run_line_group(int64_t tile_index) {
    const int64_t C = a_.C;
    int64_t n[kLineGroup][kLanes], d[kLineGroup][kLanes];
    for (int64_t t = 0; t < kLineGroup; ++t) locate((tile_index + t) * kLanes, kLanes, n[t], d[t]);
    // Tile-major buffers: tile t's classes are x_[t * C, (t + 1) * C).
    const T* in = a_.input + n[0][0] * a_.input_strides.n + d[0][0];
    prefetch_ahead(in);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < kLineGroup; ++t) {
        x_.data()[t * C + c] = load_widened<Vec>(in + c * a_.input_strides.c + t * kLanes);
      }
    }
    for (int64_t t = 0; t < kLineGroup; ++t) {
      compute((tile_index + t) * kLanes, kLanes, n[t], d[t], true, x_.data() + t * C, g_.data() + t * C,
              /*store_grad_input=*/false);
    }
    if (a_.grad_input) {
      T* out = a_.grad_input + n[0][0] * a_.grad_input_strides.n + d[0][0];
      // The group's tiles fill one whole line of every class plane.
      const bool stream = streams_class_lines(out, a_.grad_input_strides);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t t = 0; t < kLineGroup; ++t) {
          store_class_run(out + c * a_.grad_input_strides.c + t * kLanes, g_.data()[t * C + c], stream);
        }
      }
    }
  }

  // Everything after the logits are loaded: X holds the tile (C vectors,
  // overwritten by the softcap), G receives the input gradient, which is
  // scattered to grad_input only when store_grad_input is set.
  FUSED_CE_INLINE void compute(int64_t first, int valid, const int64_t* n, const int64_t* d,
                               bool consecutive, Vec* X, Vec* G, bool store_grad_input) {
    const int64_t C = a_.C;
    const Acc eps = a_.label_smoothing;
    const Acc eps_per_class = eps / Acc(C);
    const bool is_prob = a_.prob_target != nullptr;
    const bool capped = a_.softcap != Acc(0);
    if (capped) {
      const Acc inv_cap = Acc(1) / a_.softcap;
      for (int64_t c = 0; c < C; ++c) X[c] = a_.softcap * tanh_vec<Acc>(X[c] * inv_cap);
    }
    if (is_prob) {
      gather(a_.prob_target, a_.prob_target_strides, n, d, consecutive, t_.data());
      // Smoothed targets t' = (1 - eps) t + eps / C.
      Vec* t = t_.data();
      for (int64_t c = 0; c < C; ++c) t[c] = (Acc(1) - eps) * t[c] + eps_per_class;
    }
    const Vec* Tp = t_.data();

    // Class targets per lane: the class (-1 where ignored, so that it
    // matches no class), its weight (0 where ignored) and a mask of the
    // ignored lanes. Probability targets have none of these.
    IntVec target{}, ignored{};
    Vec w_target{};
    if (!is_prob) load_class_targets(first, valid, n, d, &target, &ignored, &w_target);

    const bool want_grad = a_.grad_input != nullptr || a_.grad_target != nullptr;
    Vec vmax = Vec{} - std::numeric_limits<Acc>::infinity();
    for (int64_t c = 0; c < C; ++c) vmax = max_vec(vmax, X[c]);
    // Sums relative to the max, as in the row kernel: sum_c w_c (x_c - max)
    // for label smoothing, sum_c w_c t'_c (x_c - max) for probabilities, and
    // S_t = sum_c w_c t'_c, which the probability gradient needs too.
    Vec shifted_wx{}, shifted_wtx{}, sum_wt{};
    if (is_prob) {
      for (int64_t c = 0; c < C; ++c) {
        const Vec wt = Tp[c] * weight_at(c);
        sum_wt += wt;
        shifted_wtx += wt * (X[c] - vmax);
      }
    } else if (eps != Acc(0)) {
      for (int64_t c = 0; c < C; ++c) shifted_wx += (X[c] - vmax) * weight_at(c);
    }
    Vec vsum{};
    for (int64_t c = 0; c < C; ++c) {
      const Vec e = exp_for<T>(X[c] - vmax);
      vsum += e;
      if (want_grad) G[c] = e;
    }
    const Vec log_sum = Simd<Acc>::log(vsum);
    const Vec lse = vmax + log_sum;
    // The z-loss of each lane is z_weight * lse^2, z_weight = z w_target, or z
    // for probability targets. Ignored lanes have none, and skip it outright
    // (0 * lse is NaN for an infinite lse).
    const bool has_z_loss = a_.z_loss != Acc(0);
    const Vec z_weight = is_prob ? Vec{} + a_.z_loss : a_.z_loss * w_target;
    if (a_.loss) {
      Vec loss;
      if (is_prob) {
        loss = sum_wt * log_sum - shifted_wtx;
        if (has_z_loss) loss += z_weight * lse * lse;
      } else {
        // Each lane's target logit, selected class by class (a vector
        // compare per class is cheaper than eight scalar lookups).
        Vec picked{};
        for (int64_t c = 0; c < C; ++c) picked = target == IntVec{} + Int(c) ? X[c] : picked;
        loss = (Acc(1) - eps) * w_target * ((vmax - picked) + log_sum);
        if (eps != Acc(0)) loss += eps_per_class * (a_.weight_sum * log_sum - shifted_wx);
        if (has_z_loss) loss += z_weight * lse * lse;
        loss = ignored != 0 ? Vec{} : loss;
      }
      store_positions(a_.loss + first, loss, valid);
      store_positions(a_.lse + first, lse, valid);
    }
    if (!want_grad) return;

    // Ignored lanes get zero coefficients (see RowKernel: NaN where p is).
    // The gradients of the z-loss and of the lse output both multiply p.
    Vec g = Vec{} + a_.grad_scale;
    if (a_.grad_loss) {
      for (int l = 0; l < kLanes; ++l) g[l] = a_.grad_loss[n[l] * a_.grad_loss_stride_n + d[l] * a_.grad_loss_stride_d];
    }
    g = ignored != 0 ? Vec{} : g;
    Vec extra_p{};
    if (has_z_loss) extra_p = ignored != 0 ? Vec{} : g * Acc(2) * z_weight * lse;
    if (a_.grad_lse) {
      for (int l = 0; l < kLanes; ++l) extra_p[l] += a_.grad_lse[n[l] * a_.grad_lse_stride_n + d[l] * a_.grad_lse_stride_d];
    }

    if (a_.grad_input) {
      // G holds exp(x - max); p = that / sum.
      const Vec inv_sum = Acc(1) / vsum;
      if (is_prob) {
        // grad_c = g (S_t p_c - w_c t'_c)
        const Vec coef_p = (g * sum_wt + extra_p) * inv_sum;
        for (int64_t c = 0; c < C; ++c) G[c] = coef_p * G[c] - g * weight_at(c) * Tp[c];
      } else {
        const Vec coef_p =
            (g * ((Acc(1) - eps) * w_target + eps_per_class * a_.weight_sum) + extra_p) * inv_sum;
        const Vec coef_w = g * eps_per_class;
        // The target class additionally loses g (1 - eps) w_target.
        const Vec coef_target = g * (Acc(1) - eps) * w_target;
        for (int64_t c = 0; c < C; ++c) {
          const Vec one_hot = target == IntVec{} + Int(c) ? coef_target : Vec{};
          G[c] = (coef_p * G[c] - coef_w * weight_at(c)) - one_hot;
        }
      }
      if (capped) {
        const Acc inv_cap = Acc(1) / a_.softcap;
        for (int64_t c = 0; c < C; ++c) {
          const Vec t = X[c] * inv_cap;
          G[c] *= Acc(1) - t * t;
        }
      }
      if (store_grad_input) scatter(G, a_.grad_input, a_.grad_input_strides, n, d, valid, consecutive);
    }
    if (a_.grad_target) {
      // d loss / d t_c = -(1 - eps) w_c lp_c g, lp_c = (x_c - max) - log_sum.
      const Vec coef = g * (Acc(1) - eps);
      for (int64_t c = 0; c < C; ++c) G[c] = -coef * weight_at(c) * ((X[c] - vmax) - log_sum);
      scatter(G, a_.grad_target, a_.grad_target_strides, n, d, valid, consecutive);
    }
  }

  using IntVec = int_lanes_t<Vec>;
  using Int = typename std::remove_reference<decltype(IntVec{}[0])>::type;

  FUSED_CE_INLINE Acc weight_at(int64_t c) const { return a_.weight ? a_.weight[c] : Acc(1); }

  // The tile's class targets: per lane the class (-1 where ignored, so that
  // it matches no class), a mask of the ignored lanes and the target's
  // weight (0 where ignored).
  FUSED_CE_INLINE void load_class_targets(int64_t first, int valid, const int64_t* n, const int64_t* d,
                                          IntVec* target, IntVec* ignored, Vec* w_target) const {
    if (valid == kLanes && targets_in_position_order_) {
      // The tile's targets are kLanes consecutive int64s: two vector loads
      // and a compare instead of kLanes scalar loads and branches, which
      // took a tenth of a 10-class row's time.
      int64_lanes_t<Vec> t;
      std::memcpy(&t, a_.class_target + first, sizeof(t));
      *ignored = __builtin_convertvector(t == a_.ignore_index, IntVec);
      // In range once not ignored (validated before the kernels run).
      *target = *ignored != 0 ? IntVec{} - 1 : __builtin_convertvector(t, IntVec);
      if (a_.weight) {
        for (int l = 0; l < kLanes; ++l) (*w_target)[l] = (*ignored)[l] ? Acc(0) : a_.weight[t[l]];
      } else {
        *w_target = *ignored != 0 ? Vec{} : Vec{} + Acc(1);
      }
      return;
    }
    for (int l = 0; l < kLanes; ++l) {
      const int64_t t = a_.class_target[n[l] * a_.class_target_stride_n + d[l] * a_.class_target_stride_d];
      const bool skip = t == a_.ignore_index;
      (*target)[l] = skip ? -1 : t;
      (*ignored)[l] = skip ? -1 : 0;
      (*w_target)[l] = skip ? Acc(0) : (a_.weight ? a_.weight[t] : Acc(1));
    }
  }

  // Sets the coordinates (n, d) of the tile's positions first, first + 1,
  // ...; lanes from `valid` on repeat the last valid position. Consecutive
  // tiles continue from where the previous one stopped: a 64-bit division
  // per tile costs as much as several elements of a small row.
  FUSED_CE_INLINE void locate(int64_t first, int valid, int64_t* n, int64_t* d) {
    int64_t cur_n, cur_d;
    locate_first(first, &cur_n, &cur_d);
    for (int l = 0; l < kLanes; ++l) {
      n[l] = cur_n;
      d[l] = cur_d;
      if (++cur_d == a_.D) {
        cur_d = 0;
        ++cur_n;
      }
    }
    next_first_ = first + kLanes;
    next_n_ = cur_n;
    next_d_ = cur_d;
    for (int l = valid; l < kLanes; ++l) {
      n[l] = n[valid - 1];
      d[l] = d[valid - 1];
    }
  }

  // The coordinates of position `first`, from the cursor when it is there.
  FUSED_CE_INLINE void locate_first(int64_t first, int64_t* n, int64_t* d) const {
    if (first == next_first_) {
      *n = next_n_;
      *d = next_d_;
    } else {
      *n = first / a_.D;
      *d = first - *n * a_.D;
    }
  }

  // p[0, valid) = the first `valid` lanes of v.
  static FUSED_CE_INLINE void store_positions(Acc* p, Vec v, int valid) {
    if (valid == kLanes) {
      store_vec(p, v);
    } else {
      store_partial(p, v, valid);
    }
  }

  // The element offsets of the tile's positions in a tensor with strides s.
  // A full tile of (N, C) rows (D == 1) holds rows n[0], n[0] + 1, ...:
  // their offsets come from n[0] alone. Reading every lane's n and d back
  // from the stack instead stalled on those loads: 10-class rows measured
  // 5% slower.
  FUSED_CE_INLINE void position_offsets(const Strides3& s, const int64_t* n, const int64_t* d,
                                        int64_t* offsets) const {
    if (a_.D == 1 && n[kLanes - 1] - n[0] == kLanes - 1) {
      for (int l = 0; l < kLanes; ++l) offsets[l] = (n[0] + l) * s.n;
    } else {
      for (int l = 0; l < kLanes; ++l) offsets[l] = n[l] * s.n + d[l] * s.d;
    }
  }

  // Loads a (C, lanes) tile in the accumulate type.
  FUSED_CE_INLINE void gather(const T* src, const Strides3& s, const int64_t* n, const int64_t* d,
                              bool consecutive, Vec* dst) const {
    if (consecutive && s.d == 1) {
      const T* first = src + n[0] * s.n + d[0];
      for (int64_t c = 0; c < a_.C; ++c) dst[c] = load_widened<Vec>(first + c * s.c);
      return;
    }
    int64_t base[kLanes];
    position_offsets(s, n, d, base);
    if (s.c == 1 && a_.C >= kLanes) {
      // Row-major (N, C) with few classes: each lane's row is contiguous, so
      // load kLanes x kLanes blocks as whole row vectors and transpose them
      // in registers (one scalar insert per element costs several times
      // more). A last block that does not fit overlaps the one before.
      for (int64_t c0 = 0; c0 < a_.C; c0 += kLanes) {
        const int64_t start = c0 + kLanes <= a_.C ? c0 : a_.C - kLanes;
        Vec block[kLanes];
        for (int l = 0; l < kLanes; ++l) block[l] = load_widened<Vec>(src + base[l] + start);
        transpose_square(block);
        for (int j = 0; j < kLanes; ++j) dst[start + j] = block[j];
      }
      return;
    }
    if (s.c == 1) {
#if FUSED_CE_AVX512
      // Rows shorter than a vector (a 10-class classifier): each lane's row
      // as one masked load (load_partial), then the same transpose. Element
      // by element instead, bfloat16 262144 x 10 forward + backward took
      // 1.5x as long.
      Vec block[kLanes];
      for (int l = 0; l < kLanes; ++l) block[l] = load_partial<Vec>(src + base[l], a_.C, Acc(0));
      transpose_square(block);
      // All kLanes vectors (dst has room, see the constructor): a fixed
      // count compiles to plain stores, where C of them was a call to
      // memcpy that also spilled registers around it.
      for (int c = 0; c < kLanes; ++c) dst[c] = block[c];
#else
      // Rows shorter than a vector: read each lane's row in order.
      for (int l = 0; l < kLanes; ++l) {
        const T* row = src + base[l];
        for (int64_t c = 0; c < a_.C; ++c) dst[c][l] = to_acc(row[c]);
      }
#endif
      return;
    }
    for (int64_t c = 0; c < a_.C; ++c) {
      const T* col = src + c * s.c;
      for (int l = 0; l < kLanes; ++l) dst[c][l] = to_acc(col[base[l]]);
    }
  }

  // Stores the valid lanes of a (C, lanes) tile.
  FUSED_CE_INLINE void scatter(const Vec* tile, T* dst, const Strides3& s, const int64_t* n,
                               const int64_t* d, int valid, bool consecutive) const {
    if (consecutive && s.d == 1) {
      T* first = dst + n[0] * s.n + d[0];
      // Streamed only where each class's run is one whole line (float32
      // under AVX-512); shorter runs are in line groups when aligned.
      const bool stream = kLanes * sizeof(T) == 64 && streams_class_lines(first, s);
      for (int64_t c = 0; c < a_.C; ++c) store_class_run(first + c * s.c, tile[c], stream);
      return;
    }
    int64_t base[kLanes];
    position_offsets(s, n, d, base);
    if (s.c == 1 && (a_.C >= kLanes || kMaskedRowStores)) {
      if (valid == kLanes && stream_packed_rows(dst + base[0], s)) {
        stream_rows(tile, dst + base[0]);
        return;
      }
      store_rows(tile, dst, base, valid);
      return;
    }
    for (int l = 0; l < valid; ++l) {
      T* out = dst + base[l];
      for (int64_t c = 0; c < a_.C; ++c) out[c * s.c] = from_acc<T>(tile[c][l]);
    }
  }

#if FUSED_CE_AVX512
  static constexpr bool kMaskedRowStores = true;
#else
  static constexpr bool kMaskedRowStores = false;
#endif

  // The transpose of gather() for row-major (N, C) rows: lane l's C values
  // of the (C, lanes) tile go to the contiguous row at out + offsets[l],
  // for l < valid, through kLanes x kLanes transposes in registers. Rows of
  // kLanes classes or more take whole squares (a last one that does not fit
  // overlaps the one before, writing equal values); shorter rows (AVX-512
  // only) one square and a masked store per row. The tile has at least
  // kLanes vectors (see the constructor); those past C only fill lanes
  // that the masked stores leave out.
  template <typename Out>
  FUSED_CE_INLINE void store_rows(const Vec* tile, Out* out, const int64_t* offsets, int valid) const {
    if (a_.C >= kLanes) {
      for (int64_t c0 = 0; c0 < a_.C; c0 += kLanes) {
        const int64_t start = c0 + kLanes <= a_.C ? c0 : a_.C - kLanes;
        Vec block[kLanes];
        for (int j = 0; j < kLanes; ++j) block[j] = tile[start + j];
        transpose_square(block);
        for (int l = 0; l < valid; ++l) store_narrowed(out + offsets[l] + start, block[l]);
      }
      return;
    }
#if FUSED_CE_AVX512
    Vec block[kLanes];
    for (int c = 0; c < kLanes; ++c) block[c] = tile[c];
    transpose_square(block);
    const uint32_t row = first_lanes(a_.C);
    for (int l = 0; l < valid; ++l) store_narrowed_masked(out + offsets[l], block[l], row);
#endif
  }

  // Rows up to this long are streamed (stream_rows); its buffer is a
  // kLanes-row tile of them. (N, C) rows of 64 classes and more take the
  // row kernel, unless they have probability targets.
  static constexpr int64_t kMaxStreamedClasses = kRowKernelMinClasses;

  // Whether a full tile of (N, C) rows whose first row starts at `first`
  // can be written by stream_rows(): its kLanes rows are one contiguous
  // run of kLanes * C elements (rows back to back) that covers whole cache
  // lines (every tile's, when the tensor's first is line-aligned and a
  // tile is a whole number of lines). The caller has checked that
  // store_rows() can pack them. Whole lines because a partly streamed line
  // leaves the write-combining buffer on its own and is merged in memory
  // with the rest of the line (bfloat16 tiles of 8 x 10 classes under AVX2
  // are 2.5 lines; they keep the row stores). float32 accumulation only.
  FUSED_CE_INLINE bool stream_packed_rows(const T* first, const Strides3& s) const {
    if constexpr (!std::is_same<Acc, float>::value) {
      return false;
    } else {
      return a_.D == 1 && s.n == a_.C && a_.C < kMaxStreamedClasses &&
             (kLanes * a_.C * int64_t(sizeof(T))) % 64 == 0 && reinterpret_cast<uintptr_t>(first) % 64 == 0;
    }
  }

  // Writes a full tile's rows (store_rows) to the contiguous run at dst
  // with non-temporal stores of whole vectors: packed back to back in an
  // L1-resident buffer first, then streamed. Row stores straight to dst
  // share lines with their neighbours' and made the cache read every
  // destination line from memory before writing it. Fenced in run_range().
  FUSED_CE_INLINE void stream_rows(const Vec* tile, T* dst) const {
    if constexpr (std::is_same<Acc, float>::value) {
      static_assert(sizeof(VecF) == kLanes * sizeof(float), "one streamed vector per kLanes elements");
      alignas(64) float packed[kLanes * kMaxStreamedClasses];
      int64_t offsets[kLanes];
      for (int l = 0; l < kLanes; ++l) offsets[l] = l * a_.C;
      store_rows(tile, packed, offsets, kLanes);
      for (int64_t k = 0; k < a_.C; ++k) stream_vec(dst + k * kLanes, load_vec<VecF>(packed + k * kLanes));
    }
  }

  // Whether the class runs of an (N, C, d...) tile whose first class starts
  // at `first` (class stride s.c) all start on a cache line, so that the
  // caller, when its runs fill whole lines, can stream them past the cache
  // as the row kernel and stream_rows() do: the gradient is written once,
  // and ordinary stores made the cache read each of its lines first. 8 x
  // 21 x 128 x 128 forward + gradient, in alternating runs: float32
  // 1.13-1.23 -> 0.74-1.11 ms, bfloat16 0.89-1.17 -> 0.80-0.83 ms.
  // float32 accumulation only.
  FUSED_CE_INLINE bool streams_class_lines(const T* first, const Strides3& s) const {
    if constexpr (!std::is_same<Acc, float>::value) {
      return false;
    } else {
      return (s.c * int64_t(sizeof(T))) % 64 == 0 && reinterpret_cast<uintptr_t>(first) % 64 == 0;
    }
  }

  // One class's run of kLanes positions, streamed (fenced in run_range())
  // or stored.
  FUSED_CE_INLINE void store_class_run(T* dst, Vec v, bool stream) const {
    if constexpr (std::is_same<Acc, float>::value) {
      if (stream) {
        stream_vec(dst, v);
        return;
      }
    }
    store_narrowed(dst, v);
  }

  const KernelArgs<T>& a_;
  bool line_groups_ = false;  // whether run_line_group() applies at all
  bool targets_in_position_order_ = false;  // see load_class_targets()
  // Where the next tile in order starts (see locate()).
  int64_t next_first_ = -1, next_n_ = 0, next_d_ = 0;
  // Tiles are (C, lanes), class-major: one vector per class; x_ and g_ hold
  // kLineGroup of them, one after the other.
  AlignedBuffer<Vec> x_;  // logits
  AlignedBuffer<Vec> t_;  // smoothed probability targets
  AlignedBuffer<Vec> g_;  // exp(x - max), then the gradient
};

template <typename T>
FUSED_CE_INLINE void run_kernel_impl(const KernelArgs<T>& args, int64_t begin, int64_t end) {
  if (args.use_row_kernel) {
    RowKernel<T> kernel(args);
    for (int64_t i = begin; i < end; ++i) kernel.run(i, i + 1 < end ? i + 1 : -1);
    kernel.finish();
  } else {
    TileKernel<T> kernel(args);
    kernel.run_range(begin, end);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
