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
//             write with no reduction at all; ignored rows are zero-filled
//             without reading the logits.  Probability targets first reduce
//             sum_c w_c t'_c (one read of the targets).
//
// Notation follows DESIGN.md section 2: eps = label smoothing,
// t'_c = t_c (1 - eps) + eps / C, W = sum_c w_c, v_c = w_c t'_c.
#pragma once

#include <cstdint>

#include "ce_common.cuh"
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

// Forward (and forward_with_grad).  PROB selects probability targets.
template <typename T, int TPR, int BLOCK, int VEC, bool PROB>
__global__ void __launch_bounds__(BLOCK, (stream_min_blocks<T, BLOCK, PROB>()))
    ce_forward_stream_kernel(const CrossEntropyForwardParams<T> p) {
  static_assert(VEC == 1 || TPR >= VEC, "each lane owns at most one head and one tail element");
  using Acc = acc_t<T>;
  using Sched = RowSchedule<TPR, BLOCK>;
  constexpr int U = stream_unroll<VEC, PROB>();
  constexpr int kStep = U * TPR;

  const int lane = Sched::lane();
  const int64_t rows = p.N * p.D;
  const int C = static_cast<int>(p.C);
  const Acc eps = static_cast<Acc>(p.label_smoothing);
  const Acc one_minus_eps = Acc(1) - eps;
  const Acc eps_per_class = eps / static_cast<Acc>(C);
  const bool smoothing = eps > Acc(0);
  const bool extras = PROB || smoothing;
  const bool with_grad = p.grad_input != nullptr;
  // forward_with_grad: 1 / total_weight (mean) or 1 (sum), computed on the
  // device by the total-weight kernels that ran just before on this stream.
  const Acc grad_scale = with_grad ? p.workspace[kWorkspaceScaleSlot] : Acc(0);
  const T neg_inf = storage_neg_inf<T>();
  const T zero = from_acc<T>(Acc(0));

  for (int64_t base = Sched::first_base(); base < rows; base += Sched::base_step()) {
    const int64_t row = base + Sched::group();
    const bool active = row < rows;
    const RowCoord rc = split_row(active ? row : 0, p.D);
    const T* x = p.input + rc.n * p.input_stride_n + rc.d * p.input_stride_d;
    RowSplit<VEC> rs = RowSplit<VEC>::make(x, C);
    if (!active) rs.clear();  // idle groups still join the reduction

    const T* t = nullptr;
    int64_t y = -1;
    Acc x_target = Acc(0);
    if constexpr (PROB) {
      t = p.target_prob + rc.n * p.prob_stride_n + rc.d * p.prob_stride_d;
    } else if (active) {
      y = read_class_target(p.target, rc.n * p.target_stride_n + rc.d * p.target_stride_d,
                            p.ignore_index, p.C);
      if (y >= 0 && (lane == 0 || smoothing))
        x_target = to_acc(load_global<CachePolicy::kKeep>(x + y * p.input_stride_c));
    }
    // The weighted sums of the smoothing / soft-target term are taken
    // relative to a logit of the row, `ref` (x_y, or x_0 for soft targets),
    // so a large common offset of the logits does not cancel catastrophically
    // in sum v_c (x_c - lse) = sum v_c (x_c - ref) - V (lse - ref).
    Acc ref = Acc(0);
    if constexpr (PROB) {
      if (active) ref = to_acc(load_global<CachePolicy::kKeep>(x));
    } else {
      ref = x_target;
    }
    if (!isfinite(ref)) ref = Acc(0);

    // Pass 1.  st = (running max, rescaled sum of exp, s2, s3) with
    //   class targets, smoothing on:  s2 = sum_c w_c (x_c - ref), s3 = W = sum_c w_c
    //   probability targets:          s2 = V = sum_c v_c,  s3 = sum_c v_c (x_c - ref)
    Fields<Acc, 4> st{{acc_neg_inf<Acc>(), Acc(0), Acc(0), Acc(0)}};
    auto add_extras = [&](Acc xa, int c, T tv) {
      const Acc w = class_weight(p.weight, c);
      if constexpr (PROB) {
        const Acc v = w * (to_acc(tv) * one_minus_eps + eps_per_class);
        st.v[2] += v;
        st.v[3] += v * (xa - ref);
      } else {
        st.v[2] += w * (xa - ref);
        st.v[3] += w;
      }
    };
    if constexpr (VEC > 1) {
      T xe[kEdges];
      T te[kEdges] = {zero, zero};
      load_edges<CachePolicy::kKeep>(x, rs, lane, neg_inf, xe);
      if constexpr (PROB) load_edges<CachePolicy::kKeep>(t, rs, lane, zero, te);
      online_lse_add<kEdges>(st.v[0], st.v[1], xe);
      if (extras) {
#pragma unroll
        for (int e = 0; e < kEdges; ++e) {
          const int c = rs.edge_class(lane, e);
          if (c >= 0) add_extras(to_acc(xe[e]), c, te[e]);
        }
      }
    }
    for (int first = lane; first < rs.body_slots; first += kStep) {
      T xv[U][VEC];
      T tv[U][VEC];
      load_step<CachePolicy::kKeep, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv);
      if constexpr (PROB) load_step<CachePolicy::kKeep, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
      online_lse_add<U * VEC>(st.v[0], st.v[1], &xv[0][0]);
      if (extras) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int slot = first + u * TPR;
          if (slot >= rs.body_slots) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j) add_extras(to_acc(xv[u][j]), rs.slot_class(slot) + j, PROB ? tv[u][j] : zero);
        }
      }
    }
    st = group_allreduce<TPR, BLOCK>(st, LseSumOp{});

    // lse = max + log_s.  The losses group (max - x) + log_s first: when the
    // target is the maximum and the prediction confident, the loss is the
    // tiny log_s, which lse - x_y would round away against a large lse.
    const Acc log_s = acc_log(st.v[1]);
    const Acc lse = st.v[0] + log_s;
    // Without weights W is exactly C (not a float sum of ones).
    const Acc weight_sum = p.weight != nullptr ? st.v[3] : static_cast<Acc>(C);
    const Acc w_target = (!PROB && y >= 0) ? class_weight(p.weight, y) : Acc(0);

    if (!active) continue;  // no collectives past this point
    if (lane == 0) {
      Acc loss;
      if constexpr (PROB) {
        // -sum_c v_c (x_c - lse)
        loss = st.v[2] * ((st.v[0] - ref) + log_s) - st.v[3];
      } else if (y < 0) {
        loss = Acc(0);
      } else {
        loss = one_minus_eps * w_target * ((st.v[0] - x_target) + log_s);
        // -sum_c w_c (x_c - lse)
        if (smoothing) loss += eps_per_class * (weight_sum * ((st.v[0] - ref) + log_s) - st.v[2]);
      }
      p.loss[row] = loss;
      p.lse[row] = lse;
    }
    if (!with_grad) continue;

    // Pass 2 (forward_with_grad): the gradient of the reduced loss.  Gradient
    // rows are contiguous (N, C, D): class stride D.
    //   class targets:        g (a p_c - b [c == y] - e w_c),
    //                         a = (1 - eps) w_y + eps W / C, b = (1 - eps) w_y, e = eps / C
    //   probability targets:  g (V p_c - v_c),  V = sum_c v_c
    T* gx = p.grad_input + rc.n * p.C * p.D + rc.d;
    const int64_t gx_stride = p.D;
    const bool zero_row = !PROB && y < 0;  // ignored: exact zeros
    const Acc ga = PROB ? grad_scale * st.v[2]
                        : grad_scale * (one_minus_eps * w_target +
                                        (smoothing ? eps_per_class * weight_sum : Acc(0)));
    const Acc gb = grad_scale * one_minus_eps * w_target;
    const Acc ge = grad_scale * eps_per_class;
    auto grad_at = [&](T xv, int c, T tv) -> T {
      if (zero_row) return zero;
      // p_c = exp((x_c - max) - log_s): exact in x_c - max, unlike x_c - lse
      // with lse rounded at the magnitude of the logits.
      Acc grad = ga * fast_exp((to_acc(xv) - st.v[0]) - log_s);
      if constexpr (PROB) {
        grad -= grad_scale * class_weight(p.weight, c) * (to_acc(tv) * one_minus_eps + eps_per_class);
      } else {
        if (smoothing) grad -= ge * class_weight(p.weight, c);
        if (c == y) grad -= gb;
      }
      return from_acc<T>(grad);
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
    for (int first = lane; first < rs.body_slots; first += kStep) {
      T xv[U][VEC];
      T tv[U][VEC];
      if (zero_row) {
        fill_step(xv, zero);
      } else {
        load_step<CachePolicy::kStream, U, TPR>(x, p.input_stride_c, rs, first, neg_inf, xv);
        if constexpr (PROB) load_step<CachePolicy::kStream, U, TPR>(t, p.prob_stride_c, rs, first, zero, tv);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int slot = first + u * TPR;
        if (slot >= rs.body_slots) continue;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          xv[u][j] = grad_at(xv[u][j], rs.slot_class(slot) + j, PROB ? tv[u][j] : zero);
      }
      store_step<CachePolicy::kStream, U, TPR>(gx, gx_stride, rs, first, xv);
    }
  }
}

