// Rows split across a thread-block cluster (sm_90+): the row schedule, the
// slice of a row each block owns, and the cluster-wide all-reduce through
// distributed shared memory.
//
// A row too long for one block's registers (a 128k or 256k vocabulary) is
// held by the CLUSTER blocks of a cluster, each keeping a contiguous slice of
// its 16-byte body slots in registers; the row statistics are reduced inside
// each block, then across the cluster, so the row is still read once and its
// gradient written once (see ce_resident_kernel.cuh).
//
// Clusters need sm_90.  The kernels that use them are also compiled for
// older architectures (one build serves every GPU), where these helpers trap;
// the launcher only starts such a kernel when the device launches clusters
// and the code loaded for it was compiled from sm_90+ source, both its PTX
// and its binary version (cross_entropy_kernels.cuh, clusters_usable).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "ce_common.cuh"
#include "ce_reduce.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FUSED_CE_DEVICE_HAS_CLUSTERS 0
#else
#define FUSED_CE_DEVICE_HAS_CLUSTERS 1
#endif

namespace fused_ce {
namespace cuda {

// Cluster sizes the launcher may pick: portable (at most 8 blocks) and a
// divisor of every grid it launches.
constexpr int kMaxClusterBlocks = 8;

// This block's index within its (one-dimensional) cluster.
__device__ __forceinline__ int cluster_block_rank() {
#if FUSED_CE_DEVICE_HAS_CLUSTERS
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  __trap();
  return 0;
#endif
}

// Barrier of every thread of the cluster, with release/acquire ordering of
// their memory accesses at cluster scope (global memory included).
__device__ __forceinline__ void cluster_barrier() {
#if FUSED_CE_DEVICE_HAS_CLUSTERS
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

// Rows handled by clusters of CLUSTER blocks, one row per cluster per step;
// every block of a cluster walks the same rows (the cluster barriers need
// all of them).  The whole block is the row's group, so lane() is the
// thread index and there are no idle groups.
template <int CLUSTER, int BLOCK>
struct ClusterRowSchedule {
  __device__ __forceinline__ static int lane() { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ static int group() { return 0; }
  __device__ __forceinline__ static int64_t first_base() {
    return static_cast<int64_t>(blockIdx.x) / CLUSTER;
  }
  __device__ __forceinline__ static int64_t base_step() {
    return static_cast<int64_t>(gridDim.x) / CLUSTER;
  }
};

// The body slots [first, first + count) of a row that one block of the
// cluster holds: ceil(slots / CLUSTER) each, in rank order (the last blocks
// may hold fewer, or none).
struct SlotRange {
  int first;
  int count;

  __device__ __forceinline__ static SlotRange of_rank(int body_slots, int rank, int ranks) {
    const int per_rank = (body_slots + ranks - 1) / ranks;
    const int first = rank * per_rank;
    const int left = body_slots - first;
    return SlotRange{first, left < 0 ? 0 : (left < per_rank ? left : per_rank)};
  }
};

// All-reduce of one value per block (the block's own all-reduced Fields,
// identical on all its threads) over the CLUSTER blocks of the cluster.
// Every block folds the blocks' values in rank order, so all of them get
// bitwise the same result, run after run.  Must be called by every thread
// of every block of the cluster, with `parity` alternating from one call to
// the next: the exchange slot of call i is rewritten at call i + 2, and the
// barrier of call i + 1 orders that after every reader of call i.
// Also a memory barrier of the cluster (see cluster_barrier), which the
// in-place gradient relies on: a block's reads of the row (the target
// logit may lie in another block's slice) happen before any block writes
// its gradient slice.  Before a block exits, the cluster must pass one more
// cluster_barrier(), so that no block's shared memory disappears while
// another may still read it.
template <int CLUSTER, typename Acc, int K, typename Op>
__device__ __forceinline__ Fields<Acc, K> cluster_allreduce(const Fields<Acc, K>& block_value, Op op,
                                                            int parity) {
  __shared__ Fields<Acc, K> exchange[2];
  __shared__ Fields<Acc, K> folded;
  if (threadIdx.x == 0) exchange[parity] = block_value;
  cluster_barrier();
#if FUSED_CE_DEVICE_HAS_CLUSTERS
  if (threadIdx.x == 0) {
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    Fields<Acc, K> r = *cluster.map_shared_rank(&exchange[parity], 0);
#pragma unroll
    for (int rank = 1; rank < CLUSTER; ++rank) r = op(r, *cluster.map_shared_rank(&exchange[parity], rank));
    folded = r;
  }
#endif
  // `folded` is rewritten by the next call only after its cluster barrier,
  // which every thread reaches after reading it here.
  __syncthreads();
  return folded;
}

}  // namespace cuda
}  // namespace fused_ce
