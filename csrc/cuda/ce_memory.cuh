// Global-memory access helpers: vector packs, cache-policy loads/stores and
// the "slot" view of one row that lets every row, whatever its alignment, be
// read with aligned 16-byte accesses.
#pragma once

#include <cstdint>
#include <cstring>

#include "ce_common.cuh"

namespace fused_ce {
namespace cuda {

// Bytes one vector access moves.  16 bytes is the widest single load/store.
constexpr int kVectorBytes = 16;

// Elements of T per 16-byte vector (8 half/bf16, 4 float, 2 double).
template <typename T>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(T));
}

// VEC consecutive elements, aligned so one instruction moves them.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Unsigned integer types of each access size: loads and stores go through
// them so the cache-hinted intrinsics (__ldg/__ldcs/__stcs), which only
// exist for builtin types, can be used for every storage type.
template <int BYTES>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
template <>
struct RawBits<8> {
  using type = unsigned long long;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

// kKeep: read-only path through L1, normal L2 priority (first read of data
// that is read again soon).  kCoherent: the same caching through the
// ordinary, coherent path (ld.global.ca), for the logits: the in-place
// operator overwrites them within the kernel, and the read-only path
// (ld.global.nc) requires data that stays unchanged for the whole kernel.
// kStream: evict-first (last read of data, or writes that must not push the
// logits out of L2); coherent.
// kHinted: the coherent path with the L2 eviction priority of a policy made
// at run time (l2_policy below), for the first of two reads of a row whose
// second read should find it in L2.
enum class CachePolicy { kKeep, kCoherent, kStream, kHinted };

// An L2 cache policy for kHinted loads: evict_last keeps the lines past
// ordinary traffic (the row read again soon), evict_normal is what an
// unhinted load gets.  createpolicy needs sm_80; older GPUs and the CPU
// emulator ignore the hint.
__device__ __forceinline__ uint64_t l2_policy(bool keep) {
  uint64_t policy = 0;
#if !defined(FUSED_CE_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (keep) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
  }
#else
  (void)keep;
#endif
  return policy;
}

// ld.global with an L2 cache policy (same caching otherwise as __ldca).
template <typename Raw>
__device__ __forceinline__ Raw load_with_l2_policy(const Raw* ptr, uint64_t policy) {
#if !defined(FUSED_CE_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  Raw raw;
  if constexpr (sizeof(Raw) == 16) {
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                 : "l"(ptr), "l"(policy));
  } else if constexpr (sizeof(Raw) == 8) {
    asm volatile("ld.global.L2::cache_hint.b64 %0, [%1], %2;" : "=l"(raw) : "l"(ptr), "l"(policy));
  } else if constexpr (sizeof(Raw) == 4) {
    asm volatile("ld.global.L2::cache_hint.b32 %0, [%1], %2;" : "=r"(raw) : "l"(ptr), "l"(policy));
  } else {
    asm volatile("ld.global.L2::cache_hint.b16 %0, [%1], %2;" : "=h"(raw) : "l"(ptr), "l"(policy));
  }
  return raw;
#else
  (void)policy;
  return __ldca(ptr);
#endif
}

// `l2` is the policy of kHinted loads (ignored by the others).
template <CachePolicy P, typename V>
__device__ __forceinline__ V load_global(const V* ptr, uint64_t l2 = 0) {
  using Raw = typename RawBits<sizeof(V)>::type;
  static_assert(sizeof(Raw) == sizeof(V), "unsupported access size");
  const Raw* raw_ptr = reinterpret_cast<const Raw*>(ptr);
  Raw raw;
  if (P == CachePolicy::kHinted) {
    raw = load_with_l2_policy(raw_ptr, l2);
  } else if (P == CachePolicy::kStream) {
    raw = __ldcs(raw_ptr);
  } else if (P == CachePolicy::kCoherent) {
    raw = __ldca(raw_ptr);
  } else {
    raw = __ldg(raw_ptr);
  }
  V value;
  memcpy(&value, &raw, sizeof(V));
  return value;
}

