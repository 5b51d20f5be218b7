// The emulated device runtime (include/emu_runtime.h): fibers, the block
// scheduler that resolves collectives, clusters, and the few CUDA runtime
// API calls the launchers make.
#include "emu_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace emu {
namespace {

constexpr int kWarpSize = 32;
// Deep enough for the kernels' register arrays; fibers of one OS thread
// reuse their stacks from block to block.
constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kRunnable, kBlock, kBlockOr, kWarp, kShuffle, kAny, kCluster, kDone };

const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kRunnable: return "running";
    case Wait::kBlock: return "__syncthreads";
    case Wait::kBlockOr: return "__syncthreads_or";
    case Wait::kWarp: return "__syncwarp";
    case Wait::kShuffle: return "__shfl_xor_sync";
    case Wait::kAny: return "__any_sync";
    case Wait::kCluster: return "cluster.sync";
    case Wait::kDone: return "exited";
  }
  return "?";
}

// A cp.async copy not yet performed.
struct PendingCopy {
  void* shared;
  const void* global;
  size_t bytes;
};

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  Wait wait = Wait::kRunnable;
  uint64_t value = 0;  // what the thread brings to the collective
  int lane_mask = 0;   // shuffles
  uint64_t result = 0; // what it takes away
  std::vector<PendingCopy> open_copies;                // since the last commit
  std::deque<std::vector<PendingCopy>> copy_groups;    // committed, oldest first
};

// Shared by the blocks of one cluster (one OS thread each).
struct Cluster {
  explicit Cluster(unsigned size) : barrier(size), shared_base(size, nullptr) {}
  std::barrier<> barrier;
  std::vector<const char*> shared_base;  // each block's thread_local anchor
  std::atomic<bool> failed{false};
};

// The launch's sticky error and first device assertion (any thread).
std::mutex error_mutex;
cudaError_t launch_error = cudaSuccess;
std::string error_message;

void record_error(cudaError_t code, const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (launch_error == cudaSuccess) {
    launch_error = code;
    error_message = message;
  }
}

// The order in which a block's runnable threads are resumed: the hardware
// promises none, so a missing barrier shows up under one order or another.
std::atomic<int> schedule{0};  // Schedule
std::atomic<unsigned> schedule_seed{1};

// Per OS thread: the block it runs.
thread_local std::vector<Fiber> fibers;
thread_local std::vector<std::unique_ptr<char[]>> stacks;
thread_local Fiber* current = nullptr;
thread_local ucontext_t scheduler_context;
thread_local const std::function<void()>* body = nullptr;
thread_local Cluster* cluster = nullptr;
thread_local unsigned rank_in_cluster = 0;
// Any thread_local of this module: the offset of a __shared__ variable from
// it is the same in every thread (one TLS image per module), which is how a
// block finds its peers' shared memory.
thread_local char shared_anchor;
// The running block's dynamic shared memory, and the launch's size of it.
thread_local std::vector<unsigned char> dynamic_shared;
size_t launch_dynamic_shared_bytes = 0;
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
std::mutex allowance_mutex;
std::map<const void*, int> dynamic_shared_allowance;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;

void fiber_entry() {
  (*body)();
  current->wait = Wait::kDone;
  swapcontext(&current->context, &scheduler_context);
}

// Called on a fiber: park it at a collective and let the scheduler run.
void park(Wait wait) {
  current->wait = wait;
  swapcontext(&current->context, &scheduler_context);
}

std::string describe(const std::vector<Fiber>& fs, size_t first, size_t count) {
  std::string s;
  for (size_t i = first; i < first + count && i < fs.size(); ++i)
    s += " t" + std::to_string(i) + ":" + wait_name(fs[i].wait);
  return s;
}

// Resolves the warp collective that the live lanes of the warp starting at
// thread `first` all wait at: returns true if it released them, false if
// they are not all there yet (or on a recorded error, with *failed set).
bool release_warp(size_t first, bool* failed) {
  const size_t end = std::min(fibers.size(), first + kWarpSize);
  Wait kind = Wait::kDone;
  bool any_done = false;
  for (size_t i = first; i < end; ++i) {
    const Wait w = fibers[i].wait;
    if (w == Wait::kDone) {
      any_done = true;
      continue;
    }
    if (w != Wait::kWarp && w != Wait::kShuffle && w != Wait::kAny) return false;
    if (kind == Wait::kDone) kind = w;
    if (w != kind || (w == Wait::kShuffle && fibers[i].lane_mask != fibers[first].lane_mask)) {
      record_error(cudaErrorLaunchFailure, "divergent warp collectives in block " + std::to_string(blockIdx.x) +
                                               ":" + describe(fibers, first, kWarpSize));
      *failed = true;
      return false;
    }
  }
  if (kind == Wait::kDone) return false;  // every lane has exited
  if (any_done || end - first != kWarpSize) {
    record_error(cudaErrorLaunchFailure, std::string("a full-mask ") + wait_name(kind) +
                                             " with exited or missing lanes in block " +
                                             std::to_string(blockIdx.x) + ":" + describe(fibers, first, kWarpSize));
    *failed = true;
    return false;
  }
  int any = 0;
  for (size_t i = first; i < end; ++i) any |= fibers[i].value != 0;
  for (size_t i = first; i < end; ++i) {
    Fiber& f = fibers[i];
    if (kind == Wait::kShuffle) f.result = fibers[first + ((i - first) ^ size_t(f.lane_mask))].value;
    if (kind == Wait::kAny) f.result = uint64_t(any);
    f.wait = Wait::kRunnable;
  }
  return true;
}

