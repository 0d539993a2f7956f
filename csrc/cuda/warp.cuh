#pragma once
// A warp as the team of csrc/math/team_math.h: the lanes of one sample when its event is too
// large for one thread (kWarpMinEventSize and above).

#include <cstdint>
#include <type_traits>

#include "launch.cuh"

namespace fusedgauss {
namespace cuda {

/// Event sizes from which a per-sample matrix gets a warp per sample instead of a thread. Up
/// to 8 a thread's vectors and (covariance) factor are unrolled into registers (float's
/// compile-time tiers, launch.cuh); beyond, they would sit in local memory and a thread
/// would read its own matrix, uncoalesced, while a warp reads a sample's rows together, keeps
/// the factor in shared memory and a vector in a slot or two per lane.
constexpr int64_t kWarpMinEventSize = 9;

constexpr int kWarpSize = 32;

/// Row stride of a sample's matrix in shared memory: odd, so that the entries of a column,
/// read one per lane, fall in distinct banks.
__host__ __device__ inline int64_t warp_matrix_stride(int64_t k) { return k | 1; }

struct Warp {
  static constexpr int kSize = kWarpSize;
  static constexpr unsigned kAllLanes = 0xffffffffu;

  __device__ int lane() const { return static_cast<int>(threadIdx.x % kWarpSize); }
  __device__ void sync() const { __syncwarp(kAllLanes); }
  template <typename T>
  __device__ T broadcast(T v, int src) const {
    return __shfl_sync(kAllLanes, v, src);
  }
  /// A butterfly: every lane adds the same pairs in the same order, so every lane ends with
  /// the same bits.
  template <typename T>
  __device__ T sum(T v) const {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kAllLanes, v, offset);
    return v;
  }
};

/// Copies the lower triangle of a sample's k x k matrix, entry (i, j) = entry(i, j), into the
/// warp's rows `staged` (ld apart): row by row, the lanes across the columns, so that a row's
/// reads coalesce.
template <typename acc_t, typename Entry>
__device__ void stage_lower(const Warp& warp, int64_t k, const Entry& entry, acc_t* staged, int64_t ld) {
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = warp.lane(); j <= i; j += kWarpSize) staged[i * ld + j] = entry(i, j);
  }
}

/// Threads per block of the warp-per-sample kernels (at most; see warps_per_block).
constexpr int kWarpKernelThreads = 4 * kWarpSize;

/// Warps per block: four, or fewer where their matrices (`matrices` of k x ld each per warp)
/// would need more than 64 KiB of shared memory.
template <typename acc_t>
int warps_per_block(int64_t k, int matrices) {
  constexpr size_t kBlockBytes = 64 * 1024;
  const size_t warp_bytes = static_cast<size_t>(matrices * k * warp_matrix_stride(k)) * sizeof(acc_t);
  int warps = kWarpKernelThreads / kWarpSize;
  while (warps > 1 && warps * warp_bytes > kBlockBytes) warps /= 2;
  return warps;
}

/// The launch of a warp-per-sample kernel for n samples: its warps per block and shared
/// memory (`matrices` per warp, plus `extra_per_warp` entries).
template <typename acc_t>
LaunchShape warp_launch_shape(int64_t n, int64_t k, int matrices, int64_t extra_per_warp = 0) {
  const int warps = warps_per_block<acc_t>(k, matrices);
  const size_t elements = static_cast<size_t>(warps) * (matrices * k * warp_matrix_stride(k) + extra_per_warp);
  return {blocks_for(n, warps), warps * kWarpSize, elements * sizeof(acc_t)};
}

/// Runs fn(kSlots) with a std::integral_constant: the slots per lane that hold a k-vector.
template <typename F>
void with_warp_slots(int64_t k, const F& fn) {
  if (k <= kWarpSize) return fn(std::integral_constant<int, 1>{});
  return fn(std::integral_constant<int, 2>{});
}

/// The warps of a block, this warp's index among them, and its first sample and stride: the
/// samples of a grid stride go to the grid's warps in order.
struct WarpGrid {
  int warps;
  int index;
  int64_t first;
  int64_t stride;
  __device__ WarpGrid()
      : warps(static_cast<int>(blockDim.x / kWarpSize)),
        index(static_cast<int>(threadIdx.x / kWarpSize)),
        first(static_cast<int64_t>(blockIdx.x) * warps + index),
        stride(static_cast<int64_t>(gridDim.x) * warps) {}
};

/// This warp's matrices in the block's dynamic shared memory: `count` matrices of k rows, ld
/// apart, warp after warp; `past_matrices` is where the block's memory after every warp's
/// matrices begins (warp_launch_shape's extra entries).
template <typename acc_t>
struct WarpMatrices {
  int64_t k;
  int64_t ld;
  acc_t* first;
  acc_t* past_matrices;

  __device__ WarpMatrices(const WarpGrid& grid, int64_t k, int count)
      : k(k),
        ld(warp_matrix_stride(k)),
        first(static_cast<acc_t*>(dynamic_shared_memory()) + grid.index * count * k * ld),
        past_matrices(static_cast<acc_t*>(dynamic_shared_memory()) + grid.warps * count * k * ld) {}

  __device__ acc_t* operator[](int i) const { return first + i * k * ld; }
};

}  // namespace cuda
}  // namespace fusedgauss
