// CUDA kernels of the batched small-matrix Cholesky factorisation and its backward: one thread
// per matrix, around the per-sample math of csrc/math with one lane (W = 1).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/op_wrappers.h"
#include "../math/gaussian_math.h"
#include "launch.cuh"

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

at::Tensor cholesky(const at::Tensor& A) {
  check_cholesky_input(A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = A.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  const int64_t n = matrix_count(input);
  const int64_t k = A.size(-1);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cholesky", [&] {
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
