// The hand-written autograd nodes (autograd.cpp, per_element_loss.cpp) as
// steps of a compiled-autograd graph (torch._dynamo.compiled_autograd, what
// torch.compile's compiled_autograd option and `_enable` turn on): a Node
// that lacks compiled_args and apply_with_saved makes such a backward raise
// "compiled_args not implemented".
//
// The protocol, as PyTorch's own nodes follow it: compiled_args collects
// every constant the backward depends on (the cache key) and every tensor
// it reads (the graph's inputs); on a cache miss, apply_with_saved swaps
// those tensors for the compiler's proxies (SwapSavedVariables::before),
// hands a function of (upstream gradients, packed arguments) to the compiler,
// which puts a call of it into the graph, then swaps the tensors back
// (after). The function must be traceable: tensor operations alone (here the
// library's operators, which have fake kernels), no reading of values.
//
// That protocol for C++ nodes (the compiler's Python interface, the packing
// of arguments, compiled_args being const) exists from torch 2.7 on. Built
// against an older torch, the nodes leave both methods out, and a compiled
// backward through them raises PyTorch's "compiled_args not implemented",
// while everything else works as before: FUSED_CE_COMPILED_AUTOGRAD says
// which it is.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define FUSED_CE_COMPILED_AUTOGRAD 1
#else
#define FUSED_CE_COMPILED_AUTOGRAD 0
#endif

#if FUSED_CE_COMPILED_AUTOGRAD
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <optional>
#include <string>
#include <vector>

#include "cross_entropy.h"

namespace fused_ce {

// Puts a call of `fn` with `grads` and `args` into the graph being compiled,
// as the backward of `node`, and returns the compiler's stand-ins for its
// results. `fn` is bound under `name` the first time (the compiler's
// registry of such functions lives as long as the process); `args` must have
// the same types on every call (tensors defined; an optional tensor as a
// list of zero or one).
torch::autograd::variable_list call_in_compiled_graph(const torch::autograd::Node& node, const std::string& name,
                                                      const torch::autograd::functional_apply_t& fn,
                                                      const torch::autograd::variable_list& grads,
                                                      const std::vector<c10::IValue>& args,
                                                      torch::dynamo::autograd::SwapSavedVariables& saved);

// A possibly undefined tensor as such an argument: a list of zero or one.
inline c10::IValue optional_tensor_arg(const at::Tensor& t) {
  return t.defined() ? c10::IValue(std::vector<at::Tensor>{t}) : c10::IValue(std::vector<at::Tensor>{});
}

// And back.
inline std::optional<at::Tensor> optional_tensor_from_arg(const c10::IValue& arg) {
  const std::vector<at::Tensor> list = arg.toTensorVector();
  return list.empty() ? std::nullopt : std::optional<at::Tensor>(list[0]);
}

// The loss options: into the cache key, into the packed arguments (four
// of them), and back from the packed arguments from `first` on.
void collect_options(torch::dynamo::autograd::CompiledNodeArgs& args, const LossOptions& options);
void pack_options(std::vector<c10::IValue>& args, const LossOptions& options);
LossOptions unpack_options(const std::vector<c10::IValue>& args, size_t first);

}  // namespace fused_ce

#endif  // FUSED_CE_COMPILED_AUTOGRAD
