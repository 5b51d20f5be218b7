// The loss of the operator spec for one row, shared by every row kernel (the
// streaming forward and backward and the register-resident forward) so the
// formulas exist once: the softcap transform of the logits, the loss from
// the row statistics, and the gradient of one element.
//
// Notation (operator spec):
//   y_c = s tanh(x_c / s) with softcap s (y_c = x_c without), m = max_c y_c,
//   log_s = log sum_c exp(y_c - m), lse = m + log_s, p_c = exp(y_c - lse),
//   eps = label smoothing, w_c = class weight (1 without), W = sum_c w_c,
//   z = z_loss; class target t, or probabilities q_c with
//   q'_c = (1 - eps) q_c + eps / C and u_c = w_c q'_c, V = sum_c u_c.
// The weighted sums over a row are taken relative to a logit of the row,
// `ref` (y_t, or y_0 for probabilities), so a large common offset of the
// logits does not cancel catastrophically: sum_c v_c (lse - y_c) is
// evaluated as (sum_c v_c) (lse - ref) - sum_c v_c (y_c - ref).
#pragma once

#include <cstdint>

#include "ce_common.cuh"
#include "ce_memory.cuh"

namespace fused_ce {
namespace cuda {

// A logit after the softcap, y, and dy/dx for the chain rule.
template <typename Acc>
struct Logit {
  Acc y;
  Acc slope;
};

// A row's log-sum-exp as (max, log of the rescaled sum).  The backward,
// which only has the saved lse, uses (lse, 0).
template <typename Acc>
struct RowStats {
  Acc max;
  Acc log_sum;

  __device__ __forceinline__ Acc lse() const { return max + log_sum; }
  // lse - v, grouped as (max - v) + log_sum: when v is the maximum and the
  // prediction confident the result is the tiny log_sum, which lse - v
  // would round away against a large lse.
  __device__ __forceinline__ Acc lse_minus(Acc v) const { return (max - v) + log_sum; }
  // p = exp((y - max) - log_sum): exact in y - max, unlike y - lse with lse
  // rounded at the magnitude of the logits.
  __device__ __forceinline__ Acc prob(Acc y) const { return fast_exp((y - max) - log_sum); }
};

// The gradient of one row with respect to its logits:
//   dL/dy_c = a p_c - e u_c - b [c == target]
// with u_c = w_c for class targets (label smoothing; e = 0 without) and
// u_c = w_c q'_c for probabilities; dL/dx_c = dL/dy_c * dy_c/dx_c.
template <typename Acc>
struct RowGradient {
  Acc a = Acc(0), b = Acc(0), e = Acc(0);
  // A class index (< 2^30, kMaxClasses) or -1: compared with every element's
  // class as a 32-bit int, which a 64-bit compare per element would double.
  int target = -1;
  // e u_c is part of the gradient; otherwise u_c (a weight read) is skipped.
  bool has_mass = false;
  // Every element is exactly 0 (an ignored row without an lse gradient and
  // with a finite lse): the kernels write zeros without reading the logits.
  bool zero = false;

  // dL/dx_c from the capped logit l of class c; mass() returns u_c.
  template <typename MassFn>
  __device__ __forceinline__ Acc at(const RowStats<Acc>& st, const Logit<Acc>& l, int c, MassFn mass) const {
    Acc grad = a * st.prob(l.y);
    if (has_mass) grad -= e * mass();
    if (c == target) grad -= b;
    return grad * l.slope;
  }
};

// The operator's scalar options in the accumulation type, with the formulas
// that use them.  Built once on the host by the launcher and passed to the
// kernels as an argument: kernel arguments live in constant memory, so these
// constants cost no registers (the largest register-resident configurations
// have none to spare).  CAP (softcap on) is a compile-time switch because
// the cap costs a tanh per logit read: without it the kernels are what they
// were before the option existed.
template <typename Acc, bool CAP>
struct LossMath {
  Acc one_minus_eps;
  Acc eps_per_class;
  bool smoothing;  // eps > 0
  Acc z_loss;
  bool has_z_loss;  // z > 0 (also keeps 0 * inf out of rows with an infinite lse)
  Acc cap;
  Acc inv_cap;  // 1 / s, so the cap costs a multiply instead of a division

  // Host side (IEEE division; the reciprocal is rounded once from double).
  static LossMath make(double label_smoothing, double z_loss, double softcap, int64_t num_classes) {
    LossMath m;
    const Acc eps = static_cast<Acc>(label_smoothing);
    m.one_minus_eps = Acc(1) - eps;
    m.eps_per_class = eps / static_cast<Acc>(num_classes > 0 ? num_classes : 1);
    m.smoothing = eps > Acc(0);
    m.z_loss = static_cast<Acc>(z_loss);
    m.has_z_loss = m.z_loss > Acc(0);
    m.cap = CAP ? static_cast<Acc>(softcap) : Acc(0);
    m.inv_cap = CAP ? static_cast<Acc>(1.0 / softcap) : Acc(0);
    return m;
  }

  // y = s tanh(x / s) and dy/dx = 1 - tanh(x / s)^2 (= 1 - (y / s)^2; the fma
  // keeps it accurate where tanh is close to 1).
  __device__ __forceinline__ Logit<Acc> logit(Acc x) const {
    if constexpr (CAP) {
      const Acc t = accurate_tanh(x * inv_cap);
      return Logit<Acc>{cap * t, acc_fma(-t, t, Acc(1))};
    } else {
      return Logit<Acc>{x, Acc(1)};
    }
  }

