// Reductions across the threads that share one row ("the group"): a single
// thread, a power-of-two slice of a warp, or a whole block.  Every thread of
// the group gets the result, and the combination order is fixed by the
// launch shape, so results are bitwise reproducible run to run (no atomics).
#pragma once

#include "ce_common.cuh"

namespace fused_ce {
namespace cuda {

constexpr int kWarpSize = 32;

// K accumulators reduced together, so a block-wide reduction of several
// row statistics costs one round of barriers instead of K.
template <typename Acc, int K>
struct Fields {
  Acc v[K];
};

// Combiners.  Each must treat its identity exactly: idle threads (past the
// end of a short row) contribute the identity.
struct SumOp {
  template <typename Acc, int K>
  __device__ __forceinline__ Fields<Acc, K> operator()(const Fields<Acc, K>& a,
                                                        const Fields<Acc, K>& b) const {
    Fields<Acc, K> r;
#pragma unroll
    for (int i = 0; i < K; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
};

struct MaxOp {
  template <typename Acc, int K>
  __device__ __forceinline__ Fields<Acc, K> operator()(const Fields<Acc, K>& a,
                                                        const Fields<Acc, K>& b) const {
    Fields<Acc, K> r;
#pragma unroll
    for (int i = 0; i < K; ++i) r.v[i] = acc_max(a.v[i], b.v[i]);
    return r;
  }
};

// Online log-sum-exp: v[0] = running max m, v[1] = sum of exp(x - m); the
// remaining fields are plain sums.  Identity: (-inf, 0, 0...).  The rescale
// factor is taken as exactly 1 when a side already holds the maximum, which
// also keeps (-inf, 0) + (-inf, 0) from producing exp(-inf - -inf) = NaN.
struct LseSumOp {
  template <typename Acc, int K>
  __device__ __forceinline__ Fields<Acc, K> operator()(const Fields<Acc, K>& a,
                                                        const Fields<Acc, K>& b) const {
    static_assert(K >= 2, "LseSumOp needs (max, sum) in fields 0 and 1");
    Fields<Acc, K> r;
    const Acc m = acc_max(a.v[0], b.v[0]);
    const Acc sa = (a.v[0] == m) ? Acc(1) : fast_exp(a.v[0] - m);
    const Acc sb = (b.v[0] == m) ? Acc(1) : fast_exp(b.v[0] - m);
    r.v[0] = m;
    r.v[1] = a.v[1] * sa + b.v[1] * sb;
#pragma unroll
    for (int i = 2; i < K; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
};

// Folds N more logits (storage or accumulation type) into a thread's online
// log-sum-exp (m, s): s is the sum of exp(x - m) over everything seen, m
// the maximum.  The running sum is
// rescaled once per call, not once per element, and the exps go to four
// independent accumulators to shorten the dependency chain.
template <int N, typename T, typename Acc>
__device__ __forceinline__ void online_lse_add(Acc& m, Acc& s, const T* vals) {
  Acc step_max = acc_neg_inf<Acc>();
#pragma unroll
  for (int i = 0; i < N; ++i) step_max = acc_max(step_max, to_acc(vals[i]));
  const Acc m_new = acc_max(m, step_max);
  // While everything seen is -inf (masked logits, padding) there is nothing
  // to add, and exp(-inf - -inf) would be NaN.  But fmax drops NaN, so the
  // maximum of NaN and padding is -inf too: a NaN logit (a head or tail
  // element, alone among its lane's padding) must still make the sum NaN,
  // as it makes PyTorch's loss NaN.
  if (m_new == acc_neg_inf<Acc>()) {
    bool nan = false;
#pragma unroll
    for (int i = 0; i < N; ++i) nan = nan || isnan(to_acc(vals[i]));
    if (nan) s = acc_nan<Acc>();
    return;
  }
  constexpr int kAcc = N < 4 ? N : 4;
  Acc part[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) part[i] = Acc(0);
#pragma unroll
  for (int i = 0; i < N; ++i) part[i % kAcc] += fast_exp(to_acc(vals[i]) - m_new);
  Acc total = (m == m_new) ? s : s * fast_exp(m - m_new);
#pragma unroll
  for (int i = 0; i < kAcc; ++i) total += part[i];
  m = m_new;
  s = total;
}

// All-reduce over a group of TPR threads inside blocks of BLOCK threads.
// TPR == 1: nothing to do.  TPR <= 32: xor butterfly within the warp slice
// (every lane of the warp must call it, which the kernels guarantee by
// giving whole warps the same trip counts).  TPR == BLOCK: butterfly per
// warp, then every thread folds the per-warp results in warp order; must be
// called by all threads of the block.
//
// It is also a memory barrier of the group: every global access a thread of
// the group made before the call is ordered before every access any thread
// of the group makes after it.  The in-place operator relies on this (all
// reads of a row, including other lanes' reads of the target logit, happen
// before any lane overwrites the row with its gradient).  Shuffles exchange
// registers but order no memory, hence the __syncwarp of warp slices; the
// block version's __syncthreads orders memory already, and a single thread's
// accesses are in program order.
template <int TPR, int BLOCK, typename Acc, int K, typename Op>
__device__ __forceinline__ Fields<Acc, K> group_allreduce(Fields<Acc, K> x, Op op) {
  static_assert(TPR == 1 || (TPR <= kWarpSize && (TPR & (TPR - 1)) == 0) ||
                    (TPR == BLOCK && BLOCK % kWarpSize == 0),
                "a group is one thread, a power-of-two warp slice or the whole block");
  if constexpr (TPR == 1) {
    return x;
  } else {
    constexpr int kWarpSpan = TPR < kWarpSize ? TPR : kWarpSize;
#pragma unroll
    for (int offset = kWarpSpan / 2; offset > 0; offset /= 2) {
      Fields<Acc, K> other;
#pragma unroll
      for (int i = 0; i < K; ++i) other.v[i] = __shfl_xor_sync(0xffffffffu, x.v[i], offset);
      // Both partners evaluate op(lower lane's value, upper lane's value), so
      // every lane ends with bitwise the same result even when the compiler
      // contracts op's arithmetic into FMAs (which breaks commutativity).
      const bool upper = (threadIdx.x & offset) != 0;
      Fields<Acc, K> lo, hi;
#pragma unroll
      for (int i = 0; i < K; ++i) {
        lo.v[i] = upper ? other.v[i] : x.v[i];
        hi.v[i] = upper ? x.v[i] : other.v[i];
      }
      x = op(lo, hi);
    }
    if constexpr (TPR <= kWarpSize) {
      __syncwarp();
      return x;
    } else {
      constexpr int kWarps = BLOCK / kWarpSize;
      __shared__ Fields<Acc, K> partial[kWarps];
      const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
      if (threadIdx.x % kWarpSize == 0) partial[warp] = x;
      __syncthreads();
      Fields<Acc, K> r = partial[0];
      // Fully unrolled, the compiler loads every warp's fields at once,
      // which spilled the registers of the 384- and 768-thread streaming
      // blocks and of the 896- and 1024-thread resident ones: those fold 4
      // warps at a time, blocks of 2, 4, 8 or 16 warps all at once (ptxas
      // -v in .ci/nvcc_check.sh). The order of the fold, hence every bit,
      // is the same.
      constexpr int kFoldUnroll = (kWarps & (kWarps - 1)) == 0 && kWarps <= 16 ? kWarps : 4;
#pragma unroll(kFoldUnroll)
      for (int w = 1; w < kWarps; ++w) r = op(r, partial[w]);
      // `partial` is reused by the next reduction of the same kind.
      __syncthreads();
      return r;
    }
  }
}

// True on every thread of the group's warp (TPR <= 32: the warp's collectives
// use the full mask, so all its slices must agree) or block (TPR == BLOCK)
// when `v` is true on any of them; a single thread's own value for TPR == 1.
// Makes a per-row decision to run a collective uniform.
template <int TPR, int BLOCK>
__device__ __forceinline__ bool group_any(bool v) {
  if constexpr (TPR == 1) {
    return v;
  } else if constexpr (TPR <= kWarpSize) {
    return __any_sync(0xffffffffu, v) != 0;
  } else {
    return __syncthreads_or(v) != 0;
  }
}

// One thread's share of a strided sum: term(load(i)) summed over i = first,
// first + stride, ... below end, added in that order, with the loads of U
// consecutive terms issued before any of them is added.  The loads are
// independent, so a thread waits for memory once per U terms rather than
// once per term (the reductions over a batch's targets and losses are
// latency bound: few threads, each walking a long range); the order of the
// additions, hence every bit of the sum, is the plain loop's.  `load(i)`
// is only called for i < end.
template <int U, typename Acc, typename Load, typename Term>
__device__ __forceinline__ Acc strided_sum(int64_t first, int64_t end, int64_t stride, Load load, Term term) {
  using Raw = decltype(load(first));
  Acc sum = Acc(0);
  for (int64_t base = first; base < end; base += U * stride) {
    Raw raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * stride < end) raw[u] = load(base + u * stride);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * stride < end) sum += term(raw[u]);
  }
  return sum;
}

// A thread's running sums over a long row, taken in blocks: the partial sums
// (in Acc, where the terms are added) move into double totals every
// BLOCK_STEPS steps.  A float sum of n terms that share a rounding
// direction loses up to about n/2 ulp: a one-thread row of 30000 classes
// whose probability masses are all 1/C (full label smoothing) came out
// 3e-4 off in V = sum_c u_c, and its loss and gradient with it.  In blocks
// of about 64 terms the loss is that of 64 terms plus a double sum of
// blocks.  A thread of a group row sums only its own share of the row, so
// this matters where the group is one thread or the row is very long.
template <int BLOCK_STEPS, int N>
struct BlockedSums {
  double total[N] = {};
  int steps = 0;

  // Call once a step's terms are in partial[0..N).
  template <typename Acc>
  __device__ __forceinline__ void end_step(Acc* partial) {
    if (++steps < BLOCK_STEPS) return;
    steps = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      total[i] += static_cast<double>(partial[i]);
      partial[i] = Acc(0);
    }
  }

  // Puts the whole sums, rounded once to Acc, back into partial[0..N).
  template <typename Acc>
  __device__ __forceinline__ void finish(Acc* partial) const {
#pragma unroll
    for (int i = 0; i < N; ++i) partial[i] = static_cast<Acc>(total[i] + static_cast<double>(partial[i]));
  }
};

// BLOCK_STEPS for steps of `terms_per_step` terms: blocks of about 64 terms.
constexpr int blocked_sum_steps(int terms_per_step) {
  return terms_per_step >= 64 ? 1 : 64 / terms_per_step;
}

// Convenience wrappers for a single value.
template <int TPR, int BLOCK, typename Acc>
__device__ __forceinline__ Acc group_max(Acc v) {
  Fields<Acc, 1> f{{v}};
  return group_allreduce<TPR, BLOCK>(f, MaxOp{}).v[0];
}

template <int TPR, int BLOCK, typename Acc>
__device__ __forceinline__ Acc group_sum(Acc v) {
  Fields<Acc, 1> f{{v}};
  return group_allreduce<TPR, BLOCK>(f, SumOp{}).v[0];
}

}  // namespace cuda
}  // namespace fused_ce
