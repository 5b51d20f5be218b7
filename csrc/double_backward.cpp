// The double backward of the C++ loss node: see double_backward.h for the
// maths.

#include "double_backward.h"

#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <limits>
#include <mutex>
#include <string>
#include <utility>

#include "autograd_node.h"
#include "error_message.h"

namespace fused_ce {
namespace {

using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::variable_list;

// Sizes of the canonical (N, C, D) problem of an input (N, C, d1, ..., dk).
struct Canonical {
  int64_t n, c, d;
};

Canonical canonical_sizes(at::IntArrayRef sizes) {
  return {sizes[0], sizes[1], c10::multiply_integers(sizes.slice(2))};
}

// A (N, 1, D), b (N, C, D) and Z (N, 1, D) or 0-dim of double_backward.h, in
// the accumulate type; `counts` (N, 1, D) marks the rows of class targets
// that are not ignored (undefined for probabilities: every row counts).
struct RowTerms {
  at::Tensor A, b, Z, counts;
};

RowTerms row_terms(const SavedGradient& s, Canonical k, at::ScalarType acc) {
  const LossOptions& o = s.options;
  const double eps = o.label_smoothing;
  const auto options = s.gradient.options().dtype(acc);
  const at::Tensor weight_acc = s.weight.defined() ? s.weight.to(acc) : at::Tensor();
  const at::Tensor w = weight_acc.defined() ? weight_acc.view({1, k.c, 1}) : at::Tensor();
  const at::Tensor lse = o.z_loss != 0 ? s.lse.to(acc).view({k.n, 1, k.d}) : at::Tensor();
  RowTerms r;
  if (s.target.is_floating_point()) {
    at::Tensor q = s.target.to(acc);
    if (eps != 0) q = q * (1 - eps) + eps / double(k.c);
    r.b = w.defined() ? q * w : q;
    r.A = r.b.sum(1, /*keepdim=*/true);
    r.Z = at::scalar_tensor(2 * o.z_loss, options);
    if (o.z_loss != 0) r.A = r.A + lse * (2 * o.z_loss);
    return r;
  }
  r.counts = (s.target != o.ignore_index).view({k.n, 1, k.d});
  const at::Tensor t = at::where(r.counts, s.target.view({k.n, 1, k.d}), 0);
  at::Tensor w_t = w.defined() ? weight_acc.index_select(0, t.reshape(-1)).view({k.n, 1, k.d})
                               : at::ones({k.n, 1, k.d}, options);
  w_t = at::where(r.counts, w_t, 0);
  r.A = w_t * (1 - eps);
  if (eps != 0) {
    // eps/C sum_c w_c on every counted row, and eps/C w_c in b.
    const at::Tensor smoothing = (w.defined() ? w : at::ones({1, k.c, 1}, options)) * (eps / double(k.c));
    r.A = r.A + at::where(r.counts, smoothing.sum(1, /*keepdim=*/true), 0);
    r.b = at::where(r.counts, smoothing, 0).expand({k.n, k.c, k.d}).contiguous();
  } else {
    r.b = at::zeros({k.n, k.c, k.d}, options);
  }
  r.b.scatter_add_(1, t, w_t * (1 - eps));
  r.Z = w_t * (2 * o.z_loss);
  if (o.z_loss != 0) r.A = r.A + r.Z * at::where(r.counts, lse, 0);
  return r;
}

// d/d(input) of <v, grad_output * gradient>: grad_output * s * H v per row.
at::Tensor hessian_vector_product(const SavedGradient& s, const at::Tensor& v, const at::Tensor& grad_output,
                                  at::IntArrayRef input_sizes) {
  const Canonical k = canonical_sizes(input_sizes);
  const at::ScalarType acc = accumulate_type(s.gradient.scalar_type());
  const bool mean = s.reduction == Reduction::Mean;
  const RowTerms r = row_terms(s, k, acc);
  const at::Tensor g = s.gradient.reshape({k.n, k.c, k.d}).to(acc);
  const at::Tensor vv = v.reshape({k.n, k.c, k.d}).to(acc);
  // u = A p = g / s + b; 1 / s is total_weight for the mean (a product: it may be 0).
  const at::Tensor u = (mean ? g * s.total_weight : g) + r.b;
  const at::Tensor uv = (u * vv).sum(1, /*keepdim=*/true);
  const at::Tensor inv_a = at::where(r.A != 0, r.A.reciprocal(), 0);
  // H v = u * v + u (u.v) (Z / A^2 - 1 / A)
  at::Tensor hv = u * vv + u * (uv * inv_a * (r.Z * inv_a - 1));
  hv = hv * (mean ? grad_output.to(acc) / s.total_weight : grad_output.to(acc));
  // Ignored rows: exactly 0, as in PyTorch, also where the scale is inf (a
  // mean over no counted element).
  if (r.counts.defined()) hv = at::where(r.counts, hv, 0);
  return hv.to(s.gradient.scalar_type()).reshape(input_sizes);
}

// d/d(grad_output) of <v, grad_output * gradient>: <v, gradient>. PyTorch
// divides by total_weight last, so a mean over no counted element (whose
// gradient is 0) gives NaN; so does this.
at::Tensor upstream_derivative(const SavedGradient& s, const at::Tensor& v, const at::Tensor& grad_output) {
  const at::ScalarType acc = accumulate_type(s.gradient.scalar_type());
  at::Tensor d = (v.to(acc) * s.gradient.to(acc)).sum();
  if (s.reduction == Reduction::Mean)
    d = at::where(s.total_weight != 0, d, std::numeric_limits<double>::quiet_NaN());
  return d.to(grad_output.scalar_type()).reshape(grad_output.sizes());
}

// The node behind the gradient handed out with create_graph=True. Its
// inputs (next edges) are the loss's input and grad_output.
class CrossEntropyGradientBackward : public Node {
 public:
  CrossEntropyGradientBackward(SavedGradient saved, at::Tensor grad_output, std::vector<int64_t> input_sizes)
      : saved_(std::move(saved)), grad_output_(std::move(grad_output)), input_sizes_(std::move(input_sizes)) {}

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as autograd's own nodes: a graph may be shared by threads
    FUSED_CE_CHECK(saved_.gradient.defined(),
                   "fused_ce.cross_entropy: trying to differentiate the loss's gradient a second time, but "
                   "its saved tensors have been freed; use retain_graph=True the first time");
    variable_list out(2);
    const at::Tensor& v = grads[0];
    if (!v.defined()) return out;
    check_unmodified(saved_);
    const bool create_graph = at::GradMode::is_enabled();
    {
      at::NoGradGuard no_grad;
      if (task_should_compute_output(0))
        out[0] = hessian_vector_product(saved_, v, grad_output_, input_sizes_);
      if (task_should_compute_output(1)) out[1] = upstream_derivative(saved_, v, grad_output_);
    }
    // Differentiating these again (a third derivative, or
    // torch.autograd.functional.hvp, which differentiates a Hessian-vector
    // product with respect to the vector) is not offered: refuse it,
    // reachable from everything they depend on.
    if (create_graph) {
      torch::autograd::edge_list depends_on{next_edge(0), next_edge(1)};
      if (v.requires_grad()) depends_on.push_back(torch::autograd::impl::gradient_edge(v));
      for (at::Tensor& t : out) {
        if (t.defined())
          t = refuse_differentiation(
              t,
              "fused_ce.cross_entropy: the loss's gradient can be differentiated once; a third "
              "derivative, or differentiating a Hessian-vector product again (as "
              "torch.autograd.functional.hvp does; vhp works), is not supported",
              torch::autograd::edge_list(depends_on));
      }
    }
    return out;
  }