// The CPU emulator counts the bytes of plain stores (tests/cuda_emulator);
// on a GPU this is nothing.
#ifndef FUSED_CE_TRACE_STORE
#define FUSED_CE_TRACE_STORE(address, bytes) ((void)0)
#endif

template <CachePolicy P, typename V>
__device__ __forceinline__ void store_global(V* ptr, const V& value) {
  using Raw = typename RawBits<sizeof(V)>::type;
  static_assert(sizeof(Raw) == sizeof(V), "unsupported access size");
  Raw raw;
  memcpy(&raw, &value, sizeof(V));
  Raw* raw_ptr = reinterpret_cast<Raw*>(ptr);
  if (P == CachePolicy::kStream) {
    __stcs(raw_ptr, raw);
  } else {
    FUSED_CE_TRACE_STORE(raw_ptr, sizeof(Raw));
    *raw_ptr = raw;
  }
}

// How one row of C elements is split for vector access.
//
// A row rarely starts on a 16-byte boundary (C = 50257, a sliced tensor), so
// it is cut into
//   head  classes [0, head): the elements before the first 16-byte boundary
//   body  body_slots aligned VEC-wide "slots"; slot k is classes
//         [head + k*VEC, head + (k+1)*VEC) and is one aligned vector access
//   tail  classes [tail_begin, C): the elements after the last full slot.
// Head and tail have fewer than VEC elements each and are spread one element
// per lane (lane j owns head class j and tail class tail_begin + j), so the
// hot loops over the body need no per-element bounds checks, and no access
// ever falls outside the row.
//
// With VEC == 1 there is no head or tail, slot k is class k, and the row may
// have any class stride (the class-strided (N, C, D) layout).  With VEC > 1
// the class stride is 1 for every tensor involved, and the launcher has
// checked that all of them have the same 16-byte phase on every row, so one
// RowSplit (computed from the input row) serves them all.
template <int VEC>
struct RowSplit {
  int num_classes;  // C
  int head;         // < VEC
  int body_slots;
  int tail_begin;   // head + body_slots * VEC
  int tail;         // < VEC

  template <typename T>
  __device__ __forceinline__ static RowSplit make(const T* row, int num_classes) {
    RowSplit s;
    s.num_classes = num_classes;
    if (VEC == 1) {
      s.head = 0;
    } else {
      // Element offset of `row` from the previous 16-byte boundary.
      const int phase = static_cast<int>((reinterpret_cast<uintptr_t>(row) % kVectorBytes) / sizeof(T));
      s.head = phase == 0 ? 0 : (VEC - phase < num_classes ? VEC - phase : num_classes);
    }
    s.body_slots = (num_classes - s.head) / VEC;
    s.tail_begin = s.head + s.body_slots * VEC;
    s.tail = num_classes - s.tail_begin;
    return s;
  }

  // An empty row (idle groups still take part in reductions).
  __device__ __forceinline__ void clear() {
    head = 0;
    body_slots = 0;
    tail_begin = 0;
    tail = 0;
  }

  __device__ __forceinline__ int slot_class(int slot) const { return head + slot * VEC; }

  // The class of this lane's head (e = 0) or tail (e = 1) element, or -1.
  __device__ __forceinline__ int edge_class(int lane, int e) const {
    if (e == 0) return lane < head ? lane : -1;
    return lane < tail ? tail_begin + lane : -1;
  }
};

// Number of edge elements a lane may own (one head, one tail).
constexpr int kEdges = 2;

// Body slot `slot` of `row` into `out` (`fill` when slot >= body_slots).
// `stride` is the class stride, only used when VEC == 1.
template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void load_slot(const T* row, int64_t stride, const RowSplit<VEC>& rs, int slot,
                                          T fill, T (&out)[VEC], uint64_t l2 = 0) {
  if (slot >= rs.body_slots) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  } else if (VEC == 1) {
    out[0] = load_global<P>(row + static_cast<int64_t>(slot) * stride, l2);
  } else {
    const Pack<T, VEC> p = load_global<P>(reinterpret_cast<const Pack<T, VEC>*>(row + rs.slot_class(slot)), l2);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p.v[j];
  }
}

