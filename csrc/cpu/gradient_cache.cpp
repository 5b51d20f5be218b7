// The one-buffer gradient cache: see gradient_cache.h for why.

#include "gradient_cache.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_ce {
namespace cpu {
namespace {

// Smaller buffers come from the allocator's heap, already mapped: caching
// them would only hold memory.
constexpr size_t kMinCachedBytes = size_t(1) << 20;

// Asks Linux to back a large buffer with 2 MiB pages. A fresh buffer is
// usually a fresh mmap, and faulting it in 4 KiB pages costs several times
// the write itself (measured 5x a copy for 500 MB); huge pages cut the
// faults 512-fold. Only advice: where the kernel refuses, nothing changes.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (bytes < 4 * kHugePage) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A buffer from PyTorch's CPU allocator, with its size.
struct Buffer {
  size_t bytes = 0;
  c10::DataPtr data;
};

class GradientCache {
 public:
  static GradientCache& instance() {
    // Never destroyed: gradients may be freed during interpreter shutdown,
    // after static destructors have run.
    static GradientCache* cache = new GradientCache();
    return *cache;
  }

  // A buffer of exactly `bytes`, the cached one if it fits.
  Buffer* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (enabled_ && cached_ && cached_->bytes == bytes) {
        Buffer* buffer = cached_;
        cached_ = nullptr;
        return buffer;
      }
    }
    auto* buffer = new Buffer{bytes, c10::GetCPUAllocator()->allocate(bytes)};
    advise_huge_pages(buffer->data.get(), bytes);
    return buffer;
  }

  // Called when a tensor from acquire() dies: keeps its buffer for the next
  // step, in place of any older one.
  void release(Buffer* buffer) {
    Buffer* evicted = buffer;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (enabled_ && buffer->bytes >= kMinCachedBytes) std::swap(evicted, cached_);
    }
    delete evicted;  // outside the lock: freeing a large buffer unmaps it
  }

  void clear() {
    Buffer* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::swap(evicted, cached_);
    }
    delete evicted;
  }

  bool set_enabled(bool enabled) {
    bool previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = enabled_;
      enabled_ = enabled;
    }
    if (!enabled) clear();
    return previous;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_ ? int64_t(cached_->bytes) : 0;
  }

 private:
  GradientCache() {
    const char* setting = std::getenv("FUSED_CE_GRADIENT_CACHE");
    enabled_ = !(setting && std::strcmp(setting, "0") == 0);
  }

  std::mutex mutex_;
  bool enabled_ = true;
  Buffer* cached_ = nullptr;
};

void release_buffer(void* buffer) { GradientCache::instance().release(static_cast<Buffer*>(buffer)); }

}  // namespace

at::Tensor empty_gradient_like(const at::Tensor& like) {
  // empty_like's result is always dense and non-overlapping: exactly
  // numel * element_size bytes, whatever its strides.
  const size_t bytes = size_t(like.numel()) * like.element_size();
  if (bytes < kMinCachedBytes) return at::empty_like(like);
  // The strides empty_like would choose (a dense input's are kept), worked
  // out on the meta device without allocating.
  const at::Tensor layout = at::empty_like(like, like.options().device(at::kMeta));
  Buffer* buffer = GradientCache::instance().acquire(bytes);
  // The storage gives the buffer back to the cache when it dies. It stays
  // resizable like any CPU tensor's: a resize reallocates through PyTorch's
  // allocator and hands this buffer back early.
  c10::DataPtr data(buffer->data.get(), buffer, &release_buffer, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, like.options()).set_(storage, 0, layout.sizes(), layout.strides());
}

void empty_gradient_cache() { GradientCache::instance().clear(); }

bool set_gradient_cache_enabled(bool enabled) { return GradientCache::instance().set_enabled(enabled); }

int64_t gradient_cache_bytes() { return GradientCache::instance().cached_bytes(); }

}  // namespace cpu
}  // namespace fused_ce
