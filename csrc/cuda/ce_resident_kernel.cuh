// Register-resident forward_with_grad for class-index targets: the fast path
// of training with reduction='mean'/'sum'.
//
// The whole row is loaded once into registers (CH 16-byte slots per thread,
// kept packed: 32 registers hold 64 bf16 logits), then one pass computes the
// online max / sum of exp (and the smoothing sums), one group reduction
// gives lse, and a second pass writes the gradient from the registers:
// exactly one read of the logits and one write of the gradient, i.e. the
// cost of a copy (DESIGN section 4).
// The gradient scale (1/total_weight or 1) is already on the device because
// the total-weight kernels only need the targets and ran first.
//
// Requirements checked by the launcher: class stride 1, D == 1 (gradient
// rows contiguous), vectorisable (same 16-byte phase for input and gradient
// rows), and at most CLUSTER * TPR * CH body slots per row.
//
// CLUSTER > 1 (sm_90+, see ce_cluster.cuh): a row too long for one block is
// split over the CLUSTER blocks of a thread-block cluster (TPR == BLOCK).
// Each block holds a contiguous range of the body slots (block 0 also the
// head and tail elements), the statistics are reduced within the block and
// then across the cluster, and each block writes the gradient of its own
// slots: still one read and one write per element.
//
// PREFETCH (CLUSTER == 1, an experiment): the kernel runs as a persistent
// grid, each group looping over rows, and while a group reduces one row and
// writes its gradient, the copies of its next row are already in flight
// (cp.async into the group's slots of dynamic shared memory,
// prefetch_shared_bytes), with that row's target read into a register.
// Without it a block of 1024 threads holding a whole row (one per SM) has
// nothing in flight from its row's last load until the next row's first:
// the SM's share of DRAM bandwidth idles through every reduction.  Each
// thread copies and reads back only its own slots, so the staging needs no
// barrier, only the copies' own wait; the next row's copies start once this
// row's registers have been consumed by the statistics pass.  Still one
// read of each logit (the copies go through L2 only).
//
// In place (grad_input == input) needs nothing extra here: each lane stores
// exactly the slots and edge elements it loaded, from its registers; the
// only element read by other lanes, the target logit, is read (through the
// coherent path) before the group reduction, which is also a memory barrier
// of the group (group_allreduce), and, split over a cluster, before the
// cluster barrier (cluster_allreduce), which orders every block's reads
// before any block's writes; the gradient is written after them.
//
// The formulas are in ce_loss.cuh.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ce_cluster.cuh"
#include "ce_common.cuh"
#include "ce_loss.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"
#include "ce_reduce.cuh"
#include "ce_rows.cuh"

