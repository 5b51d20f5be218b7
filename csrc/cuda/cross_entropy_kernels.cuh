// Host launchers of the fused cross-entropy CUDA kernels (torch-free).
//
// This file decides *how* to run each operator for a given shape and
// layout; the kernels themselves live in
//   ce_stream_kernels.cuh    general streaming row kernels (forward, backward)
//   ce_resident_kernel.cuh   register-resident forward_with_grad
//   ce_total_weight.cuh      total_weight / scale / sum of weights
//   ce_scale_gradient.cuh    the backward of a gradient computed in the forward
// and the loss formulas they share in ce_loss.cuh.
//
// Choice of kernel (rows are the N * D (n, d) elements, each with C logits):
//  * Row layout: the classes of a row are contiguous in every tensor the
//    kernel reads or writes (input class stride 1, and D == 1 when a
//    gradient, which is contiguous (N, C, D), is written).  A group of TPR
//    threads then owns a row: 8 for rows up to 16 vectors, a warp up to 512
//    vectors, a 256-thread block beyond.  Rows of at most 64 bytes are
//    cheaper one per thread (neighbouring threads read neighbouring rows).
//  * Otherwise (class-strided, e.g. (N, C, H, W) with D = H*W): one thread
//    per row, consecutive threads on consecutive rows, so every access of
//    the class loop is coalesced when the d (or n) stride is 1.
//  * 16-byte vector accesses whenever every tensor of the row layout has
//    the same 16-byte phase on every row (RowSlots handles the misaligned
//    head and tail of each row, so odd C such as 50257 still vectorises);
//    scalar accesses otherwise.
//  * forward_with_grad with class targets keeps the row in registers when it
//    fits: in one block up to 57344 bf16/fp16, 32768 fp32 (16384 with the
//    softcap) and 8192 fp64 classes; on sm_90+, split over a thread-block
//    cluster of up to 8 blocks, up to 262144 bf16/fp16, 131072 fp32 and
//    65536 fp64 classes (a 128k or 256k vocabulary).  Longer rows, and
//    cluster-sized rows on older GPUs or with FUSED_CE_CUDA_CLUSTERS=0, are
//    streamed twice.  The in-place variant (grad_input == input) takes the
//    same kernels: they are alias-safe (see their headers).
//  * The softcap is a compile-time kernel parameter (a tanh per logit
//    read); z_loss and grad_lse only change per-row coefficients.
// Every launch is asynchronous on the caller's stream: no host
// synchronisation, CUDA-graph capturable.  The only device queries (whether
// clusters can be launched) are host-side attribute reads, made for rows
// too long for one block.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "ce_common.cuh"
#include "ce_loss.cuh"
#include "ce_memory.cuh"
#include "ce_params.cuh"
#include "ce_reduce_loss.cuh"
#include "ce_resident_kernel.cuh"
#include "ce_scale_gradient.cuh"
#include "ce_stream_kernels.cuh"
#include "ce_total_weight.cuh"

