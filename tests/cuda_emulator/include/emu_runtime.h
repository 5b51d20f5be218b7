// The CUDA device runtime, emulated on the CPU: what csrc/cuda/*.cuh use,
// so that the kernels and their launchers compile as host C++ and run on
// host memory. Force-included (g++ -include) before everything else in an
// emulated translation unit; see ../README.md for the model and its limits.
//
// Every CUDA thread is a fiber (ucontext); the threads of one block share an
// OS thread, which runs them until each waits at a collective (barrier,
// shuffle, vote) and then resolves the collective as the hardware would, or
// reports a divergent collective, a deadlock or a warp collective over
// exited lanes as a launch error. The blocks of a thread-block cluster run
// on one OS thread each, so a block's __shared__ variables are
// `static thread_local` and distributed shared memory is the same variable
// in another block's thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <string>
#include <utility>
#include <vector>

// The execution-space keywords are plain C++ here. cuda_runtime.h defined
// them as attributes that g++ ignores, with a warning each.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace emu {

// Collectives, resolved by the block's scheduler.
void sync_block();
int sync_block_or(int predicate);
void sync_warp();
uint64_t shuffle_xor(uint64_t bits, int lane_mask);
int warp_any(int predicate);
void sync_cluster();
unsigned cluster_rank();
void* cluster_peer_address(const void* own_shared, unsigned rank);

// A failed FUSED_CE_KERNEL_ASSERT: recorded (the first message is kept) and
// reported by the launch, like a device-side assertion; the thread goes on,
// as the kernels expect where the assertion hook is unavailable.
void device_assert_failed(const char* condition, const char* file, int line);
[[noreturn]] void trap();

// One launch: grid and block shape, blocks per cluster (1: no clusters), the
// block's dynamic shared memory and the kernel (whose allowance past 48 KB
// cudaFuncSetAttribute sets), and the body every thread runs. Returns the
// launch's error (invalid configuration, a divergent collective, a
// deadlock); sticky like CUDA's until cudaGetLastError reads it.
void run_grid(dim3 grid, dim3 block, unsigned cluster, size_t dynamic_shared_bytes, const void* kernel,
              const std::function<void()>& thread_body);

// The running block's dynamic shared memory (FUSED_CE_DYNAMIC_SHARED):
// filled with a pattern at the block's start, as uninitialised memory.
void* dynamic_shared_memory();
void set_max_dynamic_shared_bytes(const void* kernel, int bytes);

// cp.async for the running thread: async_copy queues a copy in the thread's
// open group, async_commit closes it, async_wait(n) performs the copies of
// all groups but the n newest (as late as the hardware may complete them).
void async_copy(void* shared, const void* global, size_t bytes);
void async_commit();
void async_wait(int newest_left_in_flight);

// Global-memory traffic into watched ranges (the logits, the gradient), for
// the tests of how often the kernels read and write them: the bytes of every
// cache-hinted load (__ldg, __ldca, __ldcs) and cp.async read that fall in a
// range, and of every store (__stcs, FUSED_CE_TRACE_STORE). Nothing is
// counted while no range is watched.
struct Traffic {
  uint64_t loaded, stored;
};
void watch_traffic(const void* begin, size_t bytes);  // one more range (at most 4)
std::vector<Traffic> take_traffic();                   // per range, in order; stops watching
void trace_load(const void* address, size_t bytes);
void trace_store(const void* address, size_t bytes);

// Every launch's shape, in order, since the last take_launch_log(): which
// kernel configuration a launcher chose (tests assert it).
struct LaunchRecord {
  unsigned blocks, threads_per_block, cluster;
  size_t dynamic_shared_bytes;
};
std::vector<LaunchRecord> take_launch_log();
std::string take_error_message();  // of the last failed launch