namespace fused_ce {
namespace cuda {

// The row lives in registers as raw 32-bit words (kWordsPerSlot per 16-byte
// slot) rather than as T values, so that decoding is explicit (one integer op
// for bf16) and the compilers can be kept from holding a float copy of every
// element between the statistics pass and the gradient pass, which triples
// the registers of a 16-bit row and made the large configurations spill:
//  - an empty asm that "modifies" the words after the reduction stops NVVM
//    from reusing the first pass's decodes (forget_words);
//  - ptxas does not see that asm (it emits no PTX instruction) and would
//    merge the two identical decodes itself, so the gradient pass decodes
//    with a differently spelled instruction (get_again).
constexpr int kWordsPerSlot = kVectorBytes / 4;

// Each codec also says whether it stores the gradient two elements at a
// time (kPutsPairs, with put_pair) or one (put).
template <typename T>
struct WordCodec;

template <>
struct WordCodec<float> {
  static constexpr bool kPutsPairs = false;
  __device__ __forceinline__ static float get(const uint32_t* w, int j) { return __uint_as_float(w[j]); }
  __device__ __forceinline__ static float get_again(const uint32_t* w, int j) { return get(w, j); }
  __device__ __forceinline__ static void put(uint32_t* w, int j, float v) { w[j] = __float_as_uint(v); }
  __device__ __forceinline__ static uint32_t neg_inf_word(int) { return 0xff800000u; }
};

template <>
struct WordCodec<double> {
  static constexpr bool kPutsPairs = false;
  __device__ __forceinline__ static double get(const uint32_t* w, int j) {
    return __hiloint2double(static_cast<int>(w[2 * j + 1]), static_cast<int>(w[2 * j]));
  }
  __device__ __forceinline__ static double get_again(const uint32_t* w, int j) { return get(w, j); }
  __device__ __forceinline__ static void put(uint32_t* w, int j, double v) {
    w[2 * j] = static_cast<uint32_t>(__double2loint(v));
    w[2 * j + 1] = static_cast<uint32_t>(__double2hiint(v));
  }
  // -inf = 0xfff00000'00000000: high word odd, low word even.
  __device__ __forceinline__ static uint32_t neg_inf_word(int i) { return (i % 2) ? 0xfff00000u : 0u; }
};

// Two 16-bit elements per word, element 2k in the low half (little endian).
// Impl provides encode(float) -> 16 bits.
template <typename Impl>
struct HalfWordCodec {
  static constexpr bool kPutsPairs = false;  // bf16 hides it with true
  __device__ __forceinline__ static uint32_t bits(const uint32_t* w, int j) {
    return (j % 2) ? (w[j / 2] >> 16) : (w[j / 2] & 0xffffu);
  }
  __device__ __forceinline__ static void put(uint32_t* w, int j, float v) {
    const uint32_t b = Impl::encode(v);
    w[j / 2] = (j % 2) ? ((w[j / 2] & 0x0000ffffu) | (b << 16)) : ((w[j / 2] & 0xffff0000u) | b);
  }
};

template <>
struct WordCodec<__half> : HalfWordCodec<WordCodec<__half>> {
  __device__ __forceinline__ static float get(const uint32_t* w, int j) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits(w, j))));
  }
  // Same value as get(), spelled so that ptxas cannot merge it with get():
  // see the codec comment above.
  __device__ __forceinline__ static float get_again(const uint32_t* w, int j) {
#ifdef FUSED_CE_CUDA_EMULATION
    return get(w, j);  // no PTX in the CPU emulator
#else
    float v;
    if (j % 2) {
      asm("{ .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.f32.f16 %0, hi; }" : "=f"(v) : "r"(w[j / 2]));
    } else {
      asm("{ .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %1;\n cvt.f32.f16 %0, lo; }" : "=f"(v) : "r"(w[j / 2]));
    }
    return v;
#endif
  }
  __device__ __forceinline__ static uint32_t encode(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static uint32_t neg_inf_word(int) { return 0xfc00fc00u; }
};

template <>
struct WordCodec<__nv_bfloat16> : HalfWordCodec<WordCodec<__nv_bfloat16>> {
  // bf16 -> fp32 is exact: the bf16 bits are the top half of the float.
  __device__ __forceinline__ static float get(const uint32_t* w, int j) {
    return __uint_as_float((j % 2) ? (w[j / 2] & 0xffff0000u) : (w[j / 2] << 16));
  }
  // Same value as get(), spelled as a byte permute so that ptxas cannot
  // merge it with get()'s shift/mask: see the codec comment above.
  __device__ __forceinline__ static float get_again(const uint32_t* w, int j) {
#ifdef FUSED_CE_CUDA_EMULATION
    return get(w, j);  // no PTX in the CPU emulator
#else
    uint32_t bits;
    if (j % 2) {
      asm("prmt.b32 %0, %1, 0, 0x3254;" : "=r"(bits) : "r"(w[j / 2]));
    } else {
      asm("prmt.b32 %0, %1, 0, 0x1054;" : "=r"(bits) : "r"(w[j / 2]));
    }
    return __uint_as_float(bits);
#endif
  }
  __device__ __forceinline__ static uint32_t encode(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  // Elements j (even) and j + 1, which fill one word: one paired conversion
  // (cvt.rn.bf16x2.f32) instead of two conversions and put()'s masking.
  // Only bf16 has it (kPutsPairs): the same order of decodes and stores made
  // the float16 kernels of 512 and 896 threads spill.
  static constexpr bool kPutsPairs = true;
  __device__ __forceinline__ static void put_pair(uint32_t* w, int j, float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&w[j / 2], &h, sizeof(uint32_t));
  }
  __device__ __forceinline__ static uint32_t neg_inf_word(int) { return 0xff80ff80u; }
};