namespace fused_ce {
namespace cuda {
namespace detail {

// int is used for class and slot indices inside a row.
constexpr int64_t kMaxClasses = int64_t(1) << 30;
// Rows of at most this many bytes are processed one per thread.
constexpr int64_t kTinyRowBytes = 64;
constexpr int kStreamBlock = 256;

#define FUSED_CE_RETURN_IF_ERROR(expr)   \
  do {                                   \
    const cudaError_t fused_ce_err_ = (expr); \
    if (fused_ce_err_ != cudaSuccess) return fused_ce_err_; \
  } while (0)

inline unsigned int grid_for(int64_t rows, int rows_per_block) {
  // The kernels loop over rows with a grid stride, so capping is safe.
  constexpr int64_t kMaxBlocks = 0x7fffffff;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

inline bool class_contiguous(int64_t class_stride, int64_t C) { return class_stride == 1 || C == 1; }

// Pointer aligned to its element size (always true for torch tensors, but
// the shift arithmetic of RowSlots depends on it).
template <typename T>
bool element_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(T) == 0;
}

// True when the rows of two (N, ., D) tensors start at the same offset within
// a 16-byte block for every (n, d), so one RowSlots serves both.
template <typename T>
bool same_phase(const void* a, int64_t a_stride_n, int64_t a_stride_d, const void* b,
                int64_t b_stride_n, int64_t b_stride_d, int64_t N, int64_t D) {
  const int64_t elem = static_cast<int64_t>(sizeof(T));
  if (!element_aligned<T>(a) || !element_aligned<T>(b)) return false;
  if (reinterpret_cast<uintptr_t>(a) % kVectorBytes != reinterpret_cast<uintptr_t>(b) % kVectorBytes)
    return false;
  if (N > 1 && ((a_stride_n - b_stride_n) * elem) % kVectorBytes != 0) return false;
  if (D > 1 && ((a_stride_d - b_stride_d) * elem) % kVectorBytes != 0) return false;
  return true;
}

// How a row kernel is launched: threads per row and whether to vectorise.
struct RowPlan {
  int tpr = 1;
  bool vectorized = false;
};

template <typename T>
RowPlan plan_rows(int64_t C, bool row_layout, bool vector_ok) {
  RowPlan plan;
  if (!row_layout || C * static_cast<int64_t>(sizeof(T)) <= kTinyRowBytes) return plan;
  plan.vectorized = vector_ok;
  const int64_t vec = vector_ok ? vector_width<T>() : 1;
  const int64_t slots = C / vec;  // body slots of a row, at most
  plan.tpr = slots <= 16 ? 8 : (slots <= 512 ? 32 : kStreamBlock);
  return plan;
}

// Runtime (TPR, vectorised) -> compile-time instantiation of a row kernel.
// `launch` is called with integral-constant-like tags carrying TPR and VEC.
template <int V>
struct IntTag {
  static constexpr int value = V;
};
template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

// Runtime flags -> compile-time kernel parameters: f(BoolTag<a>, BoolTag<b>).
template <typename F>
void dispatch_flags(bool a, bool b, F&& f) {
  if (a) {
    b ? f(BoolTag<true>{}, BoolTag<true>{}) : f(BoolTag<true>{}, BoolTag<false>{});
  } else {
    b ? f(BoolTag<false>{}, BoolTag<true>{}) : f(BoolTag<false>{}, BoolTag<false>{});
  }
}

template <typename T, typename F>
cudaError_t dispatch_row_plan(const RowPlan& plan, F&& launch) {
  constexpr int kVec = vector_width<T>();
  switch (plan.tpr) {
    case 1:
      launch(IntTag<1>{}, IntTag<1>{});
      break;
    case 8:
      plan.vectorized ? launch(IntTag<8>{}, IntTag<kVec>{}) : launch(IntTag<8>{}, IntTag<1>{});
      break;
    case 32:
      plan.vectorized ? launch(IntTag<32>{}, IntTag<kVec>{}) : launch(IntTag<32>{}, IntTag<1>{});
      break;
    default:
      plan.vectorized ? launch(IntTag<kStreamBlock>{}, IntTag<kVec>{})
                      : launch(IntTag<kStreamBlock>{}, IntTag<1>{});
      break;
  }
  return cudaGetLastError();
}

template <typename T>
bool valid_sizes(int64_t N, int64_t C, int64_t D) {
  if (N < 0 || C < 0 || D < 0) return false;
  if (N * D > 0 && (C < 1 || C > kMaxClasses)) return false;
  return true;
}

// The kernels' maths assume label_smoothing in [0, 1], z_loss >= 0 and
// softcap >= 0 (0: none), all finite (NaN fails every comparison).
inline bool valid_options(double label_smoothing, double z_loss, double softcap) {
  return label_smoothing >= 0.0 && label_smoothing <= 1.0 && z_loss >= 0.0 && std::isfinite(z_loss) &&
         softcap >= 0.0 && std::isfinite(softcap);
}

// The loss constants of a launch (the kernels' second argument).
template <bool CAP, typename Params>
auto loss_math(const Params& p) {
  using Acc = typename Params::Acc;
  return LossMath<Acc, CAP>::make(p.label_smoothing, p.z_loss, p.softcap, p.C);
}

// True when input element (n, c, d) sits exactly where the contiguous
// (N, C, D) gradient puts it (strides of size-1 dimensions do not matter),
// which is what computing the gradient in place requires.
template <typename T>
bool gradient_layout(const CrossEntropyForwardParams<T>& p) {
  return (p.N <= 1 || p.input_stride_n == p.C * p.D) && (p.C <= 1 || p.input_stride_c == p.D) &&
         (p.D <= 1 || p.input_stride_d == 1);
}

// ---------------------------------------------------------------------------
// Forward and forward_with_grad (grad_input set).

// The value of the environment variable `name` when it is spelled exactly as
// one of `choices` (decimal numbers), else 0: the experiments' switches,
// read once per process by their callers.
inline int env_number(const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  if (v == nullptr) return 0;
  for (const char* choice : choices)
    if (std::strcmp(v, choice) == 0) return std::atoi(choice);
  return 0;
}

// Whether rows of 129-256 body slots (513-1024 float32 classes, 1025-2048
// 16-bit ones; float64 rows would spill) are held by one warp of 8 slots a
// lane rather than a block of 128 threads of 4, from FUSED_CE_CUDA_WARP_ROWS
// (read once per process): "8", or any other value and unset for the
// block.  An experiment: on the H200 (benchmarks/results/gpu-2026-11-28-h200)
// 65536 x 1000 float32 rows, in blocks, took 2.23x the copy where bfloat16
// rows of 1000 classes, one warp each, took 1.84x; a warp needs no block
// barrier for its reductions, and its 8 rows per block keep twice the bytes
// in flight per SM (float32 on sm_90: 80 registers, 3 blocks of 256 per SM;
// 124 with the softcap, 2 blocks).  Not timed yet.
inline bool warp_rows_of_8_slots() {
  static const bool on = env_number("FUSED_CE_CUDA_WARP_ROWS", {"8"}) == 8;
  return on;
}

// A fact about the current device and the kernels loaded for it, a count
// (0 or more; 1 or 0 for a yes or no), found by `find(device)` the first
// time per device and remembered; a static of its caller (zero-initialised:
// nothing known).  0, and found again next time, where there is no current
// device.
class PerDeviceFact {
 public:
  template <typename Find>
  int get(Find find) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
      (void)cudaGetLastError();  // not the error of a later launch check
      return 0;
    }
    if (device < kMaxDevices && known_[device].load() != 0) return known_[device].load() - 1;
    const int answer = find(device);
    if (device < kMaxDevices) known_[device].store(answer + 1);
    return answer;
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::atomic<int> known_[kMaxDevices];  // 0 unknown, else the answer + 1
};

// How many blocks of `threads` threads of `kernel`, each with
// `shared_bytes` of dynamic shared memory (already allowed), an SM holds at
// once; 0 where the device cannot say.
template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads, int shared_bytes) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shared_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // not the error of a later launch check
    return 0;
  }
  return blocks;
}