// The order in which a block's threads run between collectives: thread
// index order, its reverse, or shuffled anew at every round (seeded).
enum Schedule { kForward = 0, kReverse = 1, kShuffled = 2 };
void set_schedule(Schedule order, unsigned seed);

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten to
// `::emu::launch(kernel, grid, block, smem, stream)(args...)` (build.py).
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  unsigned cluster;
  size_t dynamic_shared_bytes = 0;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // The kernel's parameters by value, converted once as the launch would.
    std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
    auto* k = kernel;
    run_grid(grid, block, cluster, dynamic_shared_bytes, reinterpret_cast<const void*>(k),
             [&values, k] { std::apply(k, values); });
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                         cudaStream_t = nullptr) {
  return Launch<Params...>{kernel, grid, block, 1, shared_bytes};
}

// cudaLaunchKernelEx with a cluster dimension attribute (rewritten too).
template <typename... Params, typename... Args>
cudaError_t launch_kernel_ex(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) cluster = config->attrs[i].val.clusterDim.x;
  Launch<Params...>{kernel, config->gridDim, config->blockDim, cluster, config->dynamicSmemBytes}(
      std::forward<Args>(args)...);
  return cudaGetLastError();
}

template <typename T>
T bit_cast_to(const void* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

}  // namespace emu

// The running thread's coordinates: per OS thread, i.e. per block, and
// threadIdx set by the scheduler before it switches to a thread's fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// Device code calls these unqualified.
using std::isfinite;
using std::isinf;
using std::isnan;

// The runtime API's C++ overload for kernel pointers, which cuda_runtime.h
// declares for nvcc only.
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel* kernel) {
  return cudaFuncGetAttributes(attributes, reinterpret_cast<const void*>(kernel));
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel* kernel, int threads,
                                                          size_t dynamic_shared_bytes) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, reinterpret_cast<const void*>(kernel), threads,
                                                       dynamic_shared_bytes);
}

// Only the dynamic shared memory allowance is emulated (at most an sm_90
// block's 227 KB).
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  ::emu::set_max_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

#define FUSED_CE_KERNEL_ASSERT(cond)                                  \
  do {                                                                \
    if (!(cond)) ::emu::device_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)

inline void __syncthreads() { emu::sync_block(); }
inline int __syncthreads_or(int predicate) { return emu::sync_block_or(predicate); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline int __any_sync(unsigned, int predicate) { return emu::warp_any(predicate); }
[[noreturn]] inline void __trap() { emu::trap(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffled type");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const uint64_t other = emu::shuffle_xor(bits, lane_mask);
  return emu::bit_cast_to<T>(&other);
}

// Cache-hinted loads and stores: plain accesses on the CPU, counted where
// watched (emu::watch_traffic); and the kernels' plain stores (ce_memory.cuh).
template <typename T>
T __ldg(const T* p) {
  emu::trace_load(p, sizeof(T));
  return *p;
}
template <typename T>
T __ldca(const T* p) {
  emu::trace_load(p, sizeof(T));
  return *p;
}
template <typename T>
T __ldcs(const T* p) {
  emu::trace_load(p, sizeof(T));
  return *p;
}
template <typename T>
void __stcs(T* p, T value) {
  emu::trace_store(p, sizeof(T));
  *p = value;
}
#define FUSED_CE_TRACE_STORE(address, bytes) ::emu::trace_store(address, bytes)

// Reinterpretations and the fast-math functions' plain counterparts.
inline float __int_as_float(int v) { return emu::bit_cast_to<float>(&v); }
inline float __uint_as_float(unsigned v) { return emu::bit_cast_to<float>(&v); }
inline unsigned __float_as_uint(float v) { return emu::bit_cast_to<unsigned>(&v); }
inline double __longlong_as_double(long long v) { return emu::bit_cast_to<double>(&v); }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t bits = (uint64_t(uint32_t(hi)) << 32) | uint32_t(lo);
  return emu::bit_cast_to<double>(&bits);
}
inline int __double2hiint(double v) { return int(emu::bit_cast_to<uint64_t>(&v) >> 32); }
inline int __double2loint(double v) { return int(uint32_t(emu::bit_cast_to<uint64_t>(&v))); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
// Correctly rounded, as on the device (the CPU's float division is too).
inline float __fdiv_rn(float a, float b) { return a / b; }