// Body slot `slot` of `row` into w, or -inf padding when this thread holds
// no slot (`real` false).
template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void load_slot_words(const T* row, const RowSplit<VEC>& rs, int slot, bool real,
                                                uint32_t (&w)[kWordsPerSlot]) {
  if (real) {
    const uint4 v = load_global<P>(reinterpret_cast<const uint4*>(row + rs.slot_class(slot)));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else {
#pragma unroll
    for (int i = 0; i < kWordsPerSlot; ++i) w[i] = WordCodec<T>::neg_inf_word(i);
  }
}

// A body slot staged in shared memory into w, or -inf padding when this
// thread holds no slot (`real` false: the staged bytes are stale and
// dropped, a select rather than a branch around the read).
template <typename T>
__device__ __forceinline__ void staged_slot_words(const uint4* staged, bool real, uint32_t (&w)[kWordsPerSlot]) {
  const uint4 v = *staged;
  const uint32_t words[kWordsPerSlot] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < kWordsPerSlot; ++i) w[i] = real ? words[i] : WordCodec<T>::neg_inf_word(i);
}

// The dynamic shared memory of a PREFETCH kernel: CH slots per thread.
template <int BLOCK, int CH>
constexpr int prefetch_shared_bytes() {
  return BLOCK * CH * kVectorBytes;
}

template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void store_slot_words(T* row, const RowSplit<VEC>& rs, int slot,
                                                 const uint32_t (&w)[kWordsPerSlot]) {
  store_global<P>(reinterpret_cast<uint4*>(row + rs.slot_class(slot)), make_uint4(w[0], w[1], w[2], w[3]));
}

// The fence takes the pass's reduced result as an input so it cannot be
// hoisted above the pass it separates (a volatile asm may otherwise move
// freely past ordinary arithmetic).
__device__ __forceinline__ void forget_words(uint32_t (&w)[kWordsPerSlot], float after) {
#ifndef FUSED_CE_CUDA_EMULATION  // a compiler fence only: nothing to do on the CPU
#pragma unroll
  for (int i = 0; i < kWordsPerSlot; ++i) asm volatile("" : "+r"(w[i]) : "f"(after));
#endif
}
__device__ __forceinline__ void forget_words(uint32_t (&w)[kWordsPerSlot], double after) {
#ifndef FUSED_CE_CUDA_EMULATION  // a compiler fence only: nothing to do on the CPU
#pragma unroll
  for (int i = 0; i < kWordsPerSlot; ++i) asm volatile("" : "+r"(w[i]) : "d"(after));
#endif
}

