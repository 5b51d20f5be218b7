// reduce_loss on the CPU (schema and contract: csrc/ops.cpp): the loss of
// a call from its per-element losses, the sum or the mean over total_weight.
//
// Done here rather than with ATen's sum and division because those are the
// largest fixed cost of a small call (about 2 us of a 5 us forward), and so
// that the order of the additions is fixed by the element count alone: the
// elements are cut into fixed chunks, chunks are summed in parallel and
// their sums added in chunk order, so the bits do not depend on the number
// of threads. Sums run in double, for float32 losses too (more accurate than
// a float32 sum, and free next to the kernel that produced the losses).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../cross_entropy.h"

namespace fused_ce {
namespace {

// Elements per parallel task. Only the partition decides the bits, so this
// must not depend on the machine.
constexpr int64_t kChunkElems = int64_t(1) << 15;
// Independent partial sums within a chunk: additions the compiler may
// vectorise without reassociating anything.
constexpr int kLanes = 8;

template <typename Acc>
double chunk_sum(const Acc* values, int64_t count) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += static_cast<double>(values[i + lane]);
  }
  for (int lane = 0; i < count; ++i, ++lane) lanes[lane] += static_cast<double>(values[i]);
  // Pairwise: (0+4 + 2+6) + (1+5 + 3+7).
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

template <typename Acc>
double fixed_order_sum(const Acc* values, int64_t count) {
  const int64_t chunks = (count + kChunkElems - 1) / kChunkElems;
  if (chunks <= 1) return chunk_sum(values, count);
  std::vector<double> partials(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * kChunkElems;
      partials[c] = chunk_sum(values + first, std::min(kChunkElems, count - first));
    }
  });
  double total = 0.0;
  for (const double partial : partials) total += partial;
  return total;
}

at::Tensor reduce_loss_cpu(const at::Tensor& loss, const at::Tensor& total_weight, int64_t reduction,
                           at::ScalarType dtype) {
  check_reduce_loss(loss, total_weight, reduction, dtype);
  const at::Tensor values = loss.contiguous();
  at::Tensor out = at::empty({}, loss.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "fused_ce_reduce_loss_cpu", [&] {
    using Acc = scalar_t;
    // Rounded to the accumulate type and divided there, as the loss would
    // be by a sum and a division in that type.
    Acc result = static_cast<Acc>(fixed_order_sum(values.const_data_ptr<Acc>(), values.numel()));
    if (reduction == static_cast<int64_t>(Reduction::Mean)) {
      // A total weight of 0 (every target ignored or of class weight 0) gives
      // NaN, as PyTorch's mean: it divides the NLL term (0 there) and the
      // label smoothing term by it apart, and 0 / 0 is NaN whatever the other.
      const Acc total = *total_weight.const_data_ptr<Acc>();
      result = total == 0 ? std::numeric_limits<Acc>::quiet_NaN() : result / total;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_ce_reduce_loss_cpu_out", [&] {
      *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(result);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_ce, CPU, m) { m.impl("reduce_loss", &reduce_loss_cpu); }

}  // namespace fused_ce
