// Streaming row kernels: the general path for every layout and row length.
//
// A group of TPR threads owns one row (TPR = 1 for class-strided layouts and
// tiny rows, 8 or 32 for short rows, the whole block for long rows) and
// walks its body in steps of U slots per thread (see RowSplit for the
// head/body/tail split that keeps every body access an aligned vector):
//
//   forward   one read of the logits: online log-sum-exp (running max and
//             rescaled sum) plus the extra sums the loss needs, one group
//             reduction, then loss and lse.  With grad_input set (the
//             forward_with_grad operator) a second pass writes the gradient;
//             that pass reads the row again, which the L2 usually still
//             holds, and uses evict-first accesses so the gradient does not
//             push other rows out.
//   backward  lse is known, so the class-index gradient is one read and one
//             write with no reduction at all; ignored rows without an lse
//             gradient are zero-filled without reading the logits.
//             Probability targets first reduce V = sum_c u_c (one read of
//             the targets).
//
// In place (forward_with_grad with grad_input == input): the second pass
// overwrites the row it reads.  That is safe because (1) every element is
// read and written by the same thread (both passes walk the row with the
// same slot / edge assignment) and its gradient is computed from the value
// just read, (2) the only elements read by other threads (the target logit
// y_t, or y_0 for probabilities) are read before the group reduction, which
// is also a memory barrier of the group (group_allreduce), and (3) the
// logits are read through the coherent path (CachePolicy::kCoherent, kHinted,
// kStream), never the read-only one.  Rows never share elements.
//
// The formulas are in ce_loss.cuh.
#pragma once

#include <cstdint>

#include "ce_common.cuh"
#include "ce_loss.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"
#include "ce_reduce.cuh"
#include "ce_rows.cuh"

