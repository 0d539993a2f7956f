// CPU kernels of the batched small-matrix Cholesky factorisation and its backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../math/gaussian_math.h"
#include "chunked.h"

namespace fusedgauss {
namespace cpu {
namespace {

/// L with A = L L^T from the lower triangle of A; a matrix that is not positive-definite
/// gives a NaN factor, leaving the other samples untouched.
template <typename scalar_t>
void cholesky_kernel(int64_t n, int64_t k, const scalar_t* A, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunks chunks(n, grain_size(k * k * k));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> L(static_cast<size_t>(k * k));
    for (int64_t b = begin; b < end; ++b) {
      math::load_lower_triangle(k, A + b * k * k, L.data());
      const bool ok = math::cholesky_in_place(k, L.data());
      scalar_t* dst = out + b * k * k;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          dst[i * k + j] = !ok                ? std::numeric_limits<scalar_t>::quiet_NaN()
                           : j <= i ? static_cast<scalar_t>(L[i * k + j])
                                    : scalar_t(0);
        }
      }
    }
  });
}

template <typename scalar_t>
void cholesky_backward_kernel(int64_t n, int64_t k, const scalar_t* grad, const scalar_t* L,
                              scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunks chunks(n, grain_size(k * k * k));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> work(static_cast<size_t>(k * k));
    for (int64_t b = begin; b < end; ++b) {
      math::cholesky_backward(k, grad + b * k * k, L + b * k * k, work.data());
      scalar_t* dst = out + b * k * k;
      for (int64_t i = 0; i < k * k; ++i) {
        dst[i] = static_cast<scalar_t>(work[i]);
      }
    }
  });
}

at::Tensor cholesky(const at::Tensor& A) {
  check_floating("cholesky", "A", A);
  check_square("cholesky", "A", A);
  const at::Tensor input = A.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t k = A.size(-1);
  const int64_t n = k == 0 ? 0 : A.numel() / (k * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cholesky", [&] {
    cholesky_kernel<scalar_t>(n, k, input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor cholesky_backward(const at::Tensor& grad, const at::Tensor& L) {
  check_floating("cholesky_backward", "L", L);
  check_square("cholesky_backward", "L", L);
  check_same_dtype_and_device("cholesky_backward", "grad", grad, L);
  TORCH_CHECK(grad.sizes() == L.sizes(), "cholesky_backward: grad has shape ", grad.sizes(),
              " but L has shape ", L.sizes());
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor L_c = L.contiguous();
  at::Tensor out = at::empty_like(L_c);
  const int64_t k = L.size(-1);
  const int64_t n = k == 0 ? 0 : L.numel() / (k * k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "cholesky_backward", [&] {
    cholesky_backward_kernel<scalar_t>(n, k, grad_c.const_data_ptr<scalar_t>(),
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
