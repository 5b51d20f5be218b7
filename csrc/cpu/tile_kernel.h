// TileKernel: one position per SIMD lane, any strides, either target kind:
// every layout the row kernel does not take (few classes, class-strided
// (N, C, d...) layouts, probability targets).
//
// Part of the CPU kernels (cross_entropy_kernel_impl.h): included once per
// vector width, everything with internal linkage.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cross_entropy_kernel.h"
#include "kernel_exp.h"
#include "kernel_memory.h"
#include "simd.h"

namespace fused_ce {
namespace cpu {
namespace {

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
      sum_wt = sum_over_classes(C, [&](int64_t c) FUSED_CE_INLINE_ATTRIBUTES { return Tp[c] * weight_at(c); });
      shifted_wtx = sum_over_classes(
          C, [&](int64_t c) FUSED_CE_INLINE_ATTRIBUTES { return Tp[c] * weight_at(c) * (X[c] - vmax); });
    } else if (eps != Acc(0)) {
      shifted_wx = sum_over_classes(C, [&](int64_t c) FUSED_CE_INLINE_ATTRIBUTES { return (X[c] - vmax) * weight_at(c); });
    }
    const Vec vsum = sum_over_classes(C, [&](int64_t c) FUSED_CE_INLINE_ATTRIBUTES {
      const Vec e = exp_for<T>(X[c] - vmax);
      if (want_grad) G[c] = e;
      return e;
    });
    const Vec log_sum = Simd<Acc>::log(vsum);
    // A position whose logits are all -inf: lse -inf, torch.logsumexp's
    // (log_sum is NaN there, from exp(-inf - -inf), and so is the loss).
    const Vec neg_inf = Vec{} - std::numeric_limits<Acc>::infinity();
    const Vec lse = vmax == neg_inf ? vmax : vmax + log_sum;
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

  // Classes per block of sum_over_classes.
  static constexpr int64_t kSumBlock = 64;

  // sum_c term(c) per lane over c in [0, C), in order. One running sum over
  // tens of thousands of classes loses about sqrt(C) ulp (2.5e-5 relative
  // for the loss of 30000 float32 classes with probability targets, where
  // PyTorch's is 5e-8; 2e-4 with full label smoothing): the classes are
  // summed in blocks of kSumBlock, and the blocks' sums in double, which
  // keeps the error within a few ulp for any C. A row of up to kSumBlock
  // classes is one block: the plain running sum, bit for bit.
  template <typename Term>
  static FUSED_CE_INLINE Vec sum_over_classes(int64_t C, Term term) {
    using Wide = wide_lanes_t<Vec>;
    int64_t c = 0;
    Vec block{};
    for (const int64_t end = std::min(C, kSumBlock); c < end; ++c) block += term(c);
    if (c == C) return block;
    Wide total = __builtin_convertvector(block, Wide);
    while (c < C) {
      block = Vec{};
      for (const int64_t end = std::min(C, c + kSumBlock); c < end; ++c) block += term(c);
      total += __builtin_convertvector(block, Wide);
    }
    return __builtin_convertvector(total, Vec);
  }

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
  // 21 x 128 x 128 forward + backward, in alternating runs: float32
  // 0.92-1.11 -> 0.76-0.88 ms, bfloat16 0.96-1.02 -> 0.74-0.80 ms; 30%
  // beyond the L3 (benchmarks/results/cpu-2026-11-27-seg-stream/).
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

}  // namespace
}  // namespace cpu
}  // namespace fused_ce