// CAP: softcap on (see LossMath).  CLUSTER: blocks per row (1: a row per
// group of TPR threads).  PREFETCH: the next row staged in shared memory
// (see above; a grid of at most as many blocks as the device holds at once).
template <typename T, int TPR, int BLOCK, int VEC, int CH, bool CAP, int CLUSTER = 1, bool PREFETCH = false>
__global__ void __launch_bounds__(BLOCK)
    ce_forward_grad_resident_kernel(const CrossEntropyForwardParams<T> p,
                                    const LossMath<acc_t<T>, CAP> math) {
  static_assert(VEC > 1 && TPR >= VEC, "vectorised rows only; a lane owns at most one head/tail element");
  static_assert(VEC * sizeof(T) == kVectorBytes, "one slot is one 16-byte vector");
  static_assert(CLUSTER == 1 || (TPR == BLOCK && CLUSTER <= kMaxClusterBlocks),
                "a row split over a cluster takes whole blocks");
  static_assert(!PREFETCH || CLUSTER == 1, "the prefetch stages whole rows of one group");
  using Acc = acc_t<T>;
  using Codec = WordCodec<T>;
  using Sched = std::conditional_t<(CLUSTER > 1), ClusterRowSchedule<CLUSTER, BLOCK>, RowSchedule<TPR, BLOCK>>;

  const int lane = Sched::lane();
  const int rank = CLUSTER > 1 ? cluster_block_rank() : 0;
  int parity = 0;  // of the cluster all-reduce's exchange slot
  const int64_t rows = p.N;  // D == 1
  const int C = static_cast<int>(p.C);
  const Acc grad_scale = p.workspace[kWorkspaceScaleSlot];
  const T neg_inf = storage_neg_inf<T>();
  const T zero = from_acc<T>(Acc(0));

  // PREFETCH: this thread's slot ch of the staged row is staged[ch * BLOCK]
  // ([slot][thread], so that a warp's 16-byte copies and reads of one slot
  // are 512 consecutive bytes).  stage_row(r) starts the copies of row r's
  // slots of this lane (nothing past the last row), closes their group and
  // returns r's target as read, checked when its turn comes.
  FUSED_CE_DYNAMIC_SHARED(prefetch_memory);
  uint4* const staged = PREFETCH ? reinterpret_cast<uint4*>(prefetch_memory) + threadIdx.x : nullptr;
  [[maybe_unused]] auto stage_row = [&](int64_t r) -> int64_t {
    int64_t target = p.ignore_index;
    if (r < rows) {
      const T* xr = p.input + r * p.input_stride_n;
      const RowSplit<VEC> split = RowSplit<VEC>::make(xr, C);
      const uint64_t l2 = l2_evict_first();  // nothing reads the row again
#pragma unroll
      for (int ch = 0; ch < CH; ++ch) {
        const int slot = ch * TPR + lane;
        if (slot < split.body_slots)
          async_copy_16(staged + ch * BLOCK, xr + split.slot_class(slot), l2);
      }
      target = load_global<CachePolicy::kKeep>(p.target + r * p.target_stride_n);
    }
    async_commit();
    return target;
  };
  [[maybe_unused]] int64_t staged_target = 0;
  if constexpr (PREFETCH) staged_target = stage_row(Sched::first_base() + Sched::group());

  for (int64_t base = Sched::first_base(); base < rows; base += Sched::base_step()) {
    const int64_t row = base + Sched::group();
    const bool active = row < rows;
    const T* x = p.input + (active ? row : 0) * p.input_stride_n;
    RowSplit<VEC> rs = RowSplit<VEC>::make(x, C);
    if (!active) rs.clear();
    // This block's body slots, and the row split it reads the edges from:
    // block 0 of a cluster holds the head and tail elements, the others none.
    const SlotRange mine =
        CLUSTER > 1 ? SlotRange::of_rank(rs.body_slots, rank, CLUSTER) : SlotRange{0, rs.body_slots};
    RowSplit<VEC> edges = rs;
    if (rank != 0) edges.head = edges.tail = 0;
    int64_t y = -1;
    if (active) {
      y = PREFETCH ? checked_class_target(staged_target, p.ignore_index, p.C)
                   : read_class_target(p.target, row * p.target_stride_n, p.ignore_index, p.C);
    }
    // y_t, also the reference the smoothing sum is taken relative to (see
    // ce_loss.cuh).
    Acc y_target = Acc(0);
    if (y >= 0 && ((lane == 0 && rank == 0) || math.smoothing))
      y_target = math.logit(to_acc(load_global<CachePolicy::kCoherent>(x + y))).y;
    const Acc ref = isfinite(y_target) ? y_target : Acc(0);

    // The only read of the row: body slot mine.first + ch * TPR + lane goes
    // to xw[ch] (PREFETCH: from where stage_row copied it), the lane's
    // head/tail elements to xe; padding is -inf.  Evict-first: nothing reads
    // the row again.
    uint32_t xw[CH][kWordsPerSlot];
    T xe[kEdges];
    if constexpr (PREFETCH) {
      async_wait<0>();
#pragma unroll
      for (int ch = 0; ch < CH; ++ch) staged_slot_words<T>(staged + ch * BLOCK, ch * TPR + lane < mine.count, xw[ch]);
    } else {
#pragma unroll
      for (int ch = 0; ch < CH; ++ch)
        load_slot_words<CachePolicy::kStream>(x, rs, mine.first + ch * TPR + lane,
                                              ch * TPR + lane < mine.count, xw[ch]);
    }
    load_edges<CachePolicy::kStream>(x, edges, lane, neg_inf, xe);

    // One pass over the registers: an online (max, sum of exp) per slot plus,
    // with smoothing, sum_c w_c (y_c - ref) and sum_c w_c; then one group
    // reduction.
    Fields<Acc, 4> st{{acc_neg_inf<Acc>(), Acc(0), Acc(0), Acc(0)}};
    auto add_smoothing = [&](Acc ya, int c) {
      const Acc w = class_weight(p.weight, c);
      st.v[2] += w * (ya - ref);
      st.v[3] += w;
    };
    Acc ye[kEdges];
    math.edge_logits(edges, lane, xe, ye);
    online_lse_add<kEdges>(st.v[0], st.v[1], ye);
    if (math.smoothing) {
#pragma unroll
      for (int e = 0; e < kEdges; ++e) {
        const int c = edges.edge_class(lane, e);
        if (c >= 0) add_smoothing(ye[e], c);
      }
    }
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) {
      const int slot = mine.first + ch * TPR + lane;
      const bool real = ch * TPR + lane < mine.count;
      Acc vals[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) vals[j] = math.logit_or_padding(Codec::get(xw[ch], j), real);
      online_lse_add<VEC>(st.v[0], st.v[1], vals);
      if (math.smoothing && real) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) add_smoothing(vals[j], rs.slot_class(slot) + j);
      }
    }
    // The staged slots are all in registers and consumed: the next row's
    // copies may overwrite them.
    if constexpr (PREFETCH) staged_target = stage_row(row + Sched::base_step());
    // Also the barrier between this row's reads and its in-place writes.
    st = group_allreduce<TPR, BLOCK>(st, LseSumOp{});
    if constexpr (CLUSTER > 1) {
      st = cluster_allreduce<CLUSTER>(st, LseSumOp{}, parity);
      parity ^= 1;
    }
    const RowStats<Acc> stats{st.v[0], acc_log(st.v[1])};
    const Acc lse = stats.lse();
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) forget_words(xw[ch], lse);

    const Acc weight_sum = p.weight != nullptr ? st.v[3] : static_cast<Acc>(C);
    const Acc w_target = y >= 0 ? class_weight(p.weight, y) : Acc(0);

    if (!active) continue;  // no collectives past this point
    if (lane == 0 && rank == 0) {
      p.loss[row] = y >= 0 ? math.class_loss(stats, y_target, w_target, ref, st.v[2], weight_sum) : Acc(0);
      p.lse[row] = lse;  // ignored rows included
    }

    // The gradient, from the registers; exact zeros for an ignored row.
    T* gx = p.grad_input + row * p.C;
    const RowGradient<Acc> grad = math.class_gradient(grad_scale, Acc(0), y, w_target, weight_sum, lse);
    auto grad_at = [&](Acc xa, int c) -> Acc {
      if (grad.zero) return Acc(0);
      return grad.at(stats, math.logit(xa), c, [&] { return class_weight(p.weight, c); });
    };