  std::string name() const override { return "fused_ce::CrossEntropyGradientBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved_ = SavedGradient{};
    grad_output_ = at::Tensor();
  }

 private:
  SavedGradient saved_;
  at::Tensor grad_output_;
  std::vector<int64_t> input_sizes_;
};

}  // namespace

at::Tensor differentiable_gradient(SavedGradient saved, const at::Tensor& grad_output, Edge input_edge) {
  at::Tensor result;
  {
    at::NoGradGuard no_grad;
    result = saved.gradient * grad_output;
  }
  Edge grad_output_edge =
      grad_output.requires_grad() ? torch::autograd::impl::gradient_edge(grad_output) : Edge();
  std::vector<int64_t> sizes = saved.gradient.sizes().vec();
  NodePtr node = make_node<CrossEntropyGradientBackward>(std::move(saved), grad_output.detach(), std::move(sizes));
  node->set_next_edges({std::move(input_edge), std::move(grad_output_edge)});
  torch::autograd::set_history(result, node);
  return result;
}

at::Tensor refuse_differentiation(const at::Tensor& value, const char* message,
                                  torch::autograd::edge_list depends_on) {
  at::Tensor result = value.detach();
  torch::autograd::set_history(result, make_node<torch::autograd::Error>(message, std::move(depends_on)));
  return result;
}

void check_unmodified(const SavedGradient& saved) {
  const bool weight_same = !saved.weight.defined() || saved.weight._version() == saved.weight_version;
  FUSED_CE_CHECK(saved.target._version() == saved.target_version && weight_same,
                 "fused_ce.cross_entropy: one of the variables needed for the second derivative of the "
                 "loss (its ", weight_same ? "target" : "weight", ") has been modified by an inplace "
                 "operation since the forward");
}

}  // namespace fused_ce