namespace fused_ce {
namespace cuda {

// Slots each thread has in flight per step: 4 x 16 bytes when vectorised,
// 8 scalars otherwise; half that for probability targets, which stream two
// tensors.
template <int VEC, bool PROB>
constexpr int stream_unroll() {
  return (VEC > 1 ? 4 : 8) / (PROB ? 2 : 1);
}

// Minimum resident blocks per SM requested from ptxas.  Class-index kernels
// are capped at 80 registers (3 blocks of 256 threads) so that enough warps
// stream concurrently; probability-target and float64 kernels need more
// registers per element and are left uncapped rather than spilled.
template <typename T, int BLOCK, bool PROB>
constexpr int stream_min_blocks() {
  return (PROB || sizeof(T) == 8) ? 1 : (3 * 256 + BLOCK - 1) / BLOCK;
}

// How forward_with_grad's second read of a row may find it in L2 (the
// launcher's choice, run-time flags so one kernel serves every choice).  A
// long row is read, reduced, then read again; between the two reads every
// other resident row streams through the L2 too, and with rows of 128k+
// classes (256 KB+) those rows alone outgrow it.
//   keep_first_read   the first read gives the row's lines evict_last
//                     priority, so the gradient writes and the second
//                     (evict-first) reads of other rows do not push them out
//   reverse_second    the second pass walks the row's steps last to first:
//                     the most recently read slots, the likeliest still in
//                     L2, come first (each thread still reads and writes only
//                     its own slots, which in place needs)
struct StreamReuse {
  bool keep_first_read = false;
  bool reverse_second = false;
};

// Forward (and forward_with_grad).  PROB selects probability targets, CAP
// the softcap.  STAGES > 0 (class targets, vector access, a block per row)
// reads the row's body through a StepRing of that many steps in the block's
// dynamic shared memory (StepRing::shared_bytes()) rather than into
// registers, with STAGES - 1 steps in flight: an experiment for the long
// rows, whose profile shows warps waiting on their loads.
template <typename T, int TPR, int BLOCK, int VEC, bool PROB, bool CAP, int STAGES = 0>
__global__ void __launch_bounds__(BLOCK, (stream_min_blocks<T, BLOCK, PROB>()))
    ce_forward_stream_kernel(const CrossEntropyForwardParams<T> p, const LossMath<acc_t<T>, CAP> math,
                             const StreamReuse reuse) {
  static_assert(VEC == 1 || TPR >= VEC, "each lane owns at most one head and one tail element");
  static_assert(STAGES == 0 || (!PROB && VEC > 1 && TPR == BLOCK), "the ring serves class-target block rows");
  using Acc = acc_t<T>;
  using Sched = RowSchedule<TPR, BLOCK>;
  constexpr int U = stream_unroll<VEC, PROB>();
  constexpr int kStep = U * TPR;
  FUSED_CE_DYNAMIC_SHARED(ring_memory);
  [[maybe_unused]] const StepRing<T, U, BLOCK, VEC, STAGES == 0 ? 1 : STAGES> ring{
      reinterpret_cast<Pack<T, VEC>*>(ring_memory), Sched::lane()};

  const int lane = Sched::lane();
  const int64_t rows = p.N * p.D;
  const int C = static_cast<int>(p.C);
  const bool extras = PROB || math.smoothing;
  const bool with_grad = p.grad_input != nullptr;
  // forward_with_grad: 1 / total_weight (mean) or 1 (sum), computed on the
  // device by the total-weight kernels that ran just before on this stream.
  const Acc grad_scale = with_grad ? p.workspace[kWorkspaceScaleSlot] : Acc(0);
  const T neg_inf = storage_neg_inf<T>();
  const T zero = from_acc<T>(Acc(0));
  const uint64_t first_read_l2 = l2_policy(with_grad && reuse.keep_first_read);

  for (int64_t base = Sched::first_base(); base < rows; base += Sched::base_step()) {
    const int64_t row = base + Sched::group();
    const bool active = row < rows;
    const RowCoord rc = split_row(active ? row : 0, p.D);
    const T* x = p.input + rc.n * p.input_stride_n + rc.d * p.input_stride_d;
    RowSplit<VEC> rs = RowSplit<VEC>::make(x, C);
    if (!active) rs.clear();  // idle groups still join the reduction

    const T* t = nullptr;
    int64_t y = -1;
    Acc y_target = Acc(0);
    if constexpr (PROB) {
      t = p.target_prob + rc.n * p.prob_stride_n + rc.d * p.prob_stride_d;
    } else if (active) {
      y = read_class_target(p.target, rc.n * p.target_stride_n + rc.d * p.target_stride_d,
                            p.ignore_index, p.C);
      if (y >= 0 && (lane == 0 || math.smoothing))
        y_target = math.logit(to_acc(load_global<CachePolicy::kCoherent>(x + y * p.input_stride_c))).y;
    }
    // The reference logit of the weighted sums (see ce_loss.cuh).
    Acc ref = Acc(0);
    if constexpr (PROB) {
      if (active) ref = math.logit(to_acc(load_global<CachePolicy::kCoherent>(x))).y;
    } else {
      ref = y_target;
    }
    if (!isfinite(ref)) ref = Acc(0);

    // Pass 1.  st = (running max, rescaled sum of exp, s2, s3) with
    //   class targets, smoothing on:  s2 = sum_c w_c (y_c - ref), s3 = W = sum_c w_c
    //   probability targets:          s2 = V = sum_c u_c,  s3 = sum_c u_c (y_c - ref)
    Fields<Acc, 4> st{{acc_neg_inf<Acc>(), Acc(0), Acc(0), Acc(0)}};
    // The probability terms go into double totals in blocks (BlockedSums):
    // their masses often share one rounding direction (smoothing's eps / C).
    // Class-target kernels keep plain sums: their extra terms (w_c (y_c -
    // ref), and W) do not, and their registers are capped.
    [[maybe_unused]] BlockedSums<blocked_sum_steps(U * VEC), 2> prob_sums;
    auto add_extras = [&](Acc ya, int c, T tv) {
      if constexpr (PROB) {
        const Acc u = math.prob_mass(p.weight, c, to_acc(tv));
        st.v[2] += u;
        st.v[3] += u * (ya - ref);
      } else {
        const Acc w = class_weight(p.weight, c);
        st.v[2] += w * (ya - ref);
        st.v[3] += w;
      }
    };
    if constexpr (VEC > 1) {
      T xe[kEdges];
      T te[kEdges] = {zero, zero};
      load_edges<CachePolicy::kCoherent>(x, rs, lane, neg_inf, xe);
      if constexpr (PROB) load_edges<CachePolicy::kKeep>(t, rs, lane, zero, te);
      Acc ye[kEdges];
      math.edge_logits(rs, lane, xe, ye);
      online_lse_add<kEdges>(st.v[0], st.v[1], ye);
      if (extras) {
#pragma unroll
        for (int e = 0; e < kEdges; ++e) {
          const int c = rs.edge_class(lane, e);
          if (c >= 0) add_extras(ye[e], c, te[e]);
        }
      }
    }
    // Folds one loaded step (xv, and tv for probabilities) into st.
    auto fold_step = [&](int first, const T (&xv)[U][VEC], const T (&tv)[U][VEC]) {
      // The loaded step is folded into the running log-sum-exp kFold slots
      // at a time: all of it at once without the cap (one rescale per
      // step), 8 elements at a time with it, since capped logits are too
      // expensive to recompute and a whole step of them kept live spills.
      constexpr int kCapFold = VEC >= 8 ? 1 : 8 / VEC;
      constexpr int kFold = (CAP && kCapFold < U) ? kCapFold : U;
      static_assert(U % kFold == 0, "a step is a whole number of folds");
#pragma unroll
      for (int u0 = 0; u0 < U; u0 += kFold) {
        Acc yv[kFold][VEC];
#pragma unroll
        for (int k = 0; k < kFold; ++k) {
          const bool real = first + (u0 + k) * TPR < rs.body_slots;
#pragma unroll
          for (int j = 0; j < VEC; ++j) yv[k][j] = math.logit_or_padding(to_acc(xv[u0 + k][j]), real);
        }
        online_lse_add<kFold * VEC>(st.v[0], st.v[1], &yv[0][0]);
        if (extras) {
#pragma unroll
          for (int k = 0; k < kFold; ++k) {
            const int slot = first + (u0 + k) * TPR;
            if (slot >= rs.body_slots) continue;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
              add_extras(yv[k][j], rs.slot_class(slot) + j, PROB ? tv[u0 + k][j] : zero);
          }
        }
      }
      if constexpr (PROB) prob_sums.end_step(&st.v[2]);
    };
    // A thread's steps of the body: step k starts at slot lane + k * kStep.
    // (Computed again for the second pass rather than kept live across the
    // reduction: the kernels without a register cap grew by it.)
    auto thread_steps = [&] { return lane < rs.body_slots ? (rs.body_slots - lane + kStep - 1) / kStep : 0; };
    if constexpr (STAGES > 0) {
      ring.for_each_step(x, rs, thread_steps(), [&](int k) { return lane + k * kStep; }, first_read_l2, neg_inf,
                         [&](int first, T (&xv)[U][VEC]) { fold_step(first, xv, xv); });
    } else {
      for (int first = lane; first < rs.body_slots; first += kStep) {
        T xv[U][VEC];
        T tv[U][VEC];
        load_step<CachePolicy::kHinted, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv, first_read_l2);
        if constexpr (PROB) load_step<CachePolicy::kKeep, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
        fold_step(first, xv, tv);
      }
    }
    if constexpr (PROB) prob_sums.finish(&st.v[2]);
    // Also the barrier between this row's reads and its in-place writes.
    st = group_allreduce<TPR, BLOCK>(st, LseSumOp{});

    const RowStats<Acc> stats{st.v[0], acc_log(st.v[1])};
    const Acc lse = stats.lse();
    // Without weights W is exactly C (not a float sum of ones).
    const Acc weight_sum = p.weight != nullptr ? st.v[3] : static_cast<Acc>(C);
    const Acc w_target = (!PROB && y >= 0) ? class_weight(p.weight, y) : Acc(0);

    if (!active) continue;  // no collectives past this point
    if (lane == 0) {
      Acc loss;
      if constexpr (PROB) {
        // ref's mass: the mass of class 0 (read again by this lane only).
        const Acc ref_mass = math.prob_mass(p.weight, 0, to_acc(load_global<CachePolicy::kCoherent>(t)));
        loss = math.prob_loss(stats, ref, ref_mass, st.v[2], st.v[3]);
      } else {
        loss = y < 0 ? Acc(0) : math.class_loss(stats, y_target, w_target, ref, st.v[2], weight_sum);
      }
      p.loss[row] = loss;
      p.lse[row] = lse;  // ignored rows included (lse has a gradient of its own)
    }
    if (!with_grad) continue;

    // Pass 2 (forward_with_grad): the gradient of the reduced loss.  Gradient
    // rows are contiguous (N, C, D): class stride D.
    T* gx = p.grad_input + rc.n * p.C * p.D + rc.d;
    const int64_t gx_stride = p.D;
    RowGradient<Acc> grad;
    if constexpr (PROB) {
      grad = math.prob_gradient(grad_scale, Acc(0), st.v[2], lse);
    } else {
      grad = math.class_gradient(grad_scale, Acc(0), y, w_target, weight_sum, lse);
    }
    auto grad_at = [&](T xv, int c, T tv) -> T {
      if (grad.zero) return zero;
      return from_acc<T>(grad.at(stats, math.logit(to_acc(xv)), c, [&] {
        if constexpr (PROB) {
          return math.prob_mass(p.weight, c, to_acc(tv));
        } else {
          return class_weight(p.weight, c);
        }
      }));
    };
    if constexpr (VEC > 1) {
      T xe[kEdges];
      T te[kEdges] = {zero, zero};
      load_edges<CachePolicy::kStream>(x, rs, lane, neg_inf, xe);
      if constexpr (PROB) load_edges<CachePolicy::kStream>(t, rs, lane, zero, te);
#pragma unroll
      for (int e = 0; e < kEdges; ++e) {
        const int c = rs.edge_class(lane, e);
        if (c >= 0) xe[e] = grad_at(xe[e], c, te[e]);
      }
      store_edges<CachePolicy::kStream>(gx, rs, lane, xe);
    }
    const int steps = thread_steps();
    // The second pass may walk the steps last to first (StreamReuse).
    auto step_first = [&](int k) { return lane + (reuse.reverse_second ? steps - 1 - k : k) * kStep; };
    // Writes the gradient of one loaded step over it and stores it.
    auto write_step = [&](int first, T (&xv)[U][VEC], const T (&tv)[U][VEC]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int slot = first + u * TPR;
        if (slot >= rs.body_slots) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          xv[u][j] = grad_at(xv[u][j], rs.slot_class(slot) + j, PROB ? tv[u][j] : zero);
      }
      store_step<CachePolicy::kStream, U, TPR>(gx, gx_stride, rs, first, xv);
    };
    if constexpr (STAGES > 0) {
      if (!grad.zero) {
        ring.for_each_step(x, rs, steps, step_first, l2_evict_first(), neg_inf,
                           [&](int first, T (&xv)[U][VEC]) { write_step(first, xv, xv); });
        continue;
      }
    }
    for (int k = 0; k < steps; ++k) {
      const int first = step_first(k);
      T xv[U][VEC];
      T tv[U][VEC];
      if (grad.zero) {
        fill_step(xv, zero);
      } else {
        load_step<CachePolicy::kStream, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv);
        if constexpr (PROB) load_step<CachePolicy::kStream, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
      }
      write_step(first, xv, tv);
    }
  }
}