// Whether the rows one block of 128 or more threads holds are read through
// the PREFETCH kernel, a persistent grid that stages each block's next row
// in shared memory while it reduces and writes the current one
// (ce_resident_kernel.cuh), from FUSED_CE_CUDA_RESIDENT_PREFETCH (read once
// per process): "1", or any other value and unset for the plain kernel.  An
// experiment for the rows furthest from the copy on the H200
// (benchmarks/results/gpu-2026-11-28-h200): 8192 x 32000 float32 (a block
// of 1024 threads, one per SM) 1.65x, 16384 x 50304 bfloat16 (896) 2.22x,
// 65536 x 1000 float32 (128 threads: many per SM, each block's reductions
// and exit a gap in its loads) 2.23x.  Not timed yet.
constexpr int kPrefetchFromBlock = 128;
inline bool resident_prefetch() {
  static const bool on = env_number("FUSED_CE_CUDA_RESIDENT_PREFETCH", {"1"}) == 1;
  return on;
}

// One launch of the PREFETCH kernel over rows of one block of BLOCK threads
// holding CH slots each, as a grid of at most as many blocks as the device
// holds at once.  Returns false (launching nothing) where the device cannot
// give the kernel its shared memory or hold one of its blocks per SM.  The
// staging costs some configurations registers, hence blocks per SM (ptxas
// on sm_90: float32 128 x 4 slots 56 -> 72 registers, 9 -> 7 blocks; 256 x 8
// 80 -> 100, 3 -> 2; the 512- to 1024-thread rows keep their one block),
// which the experiment's timings include; a default would weigh them.
template <typename T, int BLOCK, int CH, bool CAP>
bool launch_prefetching_rows(const CrossEntropyForwardParams<T>& p, cudaStream_t stream) {
  constexpr int V = vector_width<T>();
  constexpr int shared_bytes = prefetch_shared_bytes<BLOCK, CH>();
  const auto kernel = ce_forward_grad_resident_kernel<T, BLOCK, BLOCK, V, CH, CAP, 1, true>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; the caller launches the plain kernel
    return false;
  }
  static PerDeviceFact resident_blocks;  // of the device, 0: the plain kernel
  const int capacity = resident_blocks.get([&](int device) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return sms * blocks_per_sm(kernel, BLOCK, shared_bytes);
  });
  if (capacity == 0) return false;
  const int64_t blocks = p.N < capacity ? p.N : capacity;
  kernel<<<static_cast<unsigned int>(blocks), BLOCK, shared_bytes, stream>>>(p, loss_math<CAP>(p));
  return true;
}

// Register-resident configurations, smallest first: (threads per row,
// block, slots per thread).  Capacity = TPR * CH slots of VEC elements.
// Rows of more than kSlotsOf256ThreadBlock slots take one block of 512 or
// more threads: one block per SM.  16-bit rows up to 4096 slots take 1024
// threads of 4 slots (64 registers: 32 warps per SM) rather than 512 of 8
// (98 registers, 16 warps: 24% occupancy and DRAM at 40% of its peak on an
// H100, benchmarks/results/gpu-2026-11-27-h100-b/profile.txt).
constexpr int64_t kSlotsOf256ThreadBlock = 256 * 8;
template <bool CAP, typename T>
cudaError_t launch_resident(const CrossEntropyForwardParams<T>& p, int64_t slots, cudaStream_t stream,
                            bool* launched) {
  constexpr int V = vector_width<T>();
  *launched = true;
  const int64_t rows = p.N;
  const auto math = loss_math<CAP>(p);
#define FUSED_CE_RESIDENT(TPR, BLOCK, CH)                                                   \
  if (slots <= int64_t(TPR) * (CH)) {                                                       \
    if constexpr ((TPR) == (BLOCK) && (BLOCK) >= kPrefetchFromBlock) {                      \
      if (resident_prefetch() && launch_prefetching_rows<T, BLOCK, CH, CAP>(p, stream))     \
        return cudaGetLastError();                                                          \
    }                                                                                       \
    ce_forward_grad_resident_kernel<T, TPR, BLOCK, V, CH, CAP>                              \
        <<<grid_for(rows, (BLOCK) / (TPR)), BLOCK, 0, stream>>>(p, math);                   \
    return cudaGetLastError();                                                              \
  }
  FUSED_CE_RESIDENT(8, 256, 2)
  FUSED_CE_RESIDENT(32, 256, 2)
  FUSED_CE_RESIDENT(32, 256, 4)
  if constexpr (sizeof(T) <= 4) {  // float64 rows would spill
    if (warp_rows_of_8_slots()) {
      FUSED_CE_RESIDENT(32, 256, 8)
    }
  }
  FUSED_CE_RESIDENT(128, 128, 4)
  FUSED_CE_RESIDENT(256, 256, 8)
  if constexpr (sizeof(T) == 2) {
    FUSED_CE_RESIDENT(1024, 1024, 4)
  } else {
    FUSED_CE_RESIDENT(512, 512, 8)
  }
  // The largest row that still compiles without spilling: 896 threads for
  // 16-bit types (57344 classes, enough for GPT-2's 50257), 1024 for float32
  // (32768 classes); float64 stops at 512 threads (8192 classes).  With the
  // softcap (a tanh per element in both passes) the 1024-thread float32
  // configuration spills close to the CI limit, so capped float32 rows stop
  // at 512 threads (16384 classes) and longer ones stream.
  if constexpr (sizeof(T) == 2) {
    FUSED_CE_RESIDENT(896, 896, 8)
  } else if constexpr (sizeof(T) == 4 && !CAP) {
    FUSED_CE_RESIDENT(1024, 1024, 8)
  }
#undef FUSED_CE_RESIDENT
  *launched = false;
  return cudaSuccess;
}