// Stores body slot `slot` of `row` (nothing when slot >= body_slots).
template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void store_slot(T* row, int64_t stride, const RowSplit<VEC>& rs, int slot,
                                           const T (&in)[VEC]) {
  if (slot >= rs.body_slots) return;
  if (VEC == 1) {
    store_global<P>(row + static_cast<int64_t>(slot) * stride, in[0]);
  } else {
    Pack<T, VEC> p;
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = in[j];
    store_global<P>(reinterpret_cast<Pack<T, VEC>*>(row + rs.slot_class(slot)), p);
  }
}

// One step of a streaming loop over the body: a thread's U slots first,
// first + TPR, ..., first + (U-1)*TPR (consecutive threads of the group take
// consecutive slots, so each of the U accesses is coalesced across the
// group).  All U loads are issued before any is consumed, which is what
// keeps enough bytes in flight.
template <CachePolicy P, int U, int TPR, int VEC, typename T>
__device__ __forceinline__ void load_step(const T* row, int64_t stride, const RowSplit<VEC>& rs,
                                          int first, T fill, T (&out)[U][VEC], uint64_t l2 = 0) {
#pragma unroll
  for (int u = 0; u < U; ++u) load_slot<P>(row, stride, rs, first + u * TPR, fill, out[u], l2);
}

template <CachePolicy P, int U, int TPR, int VEC, typename T>
__device__ __forceinline__ void store_step(T* row, int64_t stride, const RowSplit<VEC>& rs, int first,
                                           const T (&in)[U][VEC]) {
#pragma unroll
  for (int u = 0; u < U; ++u) store_slot<P>(row, stride, rs, first + u * TPR, in[u]);
}

template <int U, int VEC, typename T>
__device__ __forceinline__ void fill_step(T (&out)[U][VEC], T value) {
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[u][j] = value;
}

