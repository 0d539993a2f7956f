// CUDA kernels of packed_to_scale_tril and its backward. Both are elementwise over their
// output, so that consecutive threads write consecutive entries: the forward over the k x k
// entries of each scale_tril, the backward over the packed entries, each finding its (i, j)
// through csrc/math/packed_math.h.

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

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("packed_to_scale_tril", &packed_to_scale_tril);
  m.impl("packed_to_scale_tril_backward", &packed_to_scale_tril_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