// Which rows the cluster kernels take, from FUSED_CE_CUDA_CLUSTERS (read
// once per process): "0" none (rows past one block are streamed twice); "1"
// the rows too long for one block; "all" also the rows one block of 512 or
// more threads would hold (one such block per SM, so a row's reductions and
// writes do not overlap other rows' loads, where 2 to 3 blocks of 256
// threads per SM would); unset, the measured choice of cluster_plan.
enum class ClusterUse { kMeasured, kNone, kLongRows, kAll };

inline ClusterUse cluster_use() {
  static const ClusterUse use = [] {
    const char* v = std::getenv("FUSED_CE_CUDA_CLUSTERS");
    if (v == nullptr) return ClusterUse::kMeasured;
    if (std::strcmp(v, "0") == 0) return ClusterUse::kNone;
    if (std::strcmp(v, "all") == 0) return ClusterUse::kAll;
    return ClusterUse::kLongRows;
  }();
  return use;
}

// Where forward_with_grad tries the cluster kernels: before one block per
// row, with clusters of at most `first_up_to` blocks (0: not there), for
// rows past a 256-thread block; and after it (`after`), for rows too long
// for one block.
struct ClusterPlan {
  int first_up_to;
  bool after;
};

// By default, what one H100 measured (benchmarks/results/gpu-2026-11-27-h100,
// forward + backward against a copy of the logits in the same run): float32
// rows past one block are faster in clusters (4096 x 128256: 1.39x the copy,
// streamed twice 1.56x); 16-bit rows are not in clusters of 8 (16384 x 128256
// bf16: 1.90x against 1.62x streamed, 8192 x 256000: 2.69x against 1.64x) but
// are in clusters of 2 rather than one 512-thread block (16384 x 32000 bf16:
// 1.66x against 1.90x; such rows now take 1024 threads, not yet compared).
// Clusters of 4 (rows of 32k-57k 16-bit classes) were not measured: those
// rows keep the one block.
template <typename T>
ClusterPlan cluster_plan() {
  switch (cluster_use()) {
    case ClusterUse::kNone: return {0, false};
    case ClusterUse::kLongRows: return {0, true};
    case ClusterUse::kAll: return {kMaxClusterBlocks, true};
    case ClusterUse::kMeasured: break;
  }
  if (sizeof(T) == 2) return {2, false};
  return {0, true};
}

// How the streaming forward_with_grad lets a row's second read find it in L2
// (StreamReuse), from FUSED_CE_CUDA_STREAM_REUSE (read once per process):
// "none", "keep" (the first read's lines get evict_last priority), "reverse"
// (the second pass walks the row last step first) or "both", the default
// (any other value: none).  One H100 (benchmarks/results/gpu-2026-11-27-h100-b),
// forward + backward over a copy of the logits, none -> both: 16384 x 128256
// bf16 1.67x -> 1.60x, 8192 x 256000 bf16 1.68x -> 1.67x, 4096 x 128256 fp32
// 1.58x -> 1.57x.
// Fewer rows in flight to keep more of each in L2 lost far more than it
// saved (at most 2 blocks per SM: 1.91x, 1.98x, 1.69x), so every block
// that fits runs.
inline StreamReuse stream_reuse() {
  static const StreamReuse reuse = [] {
    const char* v = std::getenv("FUSED_CE_CUDA_STREAM_REUSE");
    StreamReuse r;
    r.keep_first_read = v == nullptr || std::strcmp(v, "keep") == 0 || std::strcmp(v, "both") == 0;
    r.reverse_second = v == nullptr || std::strcmp(v, "reverse") == 0 || std::strcmp(v, "both") == 0;
    return r;
  }();
  return reuse;
}

// Threads per streamed long row of forward_with_grad (class targets, vector
// access, 16-bit and float32 rows): 384 for 16-bit rows, 768 for float32
// ones, or what FUSED_CE_CUDA_STREAM_BLOCK (read once per process) forces:
// 256, 384 or 768 (any other value: the default). At their 80 registers
// every width keeps 24 warps per SM (3 blocks of 256, 2 of 384, 1 of 768);
// the wider the block, the fewer rows lie between their two reads at once
// (132 SMs x 3 rows of 128256 bf16 classes are 101 MB, twice an H100's 50 MB
// L2; x 2 rows 67 MB; x 1 row 34 MB), but the more warps wait at the same
// block-wide reduction. One H100 (benchmarks/results/gpu-2026-11-27-h100-c),
// forward + backward over a copy of the logits, 256 / 384 / 768 threads:
// 16384 x 128256 bf16 1.60x / 1.54x / 1.62x, 8192 x 256000 bf16 1.67x /
// 1.64x / 1.63x, 4096 x 128256 fp32 (clusters off) 1.56x / 1.52x / 1.41x.
inline int forced_stream_row_block() {
  static const int threads = env_number("FUSED_CE_CUDA_STREAM_BLOCK", {"256", "384", "768"});
  return threads;
}