// Asynchronous copies of 16 bytes from global to shared memory (cp.async,
// sm_80+), for the streamed rows' pipelined passes (StepRing below): unlike
// a load into registers, a copy in flight holds no register, so a thread can
// keep several steps of a row in flight at the registers of one.  Copies go
// through L2 only (.cg), with an L2 policy (l2_policy, l2_evict_first).
// async_commit closes a group of copies; async_wait<N> waits until at most
// the N newest groups are still in flight.  Before sm_80 the copy is an
// ordinary load and store; the CPU emulator runs each group's copies when
// it is waited for, as late as the hardware may.
__device__ __forceinline__ void async_copy_16(void* shared, const void* global, uint64_t l2) {
#if defined(FUSED_CE_CUDA_EMULATION)
  (void)l2;
  ::emu::async_copy(shared, global, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(address), "l"(global), "l"(l2)
               : "memory");
#else
  (void)l2;
  *static_cast<uint4*>(shared) = *static_cast<const uint4*>(global);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(FUSED_CE_CUDA_EMULATION)
  ::emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(FUSED_CE_CUDA_EMULATION)
  ::emu::async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// The L2 policy of the last read of data (what kStream loads get).
__device__ __forceinline__ uint64_t l2_evict_first() {
  uint64_t policy = 0;
#if !defined(FUSED_CE_CUDA_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
#endif
  return policy;
}

// One thread's ring of STAGES steps of U body slots in the block's dynamic
// shared memory, laid out [stage][u][thread] so that a warp's copies of one
// slot are 512 consecutive bytes.  A thread reads back only what it copied
// itself, so the ring needs no barrier, only the copies' own waits.  Each
// block of BLOCK threads needs shared_bytes() of dynamic shared memory.
template <typename T, int U, int BLOCK, int VEC, int STAGES>
struct StepRing {
  static constexpr int shared_bytes() { return STAGES * U * BLOCK * kVectorBytes; }

  Pack<T, VEC>* slots;
  int thread;

  __device__ __forceinline__ Pack<T, VEC>& at(int stage, int u) const { return slots[(stage * U + u) * BLOCK + thread]; }

  // Starts the copies of the step whose first slot is `first` into `stage`
  // and closes their group (an empty group past the row's last slot).
  __device__ __forceinline__ void issue(const T* row, const RowSplit<VEC>& rs, int first, int stage,
                                        uint64_t l2) const {
    static_assert(VEC * sizeof(T) == kVectorBytes, "the ring holds whole 16-byte slots");
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int slot = first + u * BLOCK;
      if (slot < rs.body_slots) async_copy_16(&at(stage, u), row + rs.slot_class(slot), l2);
    }
    async_commit();
  }

  // The step of `stage` (its copies waited for), `fill` past the body.  The
  // slots past the body are read too (nothing was copied there) and their
  // values dropped: a select, where a branch around the read cost the
  // 16-bit kernels 28-48 bytes of spills at their 80 registers.
  __device__ __forceinline__ void read(const RowSplit<VEC>& rs, int first, int stage, T fill,
                                       T (&out)[U][VEC]) const {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool real = first + u * BLOCK < rs.body_slots;
      const Pack<T, VEC> p = at(stage, u);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[u][j] = real ? p.v[j] : fill;
    }
  }

  // body(first, step) for the thread's `steps` steps in the order
  // first_slot(0), first_slot(1), ..., with the copies of the next
  // STAGES - 1 steps in flight while one is processed.  Every copy has
  // arrived when it returns.
  template <typename FirstSlot, typename Body>
  __device__ __forceinline__ void for_each_step(const T* row, const RowSplit<VEC>& rs, int steps,
                                                FirstSlot first_slot, uint64_t l2, T fill, Body body) const {
    // One group per step, empty past the last one, so that the wait below
    // counts right: before step k's wait, groups 0 .. k + STAGES - 1 exist.
    auto start = [&](int k) {
      if (k < steps) {
        issue(row, rs, first_slot(k), k % STAGES, l2);
      } else {
        async_commit();
      }
    };
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) start(k);
    for (int k = 0; k < steps; ++k) {
      start(k + STAGES - 1);  // into the stage read (and used) at step k - 1
      async_wait<STAGES - 1>();
      T step[U][VEC];  // the body may overwrite it
      const int first = first_slot(k);
      read(rs, first, k % STAGES, fill, step);
      body(first, step);
    }
  }
};

// The lane's edge elements (class -1: none, value `fill`).  Edges only exist
// with VEC > 1, where the class stride is 1.
template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void load_edges(const T* row, const RowSplit<VEC>& rs, int lane, T fill,
                                           T (&out)[kEdges]) {
#pragma unroll
  for (int e = 0; e < kEdges; ++e) {
    const int c = rs.edge_class(lane, e);
    out[e] = c >= 0 ? load_global<P>(row + c) : fill;
  }
}

template <CachePolicy P, int VEC, typename T>
__device__ __forceinline__ void store_edges(T* row, const RowSplit<VEC>& rs, int lane, const T (&in)[kEdges]) {
#pragma unroll
  for (int e = 0; e < kEdges; ++e) {
    const int c = rs.edge_class(lane, e);
    if (c >= 0) store_global<P>(row + c, in[e]);
  }
}

// Class weight w_c in the accumulation type (1 when there are no weights).
// Weights are a small vector read by every row, so the read-only cache
// serves them.
template <typename T>
__device__ __forceinline__ acc_t<T> class_weight(const T* weight, int64_t c) {
  return weight == nullptr ? acc_t<T>(1) : to_acc(load_global<CachePolicy::kKeep>(weight + c));
}

}  // namespace cuda
}  // namespace fused_ce
