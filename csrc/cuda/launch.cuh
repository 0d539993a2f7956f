#pragma once
// What every CUDA kernel launch of fusedgauss shares: block and grid sizes, the event-size
// tiers that decide how large a thread's private arrays are, and checked launches on the
// current stream of the inputs' device.

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fusedgauss {
namespace cuda {

/// Threads per block of the per-sample kernels (one thread per sample).
constexpr int kThreads = 128;

/// Largest event size of the CUDA kernels. A thread keeps its sample's vectors, and for a
/// covariance its Cholesky factor, in private arrays sized by a tier of this (below), and a
/// warp per sample (warp.cuh) holds a factor of this size in shared memory; larger events go
/// to the torch backend (pyext/backends.py MAX_EVENT_SIZE says so).
constexpr int64_t kMaxEventSize = 64;

/// Blocks of a grid-stride loop: enough to fill the largest GPUs, and a constant rather than
/// a function of the device, so that the per-block partial sums of a reduced gradient, and
/// therefore its bits, are the same on every run.
constexpr int64_t kMaxBlocks = 2048;

inline int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::clamp<int64_t>((n + threads - 1) / threads, 1, kMaxBlocks));
}

/// Blocks, threads per block and dynamic shared memory of a kernel launch.
struct LaunchShape {
  int blocks;
  int threads;
  size_t shared_bytes;
};

/// `for (b = ...)` over [0, n) with a grid of any size: each thread takes every
/// (blocks x threads)-th index.
#define FUSEDGAUSS_GRID_STRIDE_LOOP(b, n)                                                       \
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < (n); \
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)

inline void check_event_size(const char* op, int64_t k) {
  TORCH_CHECK(k <= kMaxEventSize, op, ": the CUDA kernels handle event sizes up to ", kMaxEventSize,
              ", got ", k, " (the torch backend handles any)");
}

/// Runs fn(K, kMaxK) with std::integral_constants: K = k, kMaxK = k for the small event sizes
/// of float inputs, where a compile-time k unrolls a sample's math into registers; K = 0 (a
/// runtime k) and kMaxK the smallest tier of 8, 16, 32, 64 that holds k otherwise.
template <typename scalar_t, typename F>
void with_event_size(const char* op, int64_t k, const F& fn) {
  check_event_size(op, k);
  using std::integral_constant;
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (k) {
      case 1: return fn(integral_constant<int, 1>{}, integral_constant<int, 1>{});
      case 2: return fn(integral_constant<int, 2>{}, integral_constant<int, 2>{});
      case 3: return fn(integral_constant<int, 3>{}, integral_constant<int, 3>{});
      case 4: return fn(integral_constant<int, 4>{}, integral_constant<int, 4>{});
      case 5: return fn(integral_constant<int, 5>{}, integral_constant<int, 5>{});
      case 6: return fn(integral_constant<int, 6>{}, integral_constant<int, 6>{});
      case 7: return fn(integral_constant<int, 7>{}, integral_constant<int, 7>{});
      case 8: return fn(integral_constant<int, 8>{}, integral_constant<int, 8>{});
      default: break;
    }
  }
  if (k <= 8) return fn(integral_constant<int, 0>{}, integral_constant<int, 8>{});
  if (k <= 16) return fn(integral_constant<int, 0>{}, integral_constant<int, 16>{});
  if (k <= 32) return fn(integral_constant<int, 0>{}, integral_constant<int, 32>{});
  return fn(integral_constant<int, 0>{}, integral_constant<int, 64>{});
}

/// Launches kernel<<<blocks, threads, shared_bytes>>> on the current stream, raising the
/// kernel's dynamic shared memory limit first where it exceeds the default 48 KiB, and checks
/// the launch.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int blocks, int threads, size_t shared_bytes, Args&&... args) {
  constexpr size_t kDefaultSharedBytes = 48 * 1024;
  if (shared_bytes > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  kernel<<<blocks, threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

/// Dynamic shared memory of a block, aligned for any acc_t.
__device__ inline void* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return shared_bytes;
}

/// quiet NaN in any floating type, c10::Half and c10::BFloat16 included.
template <typename scalar_t>
__host__ __device__ inline scalar_t quiet_nan() {
  return static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
}

}  // namespace cuda
}  // namespace fusedgauss