// Runs the warp starting at `first`, in `lane_order`, through its warp
// collectives until its lanes wait at a block-level barrier or have exited.
// Returns false on a recorded error.
bool run_warp(size_t first, const std::vector<size_t>& lane_order) {
  for (;;) {
    for (const size_t lane : lane_order) {
      if (first + lane >= fibers.size()) continue;
      Fiber& f = fibers[first + lane];
      if (f.wait != Wait::kRunnable) continue;
      current = &f;
      threadIdx = f.thread_idx;
      swapcontext(&scheduler_context, &f.context);
    }
    current = nullptr;
    bool failed = false;
    if (!release_warp(first, &failed)) return !failed;
  }
}

// Runs one block to completion (or failure). Returns false on failure.
//
// Warp by warp: each warp runs through its warp collectives until it waits
// at a block-level barrier (or exits) before the next warp starts, in the
// schedule's order. That is an order the hardware may choose, and the one
// that exposes a missing barrier best: one warp gets all the way to its
// next write of shared memory while the others have not read the last one.
bool run_block(dim3 grid, dim3 block, unsigned block_x) {
  gridDim = grid;
  blockDim = block;
  blockIdx = uint3{block_x, 0, 0};
  dynamic_shared.assign(launch_dynamic_shared_bytes, 0xA5);
  const size_t threads = size_t(block.x) * block.y * block.z;
  fibers.assign(threads, Fiber{});
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  for (size_t t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.thread_idx = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (size_t(block.x) * block.y))};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[t].get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  const size_t warps = (threads + kWarpSize - 1) / kWarpSize;
  std::vector<size_t> warp_order(warps), lane_order(kWarpSize);
  for (size_t w = 0; w < warps; ++w) warp_order[w] = w;
  for (size_t l = 0; l < size_t(kWarpSize); ++l) lane_order[l] = l;
  const Schedule order = Schedule(schedule.load());
  if (order == kReverse) {
    std::reverse(warp_order.begin(), warp_order.end());
    std::reverse(lane_order.begin(), lane_order.end());
  }
  std::minstd_rand shuffler(schedule_seed.load() + block_x);
  for (;;) {
    if (order == kShuffled) {
      std::shuffle(warp_order.begin(), warp_order.end(), shuffler);
      std::shuffle(lane_order.begin(), lane_order.end(), shuffler);
    }
    for (const size_t w : warp_order)
      if (!run_warp(w * kWarpSize, lane_order)) return false;
    size_t live = 0, at_block = 0, at_block_or = 0, at_cluster = 0;
    int any = 0;
    for (const Fiber& f : fibers) {
      if (f.wait == Wait::kDone) continue;
      ++live;
      at_block += f.wait == Wait::kBlock;
      at_block_or += f.wait == Wait::kBlockOr;
      at_cluster += f.wait == Wait::kCluster;
      if (f.wait == Wait::kBlockOr) any |= f.value != 0;
    }
    if (live == 0) return true;
    // __syncthreads waits for the threads that have not exited.
    if (at_block == live || at_block_or == live) {
      for (Fiber& f : fibers) {
        if (f.wait == Wait::kDone) continue;
        f.result = uint64_t(any);
        f.wait = Wait::kRunnable;
      }
      continue;
    }
    if (at_cluster == live && cluster != nullptr) {
      cluster->barrier.arrive_and_wait();
      if (cluster->failed.load()) return false;
      for (Fiber& f : fibers)
        if (f.wait != Wait::kDone) f.wait = Wait::kRunnable;
      continue;
    }
    record_error(cudaErrorLaunchFailure, "deadlock in block " + std::to_string(block_x) + ":" +
                                             describe(fibers, 0, std::min<size_t>(threads, 64)));
    return false;
  }
}

