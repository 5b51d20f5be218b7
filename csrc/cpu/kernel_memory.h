// Vectors between memory and registers for the CPU kernels: conversions
// between the storage types (float64, float32, bfloat16, float16) and the
// accumulate type, whole, masked and partial loads and stores, non-temporal
// (streaming) stores, and a cache-line-aligned scratch buffer.
//
// Part of the CPU kernels (cross_entropy_kernel_impl.h): included once per
// vector width, everything with internal linkage.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "cross_entropy_kernel.h"
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

// ---------------------------------------------------------------------------
// Partial vectors and scratch memory.

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

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
