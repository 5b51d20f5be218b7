// Python entry points of the emulated CUDA launchers: CPU tensors in the
// launchers' canonical layouts (see csrc/cuda/ce_params.cuh) go straight
// into the parameter blocks, as csrc/cuda/cross_entropy_cuda.cu fills them on
// a GPU, and every launch error (including a recorded device-side
// assertion, a divergent collective or a deadlock) becomes a RuntimeError.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "emu_runtime.h"
#include "ce_params.cuh"

namespace {

namespace ce = fused_ce::cuda;

template <typename scalar_t>
struct KernelType {
  using type = scalar_t;
};
template <>
struct KernelType<at::Half> {
  using type = __half;
};
template <>
struct KernelType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
auto* kernel_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename KernelType<scalar_t>::type*>(t.data_ptr());
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// When set, forward and backward watch the traffic (emu::watch_traffic) into
// their input and the gradient they write, in that order (the input alone
// when the gradient overwrites it), for take_traffic.
bool watch_logits_and_gradients = false;

void watch(const at::Tensor& logits, const at::Tensor& gradient) {
  if (!watch_logits_and_gradients) return;
  emu::take_traffic();  // what the previous call counted
  const auto add = [](const at::Tensor& t) {
    emu::watch_traffic(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  };
  add(logits);
  if (gradient.defined() && !gradient.is_same(logits)) add(gradient);
}

void check(cudaError_t error, const char* what) {
  const std::string message = emu::take_error_message();
  TORCH_CHECK(error == cudaSuccess, what, ": emulated launch failed (", cudaGetErrorName(error), ") ", message);
}

// The fields the forward and backward parameter blocks share.
template <typename scalar_t, typename Params>
void fill_common(Params& p, const at::Tensor& input, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                 double z_loss, double softcap) {
  TORCH_CHECK(input.dim() == 3, "input must be (N, C, D)");
  p.input = kernel_ptr<scalar_t>(input);
  p.N = input.size(0);
  p.C = input.size(1);
  p.D = input.size(2);
  p.input_stride_n = input.stride(0);
  p.input_stride_c = input.stride(1);
  p.input_stride_d = input.stride(2);
  if (target.is_floating_point()) {
    TORCH_CHECK(target.dim() == 3 && target.scalar_type() == input.scalar_type(), "probability target");
    p.target_prob = kernel_ptr<scalar_t>(target);
    p.prob_stride_n = target.stride(0);
    p.prob_stride_c = target.stride(1);
    p.prob_stride_d = target.stride(2);
  } else {
    TORCH_CHECK(target.dim() == 2 && target.scalar_type() == at::kLong, "class target must be int64 (N, D)");
    p.target = target.data_ptr<int64_t>();
    p.target_stride_n = target.stride(0);
    p.target_stride_d = target.stride(1);
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->is_contiguous() && weight->scalar_type() == input.scalar_type(), "weight");
    p.weight = kernel_ptr<scalar_t>(*weight);
  }
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;
}

// A new gradient of an (N, C, D) input, laid out as the kernels write it (see
// ce::fold_positions): contiguous, or as contiguous (N, D, C) rows where the
// positions are folded into rows.
at::Tensor kernel_gradient(const at::Tensor& input, bool rows_folded) {
  if (!rows_folded) return at::empty(input.sizes(), input.options());
  return at::empty({input.size(0), input.size(2), input.size(1)}, input.options()).transpose(1, 2);
}

// mode: "forward", "with_grad" (a new gradient) or "inplace" (the gradient
// over the input). Returns loss, lse, total_weight, gradient. The positions
// are folded into rows where ce::positions_fold says so, as the CUDA binding
// does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t reduction,
    const std::string& mode) {
  const auto acc = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({input.size(0), input.size(2)}, acc);
  at::Tensor lse = at::empty({input.size(0), input.size(2)}, acc);
  at::Tensor total_weight = at::empty({}, acc);
  at::Tensor workspace = at::empty({ce::kWorkspaceElems}, acc);
  at::Tensor grad;
  if (mode == "inplace") grad = input;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulated_forward", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    ce::CrossEntropyForwardParams<T> p;
    fill_common<scalar_t>(p, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
    const bool fold = ce::positions_fold(p);
    if (fold) ce::fold_positions(p);
    if (mode == "with_grad") grad = kernel_gradient(input, fold);
    watch(input, grad);
    p.loss = loss.data_ptr<Acc>();
    p.lse = lse.data_ptr<Acc>();
    p.total_weight = total_weight.data_ptr<Acc>();
    p.workspace = workspace.data_ptr<Acc>();
    if (grad.defined()) {
      p.grad_input = kernel_ptr<scalar_t>(grad);
      p.reduction = static_cast<int>(reduction);
      check(ce::launch_cross_entropy_forward_with_grad(p, nullptr), "forward_with_grad");
    } else {
      check(ce::launch_cross_entropy_forward(p, nullptr), "forward");
    }
  });
  return {loss, lse, total_weight, grad.defined() ? grad : at::empty({0}, input.options())};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                            const at::Tensor& input, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                            int64_t ignore_index, double label_smoothing, double z_loss,
                                            double softcap, bool input_grad, bool target_grad) {
  at::Tensor grad_input, grad_target;
  at::Tensor workspace = at::empty({ce::kWorkspaceElems}, input.options().dtype(acc_dtype(input.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulated_backward", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    ce::CrossEntropyBackwardParams<T> p;
    fill_common<scalar_t>(p, input, target, weight, ignore_index, label_smoothing, z_loss, softcap);
    p.grad_loss = grad_loss.data_ptr<Acc>();
    p.grad_loss_stride_n = grad_loss.stride(0);
    p.grad_loss_stride_d = grad_loss.stride(1);
    if (grad_lse.has_value() && grad_lse->defined()) {
      p.grad_lse = grad_lse->data_ptr<Acc>();
      p.grad_lse_stride_n = grad_lse->stride(0);
      p.grad_lse_stride_d = grad_lse->stride(1);
    }
    p.lse = lse.data_ptr<Acc>();
    p.lse_stride_n = lse.stride(0);
    p.lse_stride_d = lse.stride(1);
    const bool fold = ce::positions_fold(p);
    if (fold) ce::fold_positions(p);
    if (input_grad) grad_input = kernel_gradient(input, fold);
    if (target_grad) grad_target = kernel_gradient(input, fold);
    watch(input, grad_input);
    p.grad_input = input_grad ? kernel_ptr<scalar_t>(grad_input) : nullptr;
    p.grad_target = target_grad ? kernel_ptr<scalar_t>(grad_target) : nullptr;
    p.workspace = workspace.data_ptr<Acc>();
    check(ce::launch_cross_entropy_backward(p, nullptr), "backward");
  });
  return {grad_input, grad_target};
}

void scale_gradient(at::Tensor& grad, const at::Tensor& scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "emulated_scale_gradient", [&] {
    using T = typename KernelType<scalar_t>::type;
    // As the CUDA binding: a scale of the gradient's dtype read as it is,
    // any other converted to the accumulation type.
    const bool storage_typed = scale.scalar_type() == grad.scalar_type();
    const at::Tensor s = storage_typed ? scale : scale.to(acc_dtype(grad.scalar_type()));
    ce::GradientScale<T> gradient_scale;
    if (storage_typed) {
      gradient_scale.storage = kernel_ptr<scalar_t>(s);
    } else {
      gradient_scale.acc = s.data_ptr<ce::acc_t<T>>();
    }
    check(ce::launch_scale_gradient<T>(kernel_ptr<scalar_t>(grad), grad.numel(), gradient_scale, nullptr),
          "scale_gradient");
  });
}