void run_cluster_block(dim3 grid, dim3 block, Cluster* c, unsigned rank, unsigned block_x,
                       const std::function<void()>* thread_body) {
  body = thread_body;
  cluster = c;
  rank_in_cluster = rank;
  c->shared_base[rank] = &shared_anchor;
  // Every block's anchor is known before any block can map a peer's memory.
  c->barrier.arrive_and_wait();
  if (!run_block(grid, block, block_x)) c->failed.store(true);
  // A finished block no longer takes part in the cluster's barriers.
  c->barrier.arrive_and_drop();
  cluster = nullptr;
}

}  // namespace


void sync_block() { park(Wait::kBlock); }

int sync_block_or(int predicate) {
  current->value = predicate != 0;
  park(Wait::kBlockOr);
  return int(current->result);
}

void sync_warp() { park(Wait::kWarp); }

uint64_t shuffle_xor(uint64_t bits, int lane_mask) {
  current->value = bits;
  current->lane_mask = lane_mask;
  park(Wait::kShuffle);
  return current->result;
}

int warp_any(int predicate) {
  current->value = predicate != 0;
  park(Wait::kAny);
  return int(current->result);
}

void sync_cluster() {
  if (cluster == nullptr) trap();
  park(Wait::kCluster);
}

unsigned cluster_rank() { return cluster == nullptr ? 0 : rank_in_cluster; }

void* cluster_peer_address(const void* own_shared, unsigned rank) {
  if (cluster == nullptr || rank >= cluster->shared_base.size()) trap();
  const ptrdiff_t offset = static_cast<const char*>(own_shared) - &shared_anchor;
  return const_cast<char*>(cluster->shared_base[rank] + offset);
}

void device_assert_failed(const char* condition, const char* file, int line) {
  record_error(cudaErrorAssert, std::string("device-side assertion `") + condition + "` failed at " + file + ":" +
                                    std::to_string(line));
}

void trap() {
  std::fprintf(stderr, "emulated CUDA: __trap() or a cluster call outside a cluster\n");
  std::abort();
}

std::vector<LaunchRecord> launch_log;

void run_grid(dim3 grid, dim3 block, unsigned cluster_size, size_t dynamic_shared_bytes, const void* kernel,
              const std::function<void()>& thread_body) {
  launch_log.push_back(LaunchRecord{grid.x, block.x * block.y * block.z, cluster_size, dynamic_shared_bytes});
  size_t allowed = kDefaultDynamicSharedLimit;
  {
    std::lock_guard<std::mutex> lock(allowance_mutex);
    const auto it = dynamic_shared_allowance.find(kernel);
    if (it != dynamic_shared_allowance.end()) allowed = std::max<size_t>(allowed, it->second);
  }
  if (dynamic_shared_bytes > allowed) {
    record_error(cudaErrorInvalidValue, "invalid launch: " + std::to_string(dynamic_shared_bytes) +
                                            " bytes of dynamic shared memory, the kernel is allowed " +
                                            std::to_string(allowed));
    return;
  }
  launch_dynamic_shared_bytes = dynamic_shared_bytes;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y != 1 || grid.z != 1 || threads == 0 || threads > 1024 || cluster_size == 0 ||
      cluster_size > 8 || grid.x % cluster_size != 0) {
    record_error(cudaErrorInvalidConfiguration,
                 "invalid launch: grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                     std::to_string(grid.z) + ", block of " + std::to_string(threads) + " threads, cluster " +
                     std::to_string(cluster_size));
    return;
  }
  if (cluster_size == 1) {
    body = &thread_body;
    for (unsigned b = 0; b < grid.x; ++b)
      if (!run_block(grid, block, b)) break;
    body = nullptr;
    return;
  }
  for (unsigned first = 0; first < grid.x; first += cluster_size) {
    Cluster c(cluster_size);
    std::vector<std::thread> workers;
    for (unsigned r = 0; r < cluster_size; ++r)
      workers.emplace_back(run_cluster_block, grid, block, &c, r, first + r, &thread_body);
    for (std::thread& w : workers) w.join();
    if (c.failed.load()) return;
  }
}

void* dynamic_shared_memory() { return dynamic_shared.data(); }

void set_max_dynamic_shared_bytes(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(allowance_mutex);
  dynamic_shared_allowance[kernel] = bytes;
}

void async_copy(void* shared, const void* global, size_t bytes) {
  trace_load(global, bytes);  // the read the hardware issues now
  current->open_copies.push_back(PendingCopy{shared, global, bytes});
}

void async_commit() {
  current->copy_groups.push_back(std::move(current->open_copies));
  current->open_copies.clear();
}

void async_wait(int newest_left_in_flight) {
  auto& groups = current->copy_groups;
  while (groups.size() > static_cast<size_t>(newest_left_in_flight)) {
    for (const PendingCopy& c : groups.front()) std::memcpy(c.shared, c.global, c.bytes);
    groups.pop_front();
  }
}

