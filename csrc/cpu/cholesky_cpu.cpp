// CPU kernels of the batched small-matrix Cholesky factorisation and its backward, in blocks
// of kLanes matrices computed in lock-step (csrc/math).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/op_wrappers.h"
#include "../math/gaussian_math.h"
#include "chunked.h"
#include "lanes.h"
#include "outputs.h"

namespace fusedgauss {
namespace cpu {
namespace {

/// L with A = L L^T from the lower triangle of A; a matrix that is not positive-definite
/// gives a NaN factor, leaving the other matrices untouched.
template <typename scalar_t>
void cholesky_kernel(int64_t n, int64_t k, const scalar_t* A, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes;
  const Chunks chunks(n, grain_size(k * k * k));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> L(static_cast<size_t>(k * k * W));
    bool ok[W];
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      gather_lower<W>(k, A + b0 * k * k, k * k, count, L.data());
      math::cholesky_in_place<W>(k, L.data(), ok);
      for (int l = 0; l < count; ++l) {
        scalar_t* dst = out + (b0 + l) * k * k;
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j < k; ++j) {
            dst[i * k + j] = !ok[l]  ? std::numeric_limits<scalar_t>::quiet_NaN()
                             : j <= i ? static_cast<scalar_t>(L[(i * k + j) * W + l])
                                      : scalar_t(0);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void cholesky_backward_kernel(int64_t n, int64_t k, const scalar_t* grad, const scalar_t* L, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes;
  const Chunks chunks(n, grain_size(k * k * k));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> G(static_cast<size_t>(k * k * W)), factor(static_cast<size_t>(k * k * W));
    std::vector<acc_t> work(static_cast<size_t>(k * k * W));
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      gather_lower<W>(k, grad + b0 * k * k, k * k, count, G.data());
      gather_lower<W>(k, L + b0 * k * k, k * k, count, factor.data());
      math::cholesky_backward<W>(k, G.data(), factor.data(), work.data());
      for (int l = 0; l < count; ++l) {
        scalar_t* dst = out + (b0 + l) * k * k;
        for (int64_t e = 0; e < k * k; ++e) dst[e] = static_cast<scalar_t>(work[e * W + l]);
      }
    }
  });
}

at::Tensor cholesky(const at::Tensor& A) {
  check_cholesky_input(A);
  const at::Tensor input = A.contiguous();
  at::Tensor out = empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cholesky", [&] {
    cholesky_kernel<scalar_t>(matrix_count(input), A.size(-1), input.const_data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor cholesky_backward(const at::Tensor& grad, const at::Tensor& L) {
  check_cholesky_backward_inputs(grad, L);
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor L_c = L.contiguous();
  at::Tensor out = empty_output(L_c.sizes(), L_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "cholesky_backward", [&] {
    cholesky_backward_kernel<scalar_t>(matrix_count(L_c), L.size(-1), grad_c.const_data_ptr<scalar_t>(),
                                       L_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) {
  m.impl("cholesky", &cholesky);
  m.impl("cholesky_backward", &cholesky_backward);
}

}  // namespace cpu
}  // namespace fusedgauss