template <typename T>
int stream_row_block() {
  const int forced = forced_stream_row_block();
  if (forced != 0) return forced;
  return sizeof(T) == 4 ? 768 : 384;
}

// Whether the rows of stream_row_block are read through a StepRing of
// kStreamRingStages steps in shared memory rather than into registers.
// Nsight Compute put these rows' largest stall on global loads (24 warps per
// SM with 4 x 16 bytes each in flight); with 3 stages each thread has two
// more steps in flight, in 72 KB (384 threads) or 144 KB (768) of shared
// memory per block.  One H200 (benchmarks/results/gpu-2026-11-28-h200),
// forward + backward over a copy of the logits, registers / ring: 16384 x
// 128256 bf16 1.93x / 1.45x, 4096 x 256000 bf16 2.02x / 1.55x, 4096 x 152064
// bf16 2.04x / 1.50x, 2048 x 128256 bf16 2.09x / 1.59x, 8192 x 65536 fp16
// 1.94x / 1.54x.  So 16-bit rows take the ring by default wherever it keeps
// as many blocks per SM as the registers do (an H100 or H200: 2 of 384
// threads either way; a GPU with 100 KB of shared memory per SM would hold
// one).  Float32 rows stream only past the clusters' reach, where the ring
// is not timed yet: registers by default.  FUSED_CE_CUDA_STREAM_STAGES (read
// once per process) forces the ring for both with "3" (the stage count),
// wherever the device can give its shared memory, and turns it off with
// "0"; any other value keeps the default.
constexpr int kStreamRingStages = 3;

enum class StreamRing { kOff, kWhereNoBlockIsLost, kWherePossible };

template <typename T>
StreamRing stream_ring() {
  static const int forced = [] {  // -1: not forced
    const char* v = std::getenv("FUSED_CE_CUDA_STREAM_STAGES");
    if (v != nullptr && std::strcmp(v, "0") == 0) return 0;
    if (v != nullptr && std::strcmp(v, "3") == 0) return kStreamRingStages;
    return -1;
  }();
  if (forced == 0) return StreamRing::kOff;
  if (forced > 0) return StreamRing::kWherePossible;
  return sizeof(T) == 2 ? StreamRing::kWhereNoBlockIsLost : StreamRing::kOff;
}

// Whether the device keeps at least as many blocks of `ring` (with
// `shared_bytes` of dynamic shared memory, already allowed) per SM as of
// `registers`, both of `threads` threads: two host-side queries.
template <typename RingKernel, typename RegisterKernel>
bool ring_keeps_blocks(RingKernel ring, RegisterKernel registers, int threads, int shared_bytes) {
  const int ring_blocks = blocks_per_sm(ring, threads, shared_bytes);
  return ring_blocks > 0 && ring_blocks >= blocks_per_sm(registers, threads, 0);
}

// One launch of forward_with_grad's stream kernel over rows of BLOCK threads:
// with STAGES > 0 through the dynamic shared memory of its StepRing, which
// past 48 KB the kernel must be allowed first.  Returns false (launching
// nothing) where the device cannot give it, or `ring` asks for no lost block
// and the ring would lose one.
template <typename T, int BLOCK, bool CAP, int STAGES>
bool launch_stream_rows(const CrossEntropyForwardParams<T>& p, StreamReuse reuse, StreamRing ring,
                        cudaStream_t stream) {
  constexpr int VEC = vector_width<T>();
  const auto kernel = ce_forward_stream_kernel<T, BLOCK, BLOCK, VEC, false, CAP, STAGES>;
  int shared_bytes = 0;
  if constexpr (STAGES > 0) {
    shared_bytes = StepRing<T, stream_unroll<VEC, false>(), BLOCK, VEC, STAGES>::shared_bytes();
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky; the caller launches the register version
      return false;
    }
    static PerDeviceFact keeps_blocks;
    const auto registers = ce_forward_stream_kernel<T, BLOCK, BLOCK, VEC, false, CAP, 0>;
    if (ring == StreamRing::kWhereNoBlockIsLost &&
        !keeps_blocks.get([&](int) { return ring_keeps_blocks(kernel, registers, BLOCK, shared_bytes); }))
      return false;
  }
  kernel<<<grid_for(p.N * p.D, 1), BLOCK, shared_bytes, stream>>>(p, loss_math<CAP>(p), reuse);
  return true;
}

// forward_with_grad's class-target rows streamed by one block of BLOCK
// threads each (stream_row_block), through shared memory where
// stream_ring<T>() asks for it and the device allows it.
template <typename T, int BLOCK>
void launch_wide_stream_rows(const CrossEntropyForwardParams<T>& p, bool capped, StreamReuse reuse,
                             cudaStream_t stream) {
  const StreamRing ring = stream_ring<T>();
  auto launch = [&](auto cap_tag) {
    constexpr bool CAP = decltype(cap_tag)::value;
    if (ring == StreamRing::kOff || !launch_stream_rows<T, BLOCK, CAP, kStreamRingStages>(p, reuse, ring, stream))
      launch_stream_rows<T, BLOCK, CAP, 0>(p, reuse, ring, stream);
  };
  capped ? launch(BoolTag<true>{}) : launch(BoolTag<false>{});
}