// The watched ranges: set while no kernel runs, read by every thread of a
// launch (the blocks of a cluster run on threads of their own), counted
// atomically.
namespace {
struct WatchedRange {
  uintptr_t begin = 0, end = 0;
  std::atomic<uint64_t> loaded{0}, stored{0};
};
constexpr int kMaxWatched = 4;
WatchedRange watched[kMaxWatched];
std::atomic<int> watched_count{0};

void count(const void* address, size_t bytes, std::atomic<uint64_t> WatchedRange::*counter) {
  const int n = watched_count.load(std::memory_order_relaxed);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(address), end = begin + bytes;
  for (int i = 0; i < n; ++i) {
    WatchedRange& r = watched[i];
    const uintptr_t lo = std::max(begin, r.begin), hi = std::min(end, r.end);
    if (lo < hi) (r.*counter).fetch_add(hi - lo, std::memory_order_relaxed);
  }
}
}  // namespace

void watch_traffic(const void* begin, size_t bytes) {
  const int n = watched_count.load();
  if (n == kMaxWatched) throw std::runtime_error("emulated CUDA: at most 4 watched ranges");
  watched[n].begin = reinterpret_cast<uintptr_t>(begin);
  watched[n].end = watched[n].begin + bytes;
  watched[n].loaded = 0;
  watched[n].stored = 0;
  watched_count.store(n + 1);
}

std::vector<Traffic> take_traffic() {
  std::vector<Traffic> out;
  for (int i = 0; i < watched_count.load(); ++i) out.push_back(Traffic{watched[i].loaded, watched[i].stored});
  watched_count.store(0);
  return out;
}

void trace_load(const void* address, size_t bytes) { count(address, bytes, &WatchedRange::loaded); }
void trace_store(const void* address, size_t bytes) { count(address, bytes, &WatchedRange::stored); }

std::vector<LaunchRecord> take_launch_log() {
  std::vector<LaunchRecord> log;
  log.swap(launch_log);
  return log;
}

void set_schedule(Schedule order, unsigned seed) {
  schedule.store(order);
  schedule_seed.store(seed);
}

// The message of the last launch error, for the binding's exception.
std::string take_error_message() {
  std::lock_guard<std::mutex> lock(error_mutex);
  std::string m = error_message;
  error_message.clear();
  return m;
}

}  // namespace emu

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// ---------------------------------------------------------------------------
// The runtime API calls of the launchers (declared by cuda_runtime_api.h).
// The emulated device is one "sm_90" GPU that launches clusters.

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(emu::error_mutex);
  const cudaError_t e = emu::launch_error;
  emu::launch_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// 132 SMs (an H100 or H200), or FUSED_CE_EMULATED_SMS where set, so tests of
// a persistent grid can make its blocks loop over several rows.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  const char* sms = std::getenv("FUSED_CE_EMULATED_SMS");
  switch (attribute) {
    case cudaDevAttrClusterLaunch: *value = 1; break;
    case cudaDevAttrMultiProcessorCount: *value = sms != nullptr ? std::atoi(sms) : 132; break;
    default: *value = 0; break;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  *attributes = cudaFuncAttributes{};
  attributes->ptxVersion = 90;
  attributes->binaryVersion = 90;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void*, const cudaLaunchConfig_t*) {
  *clusters = 1;
  return cudaSuccess;
}

// An SM of an H100 or H200 (65536 registers, 2048 threads, 32 blocks, 228
// KB of shared memory, 1 KB of it reserved per block) running kernels of
// 80 registers a thread, the streamed rows' count there, or as many as one
// block may have (a kernel's launch bounds keep it within them: 64 for 1024
// threads).  The emulated SM's
// shared memory in KB comes from FUSED_CE_EMULATED_SHARED_KB_PER_SM where
// set, so tests can stand in for a GPU with less (100 KB: sm_86, sm_89,
// sm_120), on which a block that asks for much of it loses occupancy.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int threads,
                                                          size_t dynamic_shared_bytes) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  const char* kb = std::getenv("FUSED_CE_EMULATED_SHARED_KB_PER_SM");
  const size_t shared_per_sm = (kb != nullptr ? std::strtoul(kb, nullptr, 10) : 228) * 1024;
  const int warps = (threads + 31) / 32;
  const int by_registers = 65536 / (warps * 32 * std::min(80, 65536 / (warps * 32)));
  const int by_threads = 2048 / (warps * 32);
  const int by_shared = static_cast<int>(shared_per_sm / (dynamic_shared_bytes + 1024));
  *blocks = std::min({by_registers, by_threads, by_shared, 32});
  return cudaSuccess;
}

extern "C" float __nv_tanhf(float x) { return std::tanh(x); }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError";
  }
}