// The magnitude of lse from which the backward recomputes a row's max and
// sum instead of trusting p_c = exp(y_c - lse): lse is rounded at its own
// magnitude, an error that p_c inherits relative to itself (2^-17 below 128
// in float32, 2^-37 below 2^16 in float64), and that can swallow log(sum)
// whole (tied maxima near 1e30 would get p = 1 instead of 1/2).
template <typename Acc>
__device__ __forceinline__ Acc exact_lse_bound() {
  return sizeof(Acc) == 8 ? Acc(65536) : Acc(128);
}

// max and log(sum of exp) of one row's (capped) logits over the group, as the
// forward computes them; every thread of the group gets them.
template <CachePolicy P, int U, int TPR, int BLOCK, int VEC, typename T, typename Math>
__device__ __forceinline__ RowStats<acc_t<T>> group_row_stats(const T* x, int64_t stride_c,
                                                               const RowSplit<VEC>& rs, int lane,
                                                               const Math& math) {
  using Acc = acc_t<T>;
  constexpr int kStep = U * TPR;
  const T neg_inf = storage_neg_inf<T>();
  Fields<Acc, 2> st{{acc_neg_inf<Acc>(), Acc(0)}};
  if constexpr (VEC > 1) {
    T xe[kEdges];
    load_edges<P>(x, rs, lane, neg_inf, xe);
    Acc ye[kEdges];
    math.edge_logits(rs, lane, xe, ye);
    online_lse_add<kEdges>(st.v[0], st.v[1], ye);
  }
  for (int first = lane; first < rs.body_slots; first += kStep) {
    T xv[U][VEC];
    load_step<P, U, TPR>(x, stride_c, rs, first, neg_inf, xv);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool real = first + u * TPR < rs.body_slots;
      Acc yv[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) yv[j] = math.logit_or_padding(to_acc(xv[u][j]), real);
      online_lse_add<VEC>(st.v[0], st.v[1], yv);
    }
  }
  st = group_allreduce<TPR, BLOCK>(st, LseSumOp{});
  return RowStats<Acc>{st.v[0], acc_log(st.v[1])};
}