// Whether `kernel`, a kernel split over thread-block clusters, can run on
// the current device: the device launches clusters, and the code loaded for
// it was compiled from sm_90 or newer source. An sm_80 build holds the
// trapping stubs of ce_cluster.cuh; run on an sm_90 device through PTX
// compiled by the driver, its binaryVersion says 90 while its ptxVersion
// still says 80, so both are checked. Cached per device: the answer only
// depends on the device and the loaded module.
template <typename Kernel>
bool clusters_usable(Kernel kernel) {
  static PerDeviceFact usable;
  return usable.get([&](int device) {
    int cluster_launch = 0;
    cudaFuncAttributes attributes;
    if (cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device) != cudaSuccess ||
        (cluster_launch != 0 && cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess)) {
      (void)cudaGetLastError();
      return false;
    }
    return cluster_launch != 0 && attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
  });
}

// Threads per block of the 16-bit rows split over clusters past one block,
// from FUSED_CE_CUDA_CLUSTER_BLOCK (read once per process): 1024 (blocks of
// 1024 threads x 4 slots, the one-block configuration of 16-bit rows of
// 16k-32k classes: 64 registers, 32 warps per SM; 128256 classes in clusters
// of 4, 256000 in clusters of 8) or 0, the default and any other value
// (blocks of 256 threads x 8 slots). An experiment: Nsight Compute put the
// 256 x 8 blocks at 95 registers and one block (8 warps) per SM, and 16384 x
// 128256 bf16 in clusters of 8 at 1.90x the copy, where float32 rows reach
// 1.39x. Not timed yet.
inline int cluster_block() {
  static const int threads = env_number("FUSED_CE_CUDA_CLUSTER_BLOCK", {"1024"});
  return threads;
}

// Register-resident rows split over a cluster of CLUSTER blocks of BLOCK
// threads (ce_resident_kernel.cuh), smallest capacity first: CLUSTER * BLOCK
// * CH slots.  256-thread blocks (80 registers for bf16, 119 with the
// softcap) leave room for two or three blocks per SM, so one row's
// reductions overlap other rows' loads; the 512-thread configuration is
// there for the longest rows (256k bf16).  Clusters of 2 blocks hold no more
// than one 1024-thread block: they are tried before one block per row
// (cluster_plan). *launched is false when the row is too long or needs a
// cluster of more than max_cluster blocks, the device or the loaded
// code has no clusters, or the device cannot schedule such a cluster now
// (cudaOccupancyMaxActiveClusters, a host-side query, so nothing that would
// fail is enqueued, also during graph capture: e.g. 8 blocks that each need
// a whole SM, under MPS or green-context limits); the row then takes the
// streaming kernel instead of failing the call. Otherwise the launch's error.
template <bool CAP, typename T>
cudaError_t launch_cluster_resident(const CrossEntropyForwardParams<T>& p, int64_t slots, int max_cluster,
                                    cudaStream_t stream, bool* launched) {
  constexpr int V = vector_width<T>();
  const int64_t rows = p.N;
  const auto math = loss_math<CAP>(p);
  *launched = false;
  auto launch = [&](auto kernel, int cluster, int block) -> cudaError_t {
    // One cluster per row at most; the kernel walks rows with a cluster stride.
    const int64_t max_clusters = 0x7fffffff / cluster;
    const int64_t clusters = rows < max_clusters ? rows : max_clusters;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned int>(cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned int>(clusters * cluster));
    config.blockDim = dim3(static_cast<unsigned int>(block));
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    config.attrs = attribute;
    config.numAttrs = 1;
    int active_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&active_clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // not the error of a later launch check
      return cudaSuccess;
    }
    if (active_clusters < 1) return cudaSuccess;
    *launched = true;
    return cudaLaunchKernelEx(&config, kernel, p, math);
  };
#define FUSED_CE_CLUSTER_RESIDENT(CLUSTER, BLOCK, CH)                                                 \
  if (slots <= int64_t(CLUSTER) * (BLOCK) * (CH)) {                                                  \
    if ((CLUSTER) > max_cluster) return cudaSuccess;                                                \
    const auto kernel = ce_forward_grad_resident_kernel<T, BLOCK, BLOCK, V, CH, CAP, CLUSTER>;        \
    return clusters_usable(kernel) ? launch(kernel, CLUSTER, BLOCK) : cudaSuccess;                  \
  }
  if constexpr (sizeof(T) == 2) {
    // Past one 1024-thread block of 4 slots (cluster_block).
    if (cluster_block() == 1024 && slots > 1024 * 4) {
      FUSED_CE_CLUSTER_RESIDENT(2, 1024, 4)
      FUSED_CE_CLUSTER_RESIDENT(4, 1024, 4)
      FUSED_CE_CLUSTER_RESIDENT(8, 1024, 4)
      return cudaSuccess;
    }
  }
  FUSED_CE_CLUSTER_RESIDENT(2, 256, 8)
  FUSED_CE_CLUSTER_RESIDENT(4, 256, 8)
  FUSED_CE_CLUSTER_RESIDENT(8, 256, 8)
  FUSED_CE_CLUSTER_RESIDENT(8, 512, 8)
#undef FUSED_CE_CLUSTER_RESIDENT
  return cudaSuccess;
}