// The reduced loss in `dtype` from per-element losses in its accumulate type.
at::Tensor reduce_loss(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                       at::ScalarType dtype) {
  TORCH_CHECK(loss.scalar_type() == acc_dtype(dtype) && total_weight.scalar_type() == loss.scalar_type(),
              "loss and total_weight in the accumulate type of dtype");
  const at::Tensor values = loss.contiguous();
  at::Tensor out = at::empty({}, loss.options().dtype(dtype));
  // Poisoned scratch: a partial the kernels forget to write shows up as NaN.
  const at::Tensor workspace = at::full({ce::kMaxLossPartials}, NAN, loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulated_reduce_loss", [&] {
    using T = typename KernelType<scalar_t>::type;
    using Acc = ce::acc_t<T>;
    check(ce::launch_reduce_loss<T>(values.data_ptr<Acc>(), values.numel(),
                                    total_weight.contiguous().data_ptr<Acc>(), static_cast<int>(reduction),
                                    workspace.data_ptr<Acc>(), kernel_ptr<scalar_t>(out), nullptr),
          "reduce_loss");
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_ce's CUDA launchers and kernels, compiled for the CPU emulator (tests only)";
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("scale_gradient", &scale_gradient);
  m.def("reduce_loss", &reduce_loss);
  m.def("set_schedule", [](const std::string& order, unsigned seed) {
    TORCH_CHECK(order == "forward" || order == "reverse" || order == "shuffled", "unknown schedule ", order);
    emu::set_schedule(order == "forward" ? emu::kForward : order == "reverse" ? emu::kReverse : emu::kShuffled, seed);
  }, "the order of a block's threads between collectives: forward, reverse or shuffled (seeded)",
        pybind11::arg("order"), pybind11::arg("seed") = 1);
  m.def("watch_logits_and_gradients", [](bool on) { watch_logits_and_gradients = on; },
        "from now on, forward and backward count the bytes their kernels load from and store into the "
        "logits and the gradient they write (take_traffic)");
  m.def("take_traffic", [] {
    pybind11::list out;
    for (const emu::Traffic& t : emu::take_traffic()) out.append(pybind11::make_tuple(t.loaded, t.stored));
    return out;
  }, "(bytes loaded, bytes stored) of the logits, then of the gradient unless it overwrote them, since the "
     "last forward or backward began");
  m.def("take_launch_log", [] {
    pybind11::list out;
    for (const emu::LaunchRecord& r : emu::take_launch_log()) {
      if (r.dynamic_shared_bytes == 0) {
        out.append(pybind11::make_tuple(r.blocks, r.threads_per_block, r.cluster));
      } else {
        out.append(pybind11::make_tuple(r.blocks, r.threads_per_block, r.cluster, r.dynamic_shared_bytes));
      }
    }
    return out;
  }, "(blocks, threads per block, blocks per cluster[, dynamic shared memory bytes if any]) of each launch since "
     "the last call");
}
