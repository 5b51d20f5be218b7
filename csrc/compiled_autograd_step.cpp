// See compiled_autograd_step.h.

#include "compiled_autograd_step.h"

#if FUSED_CE_COMPILED_AUTOGRAD

#include <mutex>
#include <optional>
#include <set>

namespace fused_ce {

using torch::dynamo::autograd::IValuePacker;

torch::autograd::variable_list call_in_compiled_graph(const torch::autograd::Node& node, const std::string& name,
                                                      const torch::autograd::functional_apply_t& fn,
                                                      const torch::autograd::variable_list& grads,
                                                      const std::vector<c10::IValue>& args,
                                                      torch::dynamo::autograd::SwapSavedVariables& saved) {
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  {
    // The compiler's registry refuses a second function of the same name,
    // so each is bound once per process, with the argument types of its
    // first call (the Python side converts the arguments by them).
    static std::mutex mutex;
    static std::set<std::string> bound;
    std::lock_guard<std::mutex> lock(mutex);
    if (bound.count(name) == 0) {
      std::vector<at::TypePtr> schema;
      schema.reserve(args.size());
      for (const c10::IValue& arg : args) schema.push_back(arg.isTensor() ? at::TensorType::get() : arg.type());
      compiler->bind_function(saved.get_py_compiler(), name, fn, schema, /*is_custom_function=*/false,
                              /*is_traceable=*/true);
      bound.insert(name);
    }
  }
  const c10::IValue output_metadata = IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
      torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  return compiler->call_function(saved.get_py_compiler(), "apply_functional", name, grads, args, output_metadata);
}

void collect_options(torch::dynamo::autograd::CompiledNodeArgs& args, const LossOptions& options) {
  args.collect(options.ignore_index);
  args.collect(options.label_smoothing);
  args.collect(options.z_loss);
  args.collect(options.softcap);
}

void pack_options(std::vector<c10::IValue>& args, const LossOptions& options) {
  args.emplace_back(options.ignore_index);
  args.emplace_back(options.label_smoothing);
  args.emplace_back(options.z_loss);
  args.emplace_back(options.softcap);
}

LossOptions unpack_options(const std::vector<c10::IValue>& args, size_t first) {
  return LossOptions{args[first].toInt(), args[first + 1].toDouble(), args[first + 2].toDouble(),
                     args[first + 3].toDouble()};
}

}  // namespace fused_ce

#endif  // FUSED_CE_COMPILED_AUTOGRAD