// Backward: grad_input and/or grad_target from grad_loss and the saved lse.
template <typename T, int TPR, int BLOCK, int VEC, bool PROB>
__global__ void __launch_bounds__(BLOCK, (stream_min_blocks<T, BLOCK, PROB>()))
    ce_backward_stream_kernel(const CrossEntropyBackwardParams<T> p) {
  static_assert(VEC == 1 || TPR >= VEC, "each lane owns at most one head and one tail element");
  using Acc = acc_t<T>;
  using Sched = RowSchedule<TPR, BLOCK>;
  constexpr int U = stream_unroll<VEC, PROB>();
  constexpr int kStep = U * TPR;

  const int lane = Sched::lane();
  const int64_t rows = p.N * p.D;
  const int C = static_cast<int>(p.C);
  const Acc eps = static_cast<Acc>(p.label_smoothing);
  const Acc one_minus_eps = Acc(1) - eps;
  const Acc eps_per_class = eps / static_cast<Acc>(C);
  const bool smoothing = eps > Acc(0);
  // W = sum_c w_c, precomputed once per launch: it is needed before the first
  // gradient element of every row, and a per-row reduction would re-read all
  // weights for each row.
  Acc weight_sum = static_cast<Acc>(C);
  if (!PROB && smoothing && p.weight != nullptr) weight_sum = p.workspace[kWorkspaceWeightSumSlot];
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

    Acc g = Acc(0), lse = Acc(0);
    if (active) {
      g = p.grad_loss[rc.n * p.grad_loss_stride_n + rc.d * p.grad_loss_stride_d];
      lse = p.lse[rc.n * p.lse_stride_n + rc.d * p.lse_stride_d];
    }

    if constexpr (PROB) {
      const T* t = p.target_prob + rc.n * p.prob_stride_n + rc.d * p.prob_stride_d;
      auto v_at = [&](T tv, int c) -> Acc {
        return class_weight(p.weight, c) * (to_acc(tv) * one_minus_eps + eps_per_class);
      };
      // V = sum_c v_c, only needed for grad_input (a launch-uniform condition,
      // so every group reaches the reduction).
      Acc v_total = Acc(0);
      if (want_gx) {
        Acc v_sum = Acc(0);
        if constexpr (VEC > 1) {
          T te[kEdges];
          load_edges<CachePolicy::kKeep>(t, rs, lane, zero, te);
#pragma unroll
          for (int e = 0; e < kEdges; ++e) {
            const int c = rs.edge_class(lane, e);
            if (c >= 0) v_sum += v_at(te[e], c);
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
            for (int j = 0; j < VEC; ++j) v_sum += v_at(tv[u][j], rs.slot_class(slot) + j);
          }
        }
        v_total = group_sum<TPR, BLOCK>(v_sum);
      }
      if (!active) continue;  // no collectives past this point

      // d/dx_c = g (V p_c - v_c),  d/dt_c = -g (1 - eps) w_c (x_c - lse)
      const Acc gv = g * v_total;
      const Acc gt_scale = -g * one_minus_eps;
      T* gx = want_gx ? p.grad_input + out_offset : nullptr;
      T* gt = want_gt ? p.grad_target + out_offset : nullptr;
      auto grads_at = [&](T xv, T tv, int c, T& gx_out, T& gt_out) {
        const Acc log_p = to_acc(xv) - lse;
        if (want_gx) gx_out = from_acc<T>(gv * fast_exp(log_p) - g * v_at(tv, c));
        if (want_gt) gt_out = from_acc<T>(gt_scale * class_weight(p.weight, c) * log_p);
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
          for (int j = 0; j < VEC; ++j) grads_at(xv[u][j], tv[u][j], rs.slot_class(slot) + j, gxv[u][j], gtv[u][j]);
        }
        if (want_gx) store_step<CachePolicy::kStream, U, TPR>(gx, out_stride, rs, first, gxv);
        if (want_gt) store_step<CachePolicy::kStream, U, TPR>(gt, out_stride, rs, first, gtv);
      }
    } else {
      if (!active || !want_gx) continue;
      T* gx = p.grad_input + out_offset;
      const int64_t y = read_class_target(p.target, rc.n * p.target_stride_n + rc.d * p.target_stride_d,
                                          p.ignore_index, p.C);
      // Ignored rows get exact zeros and their logits are not read.
      const bool zero_row = y < 0;
      // g (a p_c - b [c == y] - e w_c), see the forward kernel.
      const Acc w_target = zero_row ? Acc(0) : class_weight(p.weight, y);
      const Acc ga = g * (one_minus_eps * w_target + (smoothing ? eps_per_class * weight_sum : Acc(0)));
      const Acc gb = g * one_minus_eps * w_target;
      const Acc ge = g * eps_per_class;
      auto grad_at = [&](T xv, int c) -> T {
        if (zero_row) return zero;
        Acc grad = ga * fast_exp(to_acc(xv) - lse);
        if (smoothing) grad -= ge * class_weight(p.weight, c);
        if (c == y) grad -= gb;
        return from_acc<T>(grad);
      };
      if constexpr (VEC > 1) {
        T xe[kEdges] = {zero, zero};
        if (!zero_row) load_edges<CachePolicy::kStream>(x, rs, lane, neg_inf, xe);
#pragma unroll
        for (int e = 0; e < kEdges; ++e) {
          const int c = rs.edge_class(lane, e);
          if (c >= 0) xe[e] = grad_at(xe[e], c);
        }
        store_edges<CachePolicy::kStream>(gx, rs, lane, xe);
      }
      for (int first = lane; first < rs.body_slots; first += kStep) {
        T xv[U][VEC];
        if (zero_row) {
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
