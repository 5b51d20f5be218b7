// Stands in for CUDA's <cooperative_groups.h> in emulated builds (it is
// found first on the include path): the thread-block cluster API that
// csrc/cuda/ce_cluster.cuh uses, on emu_runtime.h's clusters.
#pragma once

#include "emu_runtime.h"

namespace cooperative_groups {

struct cluster_group {
  unsigned block_rank() const { return emu::cluster_rank(); }
  void sync() const { emu::sync_cluster(); }
  // The same __shared__ variable in block `rank` of this cluster.
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    return static_cast<T*>(emu::cluster_peer_address(address, rank));
  }
};

inline cluster_group this_cluster() { return cluster_group{}; }

}  // namespace cooperative_groups