  // The capped logit of a loaded element, or -inf for a padding slot.  The
  // padding is loaded as -inf so that the log-sum-exp ignores it, but the cap
  // would turn it into -s; a real -inf logit does become -s.
  __device__ __forceinline__ Acc logit_or_padding(Acc x, bool real) const {
    if constexpr (CAP) {
      const Acc y = logit(x).y;
      return real ? y : acc_neg_inf<Acc>();
    } else {
      return x;
    }
  }

  // The capped logits of a lane's head / tail elements (RowSplit edges).
  template <int VEC, typename T>
  __device__ __forceinline__ void edge_logits(const RowSplit<VEC>& rs, int lane, const T (&xe)[kEdges],
                                              Acc (&ye)[kEdges]) const {
#pragma unroll
    for (int e = 0; e < kEdges; ++e) ye[e] = logit_or_padding(to_acc(xe[e]), rs.edge_class(lane, e) >= 0);
  }

  // u_c = w_c q'_c for a probability target q.
  template <typename T>
  __device__ __forceinline__ Acc prob_mass(const T* weight, int c, Acc q) const {
    return class_weight(weight, c) * (q * one_minus_eps + eps_per_class);
  }

  // sum_c m_c (lse - y_c) from its parts relative to ref, one of the row's
  // logits: M (lse - ref) - dev_sum, with M = sum_c m_c and dev_sum =
  // sum_c m_c (y_c - ref). Logits that span more than the type's range
  // (3e38 and -3e38 in float32) overflow both parts to +inf when ref is the
  // low one, and inf - inf is NaN; the sum itself, whose terms are all >= 0,
  // is then +inf, PyTorch's result, as long as ref's own term m_ref (lse -
  // ref) is one of them (m_ref > 0; with m_ref = 0, PyTorch's 0 * inf is NaN
  // too). A NaN of the row's own (a NaN logit or mass, inf - inf in lse)
  // stays NaN.
  __device__ __forceinline__ Acc mass_weighted_gaps(const RowStats<Acc>& st, Acc ref, Acc ref_mass, Acc mass_sum,
                                                    Acc dev_sum) const {
    const Acc sum = mass_sum * st.lse_minus(ref) - dev_sum;
    if (isnan(sum) && !isnan(st.lse()) && !isnan(mass_sum) && ref_mass > Acc(0)) return -acc_neg_inf<Acc>();
    return sum;
  }

  // Loss of a row with class target t (not ignored), ref = y_t:
  //   (1 - eps) w_t (lse - y_t) + eps/C sum_c w_c (lse - y_c) + z w_t lse^2
  // dev_sum = sum_c w_c (y_c - ref), weight_sum = W (both only with smoothing).
  __device__ __forceinline__ Acc class_loss(const RowStats<Acc>& st, Acc y_target, Acc w_target, Acc ref,
                                            Acc dev_sum, Acc weight_sum) const {
    Acc loss = one_minus_eps * w_target * st.lse_minus(y_target);
    if (smoothing) loss += eps_per_class * mass_weighted_gaps(st, ref, w_target, weight_sum, dev_sum);
    if (has_z_loss) loss += z_loss * w_target * square(st.lse());
    return loss;
  }

  // Loss of a row with probability targets, ref = y_0 (of mass u_0):
  //   sum_c u_c (lse - y_c) + z lse^2
  // mass_sum = V, dev_sum = sum_c u_c (y_c - ref).
  __device__ __forceinline__ Acc prob_loss(const RowStats<Acc>& st, Acc ref, Acc ref_mass, Acc mass_sum,
                                           Acc dev_sum) const {
    Acc loss = mass_weighted_gaps(st, ref, ref_mass, mass_sum, dev_sum);
    if (has_z_loss) loss += z_loss * square(st.lse());
    return loss;
  }

  // Class targets, upstream gradients g (of the loss) and g_lse (of lse):
  //   a = g ((1 - eps) w_t + eps W / C + 2 z w_t lse) + g_lse,
  //   b = g (1 - eps) w_t,  e = g eps / C.
  // An ignored row (target < 0) has g = 0: only g_lse p_c remains.  Like
  // PyTorch's 0 * p_c, that is NaN wherever p_c is, which needs a non-finite
  // lse (a NaN in the row, or +inf and -inf logits); only rows with a finite
  // lse are zero-filled without reading them.
  __device__ __forceinline__ RowGradient<Acc> class_gradient(Acc g, Acc g_lse, int64_t target, Acc w_target,
                                                            Acc weight_sum, Acc lse) const {
    RowGradient<Acc> r;
    if (target < 0) {
      r.a = g_lse;
      r.zero = g_lse == Acc(0) && isfinite(lse);
      return r;
    }
    Acc coef = one_minus_eps * w_target;
    if (smoothing) coef += eps_per_class * weight_sum;
    if (has_z_loss) coef += Acc(2) * z_loss * w_target * lse;
    r.a = g * coef + g_lse;
    r.b = g * one_minus_eps * w_target;
    r.e = g * eps_per_class;
    r.target = static_cast<int>(target);
    r.has_mass = smoothing;
    return r;
  }

  // Probability targets: a = g (V + 2 z lse) + g_lse, e = g, b = 0.
  __device__ __forceinline__ RowGradient<Acc> prob_gradient(Acc g, Acc g_lse, Acc mass_sum, Acc lse) const {
    RowGradient<Acc> r;
    Acc coef = mass_sum;
    if (has_z_loss) coef += Acc(2) * z_loss * lse;
    r.a = g * coef + g_lse;
    r.e = g;
    r.has_mass = true;
    return r;
  }

 private:
  __device__ __forceinline__ static Acc square(Acc v) { return v * v; }
};

}  // namespace cuda
}  // namespace fused_ce
