// Double backward of the C++ loss node (autograd.cpp): differentiating the
// gradient it hands out (create_graph=True: gradient penalties, MAML,
// Hessian-vector products), without keeping the logits.
//
// The node saves the gradient of the reduced loss, not the logits. Per
// element (row) of the loss, with p = softmax(x), that gradient is
//   g = s (A p - b),
// s the reduction's scale (1 / total_weight for the mean, 1 for the sum), A
// a per-row scalar and b a per-row vector that only depend on the target,
// the class weights, the options and (with z_loss) the log-sum-exp:
//   class target t:  A = (1 - eps) w_t + eps/C sum_c w_c + 2 z w_t lse,
//                    b = (1 - eps) w_t e_t + eps/C w     (0 and 0 if ignored)
//   probabilities q: A = sum_c w_c q'_c + 2 z lse, b = w q',
//                    q' = (1 - eps) q + eps/C
// and the row's Hessian is H = A (diag(p) - p p^T) + Z p p^T, with
// Z = 2 z w_t (class target) or 2 z (probabilities). So u = A p = g / s + b
// is known from what the node saved, and for a vector v
//   H v = u * v - u (u.v) / A + Z (u.v) u / A^2,
// which gives the Hessian-vector product without the logits. Rows with
// A = 0 contribute nothing: right without z_loss (their gradient and Hessian
// are 0); with z_loss a row whose lse makes A exactly 0 would still have the
// Z p p^T term, which is lost with p (and near that point the recovery is
// ill-conditioned). Precision: p comes from the saved gradient, so for 16-bit
// inputs the target class of a row with a small p_t (where u_t = g_t / s +
// b_t cancels) has the gradient's 8-11 bits, not float32's. The softcap
// makes the Hessian depend on the logits themselves; the node does not offer
// a second derivative for it.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>

#include <vector>

#include "cross_entropy.h"

namespace fused_ce {

// What the double backward needs, saved by the loss node's forward.
struct SavedGradient {
  at::Tensor gradient;      // d(reduced loss)/d(input) for an upstream gradient of 1, input's sizes
  at::Tensor target;        // canonical (N, D) int64 class indices or (N, C, D) probabilities
  at::Tensor weight;        // (C) class weights in the input's dtype, or undefined
  at::Tensor lse;           // (N, D) in the accumulate type; only read with z_loss
  at::Tensor total_weight;  // 0-dim, accumulate type: the mean's denominator
  LossOptions options;
  Reduction reduction;      // Mean or Sum
  // Version counters of target and weight at the forward: the second
  // derivative refuses operands modified in place since, as a saved
  // tensor's unpacking would.
  int64_t target_version = 0;
  int64_t weight_version = 0;
};

// Raises PyTorch's in-place modification error if target or weight changed
// since the forward.
void check_unmodified(const SavedGradient& saved);

// grad_output * saved.gradient, as a tensor autograd can differentiate again:
// with respect to the input (through `input_edge`, the loss node's edge to
// its input) and to grad_output (0-dim). A third differentiation raises.
at::Tensor differentiable_gradient(SavedGradient saved, const at::Tensor& grad_output,
                                   torch::autograd::Edge input_edge);

// `value` (a tensor without history) as the output of a node that raises
// `message` when autograd differentiates through it: the derivatives not
// offered. The node's edges are those of what `value` depends on, so that
// torch.autograd.grad with respect to any of them reaches it and raises
// (rather than leaving the term out); with no edges it can only be reached
// by a .backward() through `value`.
at::Tensor refuse_differentiation(const at::Tensor& value, const char* message,
                                  torch::autograd::edge_list depends_on);

}  // namespace fused_ce