template <typename T>
cudaError_t run_forward(const CrossEntropyForwardParams<T>& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const bool prob = p.target_prob != nullptr;
  const bool with_grad = p.grad_input != nullptr;
  const bool capped = p.softcap > 0.0;
  const int64_t rows = p.N * p.D;
  if (!valid_sizes<T>(p.N, p.C, p.D) || !valid_options(p.label_smoothing, p.z_loss, p.softcap) ||
      p.workspace == nullptr || p.total_weight == nullptr)
    return cudaErrorInvalidValue;
  if (with_grad && p.grad_input == p.input && !gradient_layout(p)) return cudaErrorInvalidValue;
  // Empty tensors may have null data pointers; only non-empty ones must be set.
  if (rows > 0 && (p.input == nullptr || p.loss == nullptr || p.lse == nullptr ||
                   prob == (p.target != nullptr)))
    return cudaErrorInvalidValue;

  // total_weight (and the gradient scale) first: they only need the targets.
  // Under FUSED_CE_CUDA_WIDE_REDUCTIONS (ce_reduce_loss.cuh) one wide block
  // takes up to kWideReduceRows rows alone.
  int num_partials = 0;
  if (!prob && rows > 0) {
    int64_t blocks = (rows + kMinRowsPerPartial - 1) / kMinRowsPerPartial;
    if (blocks > kMaxWeightPartials) blocks = kMaxWeightPartials;
    const int64_t chunk = (rows + blocks - 1) / blocks;
    num_partials = static_cast<int>(blocks);
    if (num_partials == 1) {
      ce_target_weight_partials_kernel<T, true><<<1, kReduceThreads, 0, stream>>>(p, chunk);
    } else if (rows <= kWideReduceRows && wide_reductions()) {
      num_partials = 1;
      ce_target_weight_partials_kernel<T, true, kWideReduceThreads><<<1, kWideReduceThreads, 0, stream>>>(p, rows);
    } else {
      ce_target_weight_partials_kernel<T, false><<<num_partials, kReduceThreads, 0, stream>>>(p, chunk);
    }
    FUSED_CE_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (num_partials != 1) {
    ce_finalize_total_weight_kernel<Acc><<<1, kReduceThreads, 0, stream>>>(
        p.workspace, num_partials, prob ? static_cast<Acc>(rows) : Acc(0), p.reduction, p.total_weight);
    FUSED_CE_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (rows == 0) return cudaSuccess;

  // Gradient rows are contiguous (N, C, D): class stride 1 only when D == 1.
  const bool row_layout = class_contiguous(p.input_stride_c, p.C) &&
                          (!prob || class_contiguous(p.prob_stride_c, p.C)) && (!with_grad || p.D == 1);
  bool vector_ok = element_aligned<T>(p.input);
  if (prob)
    vector_ok = vector_ok && same_phase<T>(p.input, p.input_stride_n, p.input_stride_d, p.target_prob,
                                           p.prob_stride_n, p.prob_stride_d, p.N, p.D);
  if (with_grad)
    vector_ok = vector_ok && same_phase<T>(p.input, p.input_stride_n, p.input_stride_d, p.grad_input,
                                           p.C * p.D, 1, p.N, p.D);

  if (!prob && with_grad && row_layout && vector_ok &&
      p.C * static_cast<int64_t>(sizeof(T)) > kTinyRowBytes) {
    // A row has at most C / VEC body slots (the head and tail elements are
    // held separately).
    const int64_t slots = p.C / vector_width<T>();
    bool launched = false;
    auto try_clusters = [&](int max_cluster) {
      return capped ? launch_cluster_resident<true>(p, slots, max_cluster, stream, &launched)
                    : launch_cluster_resident<false>(p, slots, max_cluster, stream, &launched);
    };
    const ClusterPlan clusters = cluster_plan<T>();
    if (clusters.first_up_to > 0 && slots > kSlotsOf256ThreadBlock) {
      const cudaError_t err = try_clusters(clusters.first_up_to);
      if (launched) return err;
    }
    const cudaError_t err = capped ? launch_resident<true>(p, slots, stream, &launched)
                                   : launch_resident<false>(p, slots, stream, &launched);
    if (launched) return err;
    if (clusters.after) {
      const cudaError_t cluster_err = try_clusters(kMaxClusterBlocks);
      if (launched) return cluster_err;
    }
  }

  const RowPlan plan = plan_rows<T>(p.C, row_layout, vector_ok);
  const StreamReuse reuse = with_grad ? stream_reuse() : StreamReuse{};
  if constexpr (sizeof(T) <= 4) {
    const int width = stream_row_block<T>();
    if (with_grad && !prob && plan.vectorized && plan.tpr == kStreamBlock &&
        (width != kStreamBlock || stream_ring<T>() != StreamRing::kOff)) {
      if (width == 384) {
        launch_wide_stream_rows<T, 384>(p, capped, reuse, stream);
      } else if (width == 768) {
        launch_wide_stream_rows<T, 768>(p, capped, reuse, stream);
      } else {
        launch_wide_stream_rows<T, kStreamBlock>(p, capped, reuse, stream);
      }
      return cudaGetLastError();
    }
  }
  return dispatch_row_plan<T>(plan, [&](auto tpr_tag, auto vec_tag) {
    constexpr int TPR = decltype(tpr_tag)::value;
    constexpr int VEC = decltype(vec_tag)::value;
    constexpr int BLOCK = TPR > kStreamBlock ? TPR : kStreamBlock;
    const unsigned int grid = grid_for(rows, BLOCK / TPR);
    dispatch_flags(prob, capped, [&](auto prob_tag, auto cap_tag) {
      constexpr bool CAP = decltype(cap_tag)::value;
      ce_forward_stream_kernel<T, TPR, BLOCK, VEC, decltype(prob_tag)::value, CAP>
          <<<grid, BLOCK, 0, stream>>>(p, loss_math<CAP>(p), reuse);
    });
  });
}

// ---------------------------------------------------------------------------
// Backward.

template <typename T>
cudaError_t run_backward(const CrossEntropyBackwardParams<T>& p, cudaStream_t stream) {
  const bool prob = p.target_prob != nullptr;
  const bool capped = p.softcap > 0.0;
  const int64_t rows = p.N * p.D;
  if (!valid_sizes<T>(p.N, p.C, p.D) || !valid_options(p.label_smoothing, p.z_loss, p.softcap))
    return cudaErrorInvalidValue;
  if (rows == 0 || (p.grad_input == nullptr && p.grad_target == nullptr)) return cudaSuccess;
  if (p.input == nullptr || p.grad_loss == nullptr || p.lse == nullptr || prob == (p.target != nullptr) ||
      (!prob && p.grad_target != nullptr))
    return cudaErrorInvalidValue;

  if (!prob && p.label_smoothing > 0.0 && p.weight != nullptr) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;
    ce_weight_sum_kernel<T><<<1, kReduceThreads, 0, stream>>>(p.weight, p.C, p.workspace);
    FUSED_CE_RETURN_IF_ERROR(cudaGetLastError());
  }

  const bool row_layout = class_contiguous(p.input_stride_c, p.C) &&
                          (!prob || class_contiguous(p.prob_stride_c, p.C)) && p.D == 1;
  bool vector_ok = element_aligned<T>(p.input);
  // The targets are only read for grad_input.
  if (prob && p.grad_input != nullptr)
    vector_ok = vector_ok && same_phase<T>(p.input, p.input_stride_n, p.input_stride_d, p.target_prob,
                                           p.prob_stride_n, p.prob_stride_d, p.N, p.D);
  if (p.grad_input != nullptr)
    vector_ok = vector_ok && same_phase<T>(p.input, p.input_stride_n, p.input_stride_d, p.grad_input,
                                           p.C * p.D, 1, p.N, p.D);
  if (p.grad_target != nullptr)
    vector_ok = vector_ok && same_phase<T>(p.input, p.input_stride_n, p.input_stride_d, p.grad_target,
                                           p.C * p.D, 1, p.N, p.D);

  const RowPlan plan = plan_rows<T>(p.C, row_layout, vector_ok);
  return dispatch_row_plan<T>(plan, [&](auto tpr_tag, auto vec_tag) {
    constexpr int TPR = decltype(tpr_tag)::value;
    constexpr int VEC = decltype(vec_tag)::value;
    constexpr int BLOCK = TPR > kStreamBlock ? TPR : kStreamBlock;
    const unsigned int grid = grid_for(rows, BLOCK / TPR);
    dispatch_flags(prob, capped, [&](auto prob_tag, auto cap_tag) {
      constexpr bool CAP = decltype(cap_tag)::value;
      ce_backward_stream_kernel<T, TPR, BLOCK, VEC, decltype(prob_tag)::value, CAP>
          <<<grid, BLOCK, 0, stream>>>(p, loss_math<CAP>(p));
    });
  });
}

#undef FUSED_CE_RETURN_IF_ERROR

}  // namespace detail

