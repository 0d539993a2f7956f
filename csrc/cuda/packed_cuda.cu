// CUDA kernels of packed_to_scale_tril, packed_scale_tril_log_det and their backwards. Each
// is elementwise over its output, so that consecutive threads write consecutive entries: the
// forward over the k x k entries of each scale_tril, the log-determinant over the samples,
// the backwards over the packed entries, each finding its (i, j) through
// csrc/math/packed_math.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../math/packed_math.h"
#include "launch.cuh"

namespace fusedgauss {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    packed_to_scale_tril_kernel(int64_t entries, int64_t k, const scalar_t* __restrict__ packed,
                                math::DiagTransform transform, at::opmath_type<scalar_t> min_diag,
                                scalar_t* __restrict__ L) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = math::packed_size(k);
  FUSEDGAUSS_GRID_STRIDE_LOOP(e, entries) {
    const int64_t b = e / (k * k), i = (e / k) % k, j = e % k;
    const acc_t x = j <= i ? static_cast<acc_t>(packed[b * n + math::packed_index(i, j)]) : acc_t(0);
    L[e] = static_cast<scalar_t>(math::scale_tril_entry(i, j, x, transform, min_diag));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    packed_to_scale_tril_backward_kernel(int64_t entries, int64_t k, const scalar_t* __restrict__ grad,
                                         const scalar_t* __restrict__ packed, math::DiagTransform transform,
                                         scalar_t* __restrict__ d_packed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = math::packed_size(k);
  FUSEDGAUSS_GRID_STRIDE_LOOP(e, entries) {
    const int64_t b = e / n, p = e % n;
    const int64_t i = math::packed_row(p), j = p - math::packed_index(i, 0);
    d_packed[e] = static_cast<scalar_t>(math::packed_gradient_entry(
        i, j, static_cast<acc_t>(grad[(b * k + i) * k + j]), static_cast<acc_t>(packed[e]), transform));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    packed_scale_tril_log_det_kernel(int64_t samples, int64_t k, const scalar_t* __restrict__ packed,
                                     math::DiagTransform transform, at::opmath_type<scalar_t> min_diag,
                                     scalar_t* __restrict__ log_det) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = math::packed_size(k);
  FUSEDGAUSS_GRID_STRIDE_LOOP(b, samples) {
    acc_t sum = 0;
    for (int64_t i = 0; i < k; ++i) {
      sum += math::log_diag_entry(transform, static_cast<acc_t>(packed[b * n + math::packed_index(i, i)]), min_diag)
                 .log_diag;
    }
    log_det[b] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    packed_scale_tril_log_det_backward_kernel(int64_t entries, int64_t k, const scalar_t* __restrict__ grad,
                                              const scalar_t* __restrict__ packed, math::DiagTransform transform,
                                              at::opmath_type<scalar_t> min_diag, scalar_t* __restrict__ d_packed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = math::packed_size(k);
  FUSEDGAUSS_GRID_STRIDE_LOOP(e, entries) {
    const int64_t b = e / n, p = e % n;
    const int64_t i = math::packed_row(p);
    const bool diagonal = p == math::packed_index(i, i);
    d_packed[e] = static_cast<scalar_t>(
        diagonal ? static_cast<acc_t>(grad[b]) *
                       math::log_diag_entry(transform, static_cast<acc_t>(packed[e]), min_diag).derivative
                 : acc_t(0));
  }
}

at::Tensor packed_to_scale_tril(const at::Tensor& packed, c10::string_view diag_transform, double min_diag) {
  const PackedProblem p = prepare_packed_problem("packed_to_scale_tril", packed, diag_transform);
  at::Tensor out = at::empty(p.scale_tril_sizes, packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t entries = out.numel();
  if (entries == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), "packed_to_scale_tril", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(packed_to_scale_tril_kernel<scalar_t>, blocks_for(entries, kThreads), kThreads, 0, entries, p.k,
           p.packed.const_data_ptr<scalar_t>(), p.transform, static_cast<acc_t>(min_diag), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor packed_to_scale_tril_backward(const at::Tensor& grad, const at::Tensor& packed,
                                         c10::string_view diag_transform) {
  constexpr const char* op = "packed_to_scale_tril_backward";
  const PackedProblem p = prepare_packed_problem(op, packed, diag_transform, &grad);
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = at::empty(packed.sizes(), packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t entries = out.numel();
  if (entries == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), op, [&] {
    launch(packed_to_scale_tril_backward_kernel<scalar_t>, blocks_for(entries, kThreads), kThreads, 0, entries, p.k,
           upstream.const_data_ptr<scalar_t>(), p.packed.const_data_ptr<scalar_t>(), p.transform,
           out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor packed_scale_tril_log_det(const at::Tensor& packed, c10::string_view diag_transform, double min_diag) {
  const PackedProblem p = prepare_packed_problem("packed_scale_tril_log_det", packed, diag_transform);
  at::Tensor out = at::empty(packed.sizes().slice(0, packed.dim() - 1), packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  if (p.samples == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), "packed_scale_tril_log_det", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(packed_scale_tril_log_det_kernel<scalar_t>, blocks_for(p.samples, kThreads), kThreads, 0, p.samples, p.k,
           p.packed.const_data_ptr<scalar_t>(), p.transform, static_cast<acc_t>(min_diag), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor packed_scale_tril_log_det_backward(const at::Tensor& grad, const at::Tensor& packed,
                                              c10::string_view diag_transform, double min_diag) {
  constexpr const char* op = "packed_scale_tril_log_det_backward";
  const PackedProblem p = prepare_packed_problem(op, packed, diag_transform);
  check_log_det_gradient(op, grad, packed);
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = at::empty(packed.sizes(), packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t entries = out.numel();
  if (entries == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(packed_scale_tril_log_det_backward_kernel<scalar_t>, blocks_for(entries, kThreads), kThreads, 0, entries,
           p.k, upstream.const_data_ptr<scalar_t>(), p.packed.const_data_ptr<scalar_t>(), p.transform,
           static_cast<acc_t>(min_diag), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("packed_to_scale_tril", &packed_to_scale_tril);
  m.impl("packed_to_scale_tril_backward", &packed_to_scale_tril_backward);
  m.impl("packed_scale_tril_log_det", &packed_scale_tril_log_det);
  m.impl("packed_scale_tril_log_det_backward", &packed_scale_tril_log_det_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
