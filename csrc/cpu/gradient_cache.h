// Reuse of freed gradient buffers between training steps (CPU).
//
// Every step's gradient is as large as the logits and, from PyTorch's CPU
// allocator, arrives as freshly mapped memory: the kernel's first write to
// each page faults and the operating system zeroes it, about 0.7x the time
// of copying the logits on top of the kernel's own work. A training loop
// frees one step's gradient before it allocates the next one of the same
// size, so a one-buffer cache turns that into memory that is already
// mapped, the same way PyTorch's CUDA caching allocator does on GPUs.
//
// The price is that one gradient-sized buffer stays allocated between steps
// (it is in use during every step anyway, so peak memory is unchanged).
// empty_gradient_cache() releases it; set_gradient_cache_enabled(false), or
// FUSED_CE_GRADIENT_CACHE=0 in the environment, turns the cache off.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_ce {
namespace cpu {

// An uninitialised CPU tensor with the sizes, strides and options
// at::empty_like(like) would give, served from the cache when it holds a
// buffer of the same byte size. Large buffers are advised to use huge pages.
at::Tensor empty_gradient_like(const at::Tensor& like);

// Frees the cached buffer, if any.
void empty_gradient_cache();

// Turns the cache on or off (emptying it when off); returns the old setting.
bool set_gradient_cache_enabled(bool enabled);

// Bytes held by the cache right now.
int64_t gradient_cache_bytes();

}  // namespace cpu
}  // namespace fused_ce