// Backward: grad_input and/or grad_target from grad_loss, grad_lse and the
// saved lse (p_c = exp(y_c - lse); rows with |lse| >= exact_lse_bound()
// recompute their max and sum first, an extra read of those rows only).
template <typename T, int TPR, int BLOCK, int VEC, bool PROB, bool CAP>
__global__ void __launch_bounds__(BLOCK, (stream_min_blocks<T, BLOCK, PROB>()))
    ce_backward_stream_kernel(const CrossEntropyBackwardParams<T> p, const LossMath<acc_t<T>, CAP> math) {
  static_assert(VEC == 1 || TPR >= VEC, "each lane owns at most one head and one tail element");
  using Acc = acc_t<T>;
  using Sched = RowSchedule<TPR, BLOCK>;
  constexpr int U = stream_unroll<VEC, PROB>();
  constexpr int kStep = U * TPR;

  const int lane = Sched::lane();
  const int64_t rows = p.N * p.D;
  const int C = static_cast<int>(p.C);
  // W = sum_c w_c, precomputed once per launch: it is needed before the first
  // gradient element of every row, and a per-row reduction would re-read all
  // weights for each row.
  Acc weight_sum = static_cast<Acc>(C);
  if (!PROB && math.smoothing && p.weight != nullptr) weight_sum = p.workspace[kWorkspaceWeightSumSlot];
  const bool want_gx = p.grad_input != nullptr;
  const bool want_gt = PROB && p.grad_target != nullptr;
  const T neg_inf = storage_neg_inf<T>();
  const T zero = from_acc<T>(Acc(0));

  for (int64_t base = Sched::first_base(); base < rows; base += Sched::base_step()) {
    const int64_t row = base + Sched::group();
    const bool active = row < rows;
    const RowCoord rc = split_row(active ? row : 0, p.D);
    const T* x = p.input + rc.n * p.input_stride_n + rc.d * p.input_stride_d;
    RowSplit<VEC> rs = RowSplit<VEC>::make(x, C);
    if (!active) rs.clear();
    const int64_t out_offset = rc.n * p.C * p.D + rc.d;  // contiguous (N, C, D)
    const int64_t out_stride = p.D;

    Acc g = Acc(0), g_lse = Acc(0), lse = Acc(0);
    if (active) {
      g = p.grad_loss[rc.n * p.grad_loss_stride_n + rc.d * p.grad_loss_stride_d];
      if (p.grad_lse != nullptr) g_lse = p.grad_lse[rc.n * p.grad_lse_stride_n + rc.d * p.grad_lse_stride_d];
      lse = p.lse[rc.n * p.lse_stride_n + rc.d * p.lse_stride_d];
    }
    RowStats<Acc> stats{lse, Acc(0)};
    // Finite only: an infinite or NaN lse already gives PyTorch's infinities
    // and NaNs through exp(y - lse).
    const bool recompute = active && isfinite(lse) && fabs(lse) >= exact_lse_bound<Acc>();
    if (group_any<TPR, BLOCK>(recompute)) {
      const RowStats<Acc> exact =
          group_row_stats<CachePolicy::kKeep, U, TPR, BLOCK>(x, p.input_stride_c, rs, lane, math);
      if (recompute) stats = exact;
    }

    if constexpr (PROB) {
      const T* t = p.target_prob + rc.n * p.prob_stride_n + rc.d * p.prob_stride_d;
      // V = sum_c u_c, only needed for grad_input (a launch-uniform condition,
      // so every group reaches the reduction).
      Acc v_total = Acc(0);
      if (want_gx) {
        Acc v_sum = Acc(0);
        BlockedSums<blocked_sum_steps(U * VEC), 1> v_blocks;  // as in the forward
        if constexpr (VEC > 1) {
          T te[kEdges];
          load_edges<CachePolicy::kKeep>(t, rs, lane, zero, te);
#pragma unroll
          for (int e = 0; e < kEdges; ++e) {
            const int c = rs.edge_class(lane, e);
            if (c >= 0) v_sum += math.prob_mass(p.weight, c, to_acc(te[e]));
          }
        }
        for (int first = lane; first < rs.body_slots; first += kStep) {
          T tv[U][VEC];
          load_step<CachePolicy::kKeep, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int slot = first + u * TPR;
            if (slot >= rs.body_slots) continue;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
              v_sum += math.prob_mass(p.weight, rs.slot_class(slot) + j, to_acc(tv[u][j]));
          }
          v_blocks.end_step(&v_sum);
        }
        v_blocks.finish(&v_sum);
        v_total = group_sum<TPR, BLOCK>(v_sum);
      }
      if (!active) continue;  // no collectives past this point

      // d/dx_c: RowGradient;  d/dq_c = -g (1 - eps) w_c (y_c - lse), no chain
      // rule (the cap acts on the logits only), y_c - lse from the row's
      // recomputed statistics where it has them (an lse of 1000 is rounded
      // to 6e-5).
      const RowGradient<Acc> grad = math.prob_gradient(g, g_lse, v_total, lse);
      const Acc gt_scale = -g * math.one_minus_eps;
      T* gx = want_gx ? p.grad_input + out_offset : nullptr;
      T* gt = want_gt ? p.grad_target + out_offset : nullptr;
      auto grads_at = [&](T xv, T tv, int c, T& gx_out, T& gt_out) {
        const Logit<Acc> l = math.logit(to_acc(xv));
        if (want_gx)
          gx_out = from_acc<T>(grad.at(stats, l, c, [&] { return math.prob_mass(p.weight, c, to_acc(tv)); }));
        if (want_gt) gt_out = from_acc<T>(gt_scale * class_weight(p.weight, c) * -stats.lse_minus(l.y));
      };
      if constexpr (VEC > 1) {
        T xe[kEdges], te[kEdges] = {zero, zero}, gxe[kEdges] = {zero, zero}, gte[kEdges] = {zero, zero};
        load_edges<CachePolicy::kStream>(x, rs, lane, neg_inf, xe);
        if (want_gx) load_edges<CachePolicy::kStream>(t, rs, lane, zero, te);
#pragma unroll
        for (int e = 0; e < kEdges; ++e) {
          const int c = rs.edge_class(lane, e);
          if (c >= 0) grads_at(xe[e], te[e], c, gxe[e], gte[e]);
        }
        if (want_gx) store_edges<CachePolicy::kStream>(gx, rs, lane, gxe);
        if (want_gt) store_edges<CachePolicy::kStream>(gt, rs, lane, gte);
      }
      for (int first = lane; first < rs.body_slots; first += kStep) {
        T xv[U][VEC];
        T tv[U][VEC];
        load_step<CachePolicy::kStream, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv);
        if (want_gx) {
          load_step<CachePolicy::kStream, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
        } else {
          fill_step(tv, zero);
        }
        T gxv[U][VEC];
        T gtv[U][VEC];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int slot = first + u * TPR;
          if (slot >= rs.body_slots) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            grads_at(xv[u][j], tv[u][j], rs.slot_class(slot) + j, gxv[u][j], gtv[u][j]);
        }
        if (want_gx) store_step<CachePolicy::kStream, U, TPR>(gx, out_stride, rs, first, gxv);
        if (want_gt) store_step<CachePolicy::kStream, U, TPR>(gt, out_stride, rs, first, gtv);
      }
    } else {
      if (!active || !want_gx) continue;
      T* gx = p.grad_input + out_offset;
      const int64_t y = read_class_target(p.target, rc.n * p.target_stride_n + rc.d * p.target_stride_d,
                                          p.ignore_index, p.C);
      const Acc w_target = y >= 0 ? class_weight(p.weight, y) : Acc(0);
      const RowGradient<Acc> grad = math.class_gradient(g, g_lse, y, w_target, weight_sum, lse);
      auto grad_at = [&](T xv, int c) -> T {
        if (grad.zero) return zero;
        auto mass = [&] { return class_weight(p.weight, c); };
        return from_acc<T>(grad.at(stats, math.logit(to_acc(xv)), c, mass));
      };
      if constexpr (VEC > 1) {
        T xe[kEdges] = {zero, zero};
        if (!grad.zero) load_edges<CachePolicy::kStream>(x, rs, lane, neg_inf, xe);
#pragma unroll
        for (int e = 0; e < kEdges; ++e) {
          const int c = rs.edge_class(lane, e);
          if (c >= 0) xe[e] = grad_at(xe[e], c);
        }
        store_edges<CachePolicy::kStream>(gx, rs, lane, xe);
      }
      for (int first = lane; first < rs.body_slots; first += kStep) {
        T xv[U][VEC];
        if (grad.zero) {
          fill_step(xv, zero);
        } else {
          load_step<CachePolicy::kStream, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int slot = first + u * TPR;
          if (slot >= rs.body_slots) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j) xv[u][j] = grad_at(xv[u][j], rs.slot_class(slot) + j);
        }
        store_step<CachePolicy::kStream, U, TPR>(gx, out_stride, rs, first, xv);
      }
    }
  }
}

}  // namespace cuda
}  // namespace fused_ce