template <typename T>
cudaError_t launch_cross_entropy_forward(const CrossEntropyForwardParams<T>& p, cudaStream_t stream) {
  CrossEntropyForwardParams<T> forward_only = p;
  forward_only.grad_input = nullptr;
  return detail::run_forward(forward_only, stream);
}

template <typename T>
cudaError_t launch_cross_entropy_forward_with_grad(const CrossEntropyForwardParams<T>& p,
                                                   cudaStream_t stream) {
  if ((p.grad_input == nullptr && p.N * p.C * p.D > 0) ||
      (p.reduction != kReductionMean && p.reduction != kReductionSum))
    return cudaErrorInvalidValue;
  return detail::run_forward(p, stream);
}

template <typename T>
cudaError_t launch_cross_entropy_backward(const CrossEntropyBackwardParams<T>& p, cudaStream_t stream) {
  return detail::run_backward(p, stream);
}

// Explicit instantiation of the launchers for one storage type.  Each
// launchers_<dtype>.cu does this for its type, so the kernels of the four
// types compile in parallel, torch-free, and the binding only needs the
// declarations in ce_params.cuh.
#define FUSED_CE_INSTANTIATE_LAUNCHERS(T)                                                         \
  template cudaError_t launch_cross_entropy_forward<T>(const CrossEntropyForwardParams<T>&,       \
                                                       cudaStream_t);                            \
  template cudaError_t launch_cross_entropy_forward_with_grad<T>(const CrossEntropyForwardParams<T>&, \
                                                                 cudaStream_t);                  \
  template cudaError_t launch_cross_entropy_backward<T>(const CrossEntropyBackwardParams<T>&,     \
                                                        cudaStream_t);                           \
  template cudaError_t launch_scale_gradient<T>(T*, int64_t, GradientScale<T>, cudaStream_t);      \
  template cudaError_t launch_reduce_loss<T>(const acc_t<T>*, int64_t, const acc_t<T>*, int, acc_t<T>*, T*, \
                                             cudaStream_t);

}  // namespace cuda
}  // namespace fused_ce
