// CUDA kernels of the batched small-matrix Cholesky factorisation and its backward: one thread
// per matrix, around the per-sample math of csrc/math with one lane (W = 1); from
// kWarpMinEventSize (warp.cuh) a warp per matrix, around the team math of
// csrc/math/team_math.h, the matrices in shared memory.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/op_wrappers.h"
#include "../math/gaussian_math.h"
#include "../math/team_math.h"
#include "launch.cuh"
#include "warp.cuh"

namespace fusedgauss {
namespace cuda {
namespace {

/// L with A = L L^T from the lower triangle of A; a matrix that is not positive-definite
/// gives a NaN factor, leaving the other matrices untouched.
template <int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cholesky_kernel(int64_t n, int64_t runtime_k, const scalar_t* __restrict__ A, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : runtime_k;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t* a = A + b * k * k;
    acc_t L[kMaxK * kMaxK];
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) L[i * k + j] = static_cast<acc_t>(a[i * k + j]);
    }
    bool ok = true;
    math::cholesky_in_place<1>(k, L, &ok);
    scalar_t* dst = out + b * k * k;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        dst[i * k + j] = !ok ? quiet_nan<scalar_t>() : j <= i ? static_cast<scalar_t>(L[i * k + j]) : scalar_t(0);
      }
    }
  }
}

template <int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    cholesky_backward_kernel(int64_t n, int64_t runtime_k, const scalar_t* __restrict__ grad,
                             const scalar_t* __restrict__ L, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : runtime_k;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t work[kMaxK * kMaxK];
    math::cholesky_backward<1>(k, grad + b * k * k, L + b * k * k, work);
    scalar_t* dst = out + b * k * k;
    for (int64_t e = 0; e < k * k; ++e) dst[e] = static_cast<scalar_t>(work[e]);
  }
}

/// Stages the lower triangle of the k x k row-major `matrix` in the warp's rows `staged`.
template <typename scalar_t, typename acc_t>
__device__ void stage_matrix(const Warp& warp, int64_t k, const scalar_t* matrix, acc_t* staged, int64_t ld) {
  stage_lower(warp, k, [&](int64_t i, int64_t j) { return static_cast<acc_t>(matrix[i * k + j]); }, staged, ld);
}

/// cholesky_kernel with a warp per matrix.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_cholesky_kernel(int64_t n, int64_t k, const scalar_t* __restrict__ A, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Warp warp;
  const WarpGrid grid;
  const WarpMatrices<acc_t> matrices(grid, k, 1);
  const int64_t ld = matrices.ld;
  acc_t* L = matrices[0];
  for (int64_t b = grid.first; b < n; b += grid.stride) {
    stage_matrix(warp, k, A + b * k * k, L, ld);
    const bool ok = math::team_cholesky_in_place(warp, k, L, ld);
    scalar_t* dst = out + b * k * k;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = warp.lane(); j < k; j += kWarpSize) {
        dst[i * k + j] = !ok ? quiet_nan<scalar_t>() : j <= i ? static_cast<scalar_t>(L[i * ld + j]) : scalar_t(0);
      }
    }
    warp.sync();  // every lane is done with L before the next matrix is staged
  }
}

/// cholesky_backward_kernel with a warp per matrix: L and the gradient (becoming dA) in the
/// warp's two matrices of shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_cholesky_backward_kernel(int64_t n, int64_t k, const scalar_t* __restrict__ grad,
                                  const scalar_t* __restrict__ L, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Warp warp;
  const WarpGrid grid;
  const WarpMatrices<acc_t> matrices(grid, k, 2);
  const int64_t ld = matrices.ld;
  acc_t* staged_L = matrices[0];
  acc_t* work = matrices[1];
  for (int64_t b = grid.first; b < n; b += grid.stride) {
    stage_matrix(warp, k, L + b * k * k, staged_L, ld);
    stage_matrix(warp, k, grad + b * k * k, work, ld);
    math::team_cholesky_backward(warp, k, staged_L, ld, work);
    scalar_t* dst = out + b * k * k;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = warp.lane(); j < k; j += kWarpSize) dst[i * k + j] = static_cast<scalar_t>(work[i * ld + j]);
    }
    warp.sync();  // every lane is done with the matrices before the next ones are staged
  }
}

at::Tensor cholesky(const at::Tensor& A) {
  check_cholesky_input(A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = A.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  const int64_t n = matrix_count(input);
  const int64_t k = A.size(-1);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cholesky", [&] {
    if (k >= kWarpMinEventSize) {
      check_event_size("cholesky", k);
      const LaunchShape shape = warp_launch_shape<at::opmath_type<scalar_t>>(n, k, 1);
      launch(warp_cholesky_kernel<scalar_t>, shape.blocks, shape.threads, shape.shared_bytes, n, k,
             input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
      return;
    }
    with_event_size<scalar_t>("cholesky", k, [&](auto K, auto kMaxK) {
      launch(cholesky_kernel<decltype(K)::value, decltype(kMaxK)::value, scalar_t>, blocks_for(n, kThreads), kThreads,
             0, n, k, input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor cholesky_backward(const at::Tensor& grad, const at::Tensor& L) {
  check_cholesky_backward_inputs(grad, L);
  const c10::cuda::CUDAGuard guard(L.device());
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor L_c = L.contiguous();
  at::Tensor out = at::empty(L_c.sizes(), L_c.options());
  const int64_t n = matrix_count(L_c);
  const int64_t k = L.size(-1);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "cholesky_backward", [&] {
    if (k >= kWarpMinEventSize) {
      check_event_size("cholesky_backward", k);
      const LaunchShape shape = warp_launch_shape<at::opmath_type<scalar_t>>(n, k, 2);
      launch(warp_cholesky_backward_kernel<scalar_t>, shape.blocks, shape.threads, shape.shared_bytes, n, k,
             grad_c.const_data_ptr<scalar_t>(), L_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
      return;
    }
    with_event_size<scalar_t>("cholesky_backward", k, [&](auto K, auto kMaxK) {
      launch(cholesky_backward_kernel<decltype(K)::value, decltype(kMaxK)::value, scalar_t>,
             blocks_for(n, kThreads), kThreads, 0, n, k, grad_c.const_data_ptr<scalar_t>(),
             L_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("cholesky", &cholesky);
  m.impl("cholesky_backward", &cholesky_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
