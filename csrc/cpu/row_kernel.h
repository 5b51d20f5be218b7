// RowKernel: one position at a time, vectorised along a contiguous class
// axis (language models, ImageNet classifiers), with the row reductions it
// is built from and the streamed, deferred store of each gradient row
// (GradientFinish, PendingRow).
//
// Part of the CPU kernels (cross_entropy_kernel_impl.h): included once per
// vector width, everything with internal linkage.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cross_entropy_kernel.h"
#include "kernel_exp.h"
#include "kernel_memory.h"
#include "simd.h"

namespace fused_ce {
namespace cpu {
namespace {

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
    // At least 0: the row's largest logit adds exp(0) = 1 to the sum. The
    // folded shift's bias (kernel_exp.h), taken out after the log, can leave
    // it an ulp below, which would give a certain prediction a negative
    // loss. (NaN stays NaN.)
    Acc log_sum = std::log(sum) - shifted_exp.log_bias();
    if (log_sum < Acc(0)) log_sum = Acc(0);
    // A row of -inf only: lse is -inf, torch.logsumexp's (its log_sum is
    // NaN, from exp(-inf - -inf), and so are its loss and p, as PyTorch's).
    const Acc lse = row_max == -std::numeric_limits<Acc>::infinity() ? row_max : row_max + log_sum;
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
      // No exponentials were kept: grad_row = p = exp((x - max) - log_sum),
      // not exp(x - lse): lse is rounded at the logits' magnitude, which
      // two tied maxima of 1e30 would each see as p = 1.
      finish.scale = coef_p;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes) {
        store_vec(grad_row + c, exp_for<X>((load_widened<Vec>(x + c) - row_max) - log_sum));
      }
      if (c < C) {
        // Padding lanes read the max itself: exp(-log_sum), never an overflow.
        store_partial(grad_row + c, exp_for<X>((load_partial<Vec>(x + c, C - c, row_max) - row_max) - log_sum),
                      C - c);
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

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
