// CPU kernels of the batched small-matrix Cholesky factorisation and its backward, in blocks
// of kLanes matrices computed in lock-step (csrc/math), moved in and out of the lane-minor
// layout by the transposes of lanes.h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../common/op_wrappers.h"
#include "../common/outputs.h"
#include "../math/gaussian_math.h"
#include "chunked.h"
#include "lanes.h"

namespace fusedgauss {
namespace cpu {
namespace {

/// L with A = L L^T from the lower triangle of A; a matrix that is not positive-definite
/// gives a NaN factor, leaving the other matrices untouched. kK > 0: k at compile time.
template <int kK, typename scalar_t>
void cholesky_kernel(int64_t n, int64_t runtime_k, const scalar_t* A, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes;
  const int64_t k = kK > 0 ? kK : runtime_k;
  const Chunks chunks(n, grain_size(k * k * k));
  const MatrixGather<W> gather_matrices(k);
  chunks.run_vectorised<kWidestCholeskySimd>([&](int64_t, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    std::vector<acc_t> L(static_cast<size_t>(k * k * W));
    bool ok[W];
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      gather_matrices(A + b0 * k * k, k * k, count, L.data());
      math::cholesky_in_place<W>(k, L.data(), ok);
      // The factorisation leaves the upper triangle as the gather did (MatrixGather takes parts of
      // it, or none); the output holds zeros there.
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = i + 1; j < k; ++j) {
          for (int l = 0; l < W; ++l) L[(i * k + j) * W + l] = acc_t(0);
        }
      }
      for (int l = 0; l < count; ++l) {
        if (!ok[l]) {
          for (int64_t e = 0; e < k * k; ++e) L[e * W + l] = std::numeric_limits<acc_t>::quiet_NaN();
        }
      }
      scatter_rows<W>(k * k, L.data(), count, out + b0 * k * k);
    }
  });
}

template <int kK, typename scalar_t>
void cholesky_backward_kernel(int64_t n, int64_t runtime_k, const scalar_t* grad, const scalar_t* L, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kLanes;
  const int64_t k = kK > 0 ? kK : runtime_k;
  const Chunks chunks(n, grain_size(k * k * k));
  const MatrixGather<W> gather_matrices(k);
  chunks.run_vectorised<kWidestCholeskySimd>([&](int64_t, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    std::vector<acc_t> G(static_cast<size_t>(k * k * W)), factor(static_cast<size_t>(k * k * W));
    std::vector<acc_t> work(static_cast<size_t>(k * k * W));
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      gather_matrices(grad + b0 * k * k, k * k, count, G.data());
      gather_matrices(L + b0 * k * k, k * k, count, factor.data());
      math::cholesky_backward<W>(k, G.data(), factor.data(), work.data());
      scatter_rows<W>(k * k, work.data(), count, out + b0 * k * k);
    }
  });
}

at::Tensor cholesky(const at::Tensor& A) {
  check_cholesky_input(A);
  const at::Tensor input = A.contiguous();
  at::Tensor out = empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "cholesky", [&] {
    with_static_event_size<scalar_t>(A.size(-1), [&](auto K) {
      cholesky_kernel<decltype(K)::value>(matrix_count(input), A.size(-1), input.const_data_ptr<scalar_t>(),
                                          out.data_ptr<scalar_t>());
    });
  });
  return out;
}

at::Tensor cholesky_backward(const at::Tensor& grad, const at::Tensor& L) {
  check_cholesky_backward_inputs(grad, L);
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor L_c = L.contiguous();
  at::Tensor out = empty_output(L_c.sizes(), L_c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.scalar_type(), "cholesky_backward", [&] {
    with_static_event_size<scalar_t>(L.size(-1), [&](auto K) {
      cholesky_backward_kernel<decltype(K)::value>(matrix_count(L_c), L.size(-1), grad_c.const_data_ptr<scalar_t>(),
                                                   L_c.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    });
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
