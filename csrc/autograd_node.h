// Autograd nodes written by hand (torch::autograd::Node subclasses), made
// the way the installed torch holds them: torch up to 2.12 in
// std::shared_ptr, later versions in c10::intrusive_ptr.
#pragma once

#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/function.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace fused_ce {

using NodePtr = decltype(torch::autograd::Edge::function);

template <typename NodeT, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeT>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeT>(std::forward<Args>(args)...);
  }
}

}  // namespace fused_ce