#pragma unroll
    for (int e = 0; e < kEdges; ++e) {
      const int c = edges.edge_class(lane, e);
      xe[e] = c >= 0 ? from_acc<T>(grad_at(to_acc(xe[e]), c)) : zero;
    }
    store_edges<CachePolicy::kStream>(gx, edges, lane, xe);
#pragma unroll
    for (int ch = 0; ch < CH; ++ch) {
      if (ch * TPR + lane >= mine.count) continue;
      const int slot = mine.first + ch * TPR + lane;
      if constexpr (Codec::kPutsPairs) {
#pragma unroll
        for (int j = 0; j < VEC; j += 2) {
          const int c = rs.slot_class(slot) + j;
          const Acc lo = grad_at(Acc(Codec::get_again(xw[ch], j)), c);
          Codec::put_pair(xw[ch], j, lo, grad_at(Acc(Codec::get_again(xw[ch], j + 1)), c + 1));
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          Codec::put(xw[ch], j, grad_at(Acc(Codec::get_again(xw[ch], j)), rs.slot_class(slot) + j));
      }
      store_slot_words<CachePolicy::kStream>(gx, rs, slot, xw[ch]);
    }
  }
  // No block may leave while another can still read its exchange slot.
  if constexpr (CLUSTER > 1) cluster_barrier();
}

}  // namespace cuda
}  // namespace fused_ce
