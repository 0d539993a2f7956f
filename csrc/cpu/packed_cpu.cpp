// CPU kernels of packed_to_scale_tril(packed, diag_transform, min_diag) and its backward: a
// policy head's k(k+1)/2 outputs per sample into its k x k scale_tril, and back; and of
// packed_scale_tril_log_det, sum_i log L_ii from the diagonal entries alone, and its backward.
// A chunk of the batch goes in blocks of samples: the off-diagonal entries are copied row by
// row, and the diagonal ones (the only arithmetic: csrc/math/packed_math.h's transform) are
// gathered into one contiguous run per block and transformed in a flat loop, so that the exp
// and log of the transform vectorise across samples instead of running one latency chain at a
// time. At the small k of float the event size is a compile-time constant
// (with_static_event_size), so that the per-sample loops unroll: a k=6 sample's rows had been
// a dozen std::copy and std::fill calls of a few entries each (65536 samples, one thread:
// packed_to_scale_tril 3.8 -> 1.7 ms, its backward 2.7 -> 1.2 ms).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "../common/outputs.h"
#include "../math/packed_math.h"
#include "chunked.h"
#include "lanes.h"
#include "simd.h"

namespace fusedgauss {
namespace cpu {
namespace {

using math::DiagTransform;

/// Samples per block: a block's diagonal entries stay in L1.
constexpr int64_t kBlockSamples = 256;

/// out[e] = f(in[e]) over a block's diagonal entries, in the best SIMD with the transform fixed.
template <typename acc_t, typename F>
void transform_diagonal(DiagTransform transform, int64_t count, const acc_t* in, acc_t* out, const F& f) {
  math::with_diag_transform(transform, [&](auto t) {
    with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
      const acc_t* FUSEDGAUSS_RESTRICT x = in;
      acc_t* FUSEDGAUSS_RESTRICT y = out;
      for (int64_t e = 0; e < count; ++e) y[e] = f(decltype(t)::value, x[e]);
    });
  });
}

/// The event size: K's (a std::integral_constant from with_static_event_size) where it is
/// known at compile time, p.k where K is 0.
template <typename K>
constexpr int64_t event_size(K, const PackedProblem& p) {
  return K::value > 0 ? K::value : p.k;
}

/// Runs consume(K, b0, count, values) for each block [b0, b0 + count) of the batch's samples,
/// in parallel, with values[(b - b0) k + i] = f(transform, x) of sample b's diagonal entry
/// x = x_ii. The block's diagonal entries are gathered into one run first, so that f
/// vectorises. K is a std::integral_constant, k at compile time or 0 (with_static_event_size;
/// event_size(K, p) is k either way), so that consume's loops over a sample unroll.
template <typename scalar_t, typename F, typename Consume>
void for_each_diagonal_block(const PackedProblem& p, const F& f, const Consume& consume) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* packed = p.packed.const_data_ptr<scalar_t>();
  with_static_event_size<scalar_t>(p.k, [&](auto K) {
    const int64_t k = event_size(K, p), n = math::packed_size(k);
    const Chunks chunks(p.samples, grain_size(k * k));
    chunks.run([&](int64_t, int64_t begin, int64_t end) {
      std::vector<acc_t> diagonal(static_cast<size_t>(kBlockSamples * k)), values(diagonal.size());
      for (int64_t b0 = begin; b0 < end; b0 += kBlockSamples) {
        const int64_t count = std::min(kBlockSamples, end - b0);
        for (int64_t b = b0; b < b0 + count; ++b) {
          for (int64_t i = 0; i < k; ++i) {
            diagonal[(b - b0) * k + i] = static_cast<acc_t>(packed[b * n + math::packed_index(i, i)]);
          }
        }
        transform_diagonal(p.transform, count * k, diagonal.data(), values.data(), f);
        consume(K, b0, count, static_cast<const acc_t*>(values.data()));
      }
    });
  });
}

at::Tensor packed_to_scale_tril(const at::Tensor& packed, c10::string_view diag_transform, double min_diag) {
  const PackedProblem p = prepare_packed_problem("packed_to_scale_tril", packed, diag_transform);
  at::Tensor out = empty_output(p.scale_tril_sizes, packed.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), "packed_to_scale_tril", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = p.packed.const_data_ptr<scalar_t>();
    scalar_t* L = out.data_ptr<scalar_t>();
    const acc_t shift = static_cast<acc_t>(min_diag);
    for_each_diagonal_block<scalar_t>(
        p,
        [shift](DiagTransform t, acc_t x) FUSEDGAUSS_INLINE_BODY { return math::diag_entry(t, x, shift).value; },
        [&](auto K, int64_t b0, int64_t count, const acc_t* diagonal) {
          const int64_t k = event_size(K, p), n = math::packed_size(k);
          for (int64_t b = b0; b < b0 + count; ++b) {
            const scalar_t* x = in + b * n;
            scalar_t* row = L + b * k * k;
            for (int64_t i = 0; i < k; ++i, row += k) {
              const scalar_t* xi = x + math::packed_index(i, 0);
              for (int64_t j = 0; j < i; ++j) row[j] = xi[j];
              row[i] = static_cast<scalar_t>(diagonal[(b - b0) * k + i]);
              for (int64_t j = i + 1; j < k; ++j) row[j] = scalar_t(0);
            }
          }
        });
  });
  return out;
}

/// d/dpacked from the gradient of the scale_tril: its lower triangle, packed, with the
/// diagonal entries times the transform's derivative. The upper triangle is constant zero.
at::Tensor packed_to_scale_tril_backward(const at::Tensor& grad, const at::Tensor& packed,
                                         c10::string_view diag_transform) {
  constexpr const char* op = "packed_to_scale_tril_backward";
  const PackedProblem p = prepare_packed_problem(op, packed, diag_transform, &grad);
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = empty_output(packed.sizes(), packed.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = upstream.const_data_ptr<scalar_t>();
    scalar_t* d_packed = out.data_ptr<scalar_t>();
    for_each_diagonal_block<scalar_t>(
        p,
        [](DiagTransform t, acc_t x) FUSEDGAUSS_INLINE_BODY { return math::diag_entry(t, x, acc_t(0)).derivative; },
        [&](auto K, int64_t b0, int64_t count, const acc_t* derivative) {
          const int64_t k = event_size(K, p), n = math::packed_size(k);
          for (int64_t b = b0; b < b0 + count; ++b) {
            const scalar_t* g_row = g + b * k * k;
            scalar_t* d_row = d_packed + b * n;
            for (int64_t i = 0; i < k; ++i, g_row += k) {
              scalar_t* d_packed_row = d_row + math::packed_index(i, 0);
              for (int64_t j = 0; j < i; ++j) d_packed_row[j] = g_row[j];
              d_packed_row[i] = static_cast<scalar_t>(static_cast<acc_t>(g_row[i]) * derivative[(b - b0) * k + i]);
            }
          }
        });
  });
  return out;
}

at::Tensor packed_scale_tril_log_det(const at::Tensor& packed, c10::string_view diag_transform, double min_diag) {
  const PackedProblem p = prepare_packed_problem("packed_scale_tril_log_det", packed, diag_transform);
  at::Tensor out = empty_output(packed.sizes().slice(0, packed.dim() - 1), packed.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), "packed_scale_tril_log_det", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* log_det = out.data_ptr<scalar_t>();
    const acc_t shift = static_cast<acc_t>(min_diag);
    for_each_diagonal_block<scalar_t>(
        p,
        [shift](DiagTransform t, acc_t x) FUSEDGAUSS_INLINE_BODY { return math::log_diag_entry(t, x, shift).log_diag; },
        [&](auto K, int64_t b0, int64_t count, const acc_t* logs) {
          const int64_t k = event_size(K, p);
          for (int64_t b = 0; b < count; ++b) {
            acc_t sum = 0;
            for (int64_t i = 0; i < k; ++i) sum += logs[b * k + i];
            log_det[b0 + b] = static_cast<scalar_t>(sum);
          }
        });
  });
  return out;
}

/// d/dpacked: grad times d log L_ii / dx on the diagonal entries, zero off it.
at::Tensor packed_scale_tril_log_det_backward(const at::Tensor& grad, const at::Tensor& packed,
                                              c10::string_view diag_transform, double min_diag) {
  constexpr const char* op = "packed_scale_tril_log_det_backward";
  const PackedProblem p = prepare_packed_problem(op, packed, diag_transform);
  check_log_det_gradient(op, grad, packed);
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = empty_output(packed.sizes(), packed.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, packed.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = upstream.const_data_ptr<scalar_t>();
    scalar_t* d_packed = out.data_ptr<scalar_t>();
    const acc_t shift = static_cast<acc_t>(min_diag);
    for_each_diagonal_block<scalar_t>(
        p,
        [shift](DiagTransform t, acc_t x) FUSEDGAUSS_INLINE_BODY { return math::log_diag_entry(t, x, shift).derivative; },
        [&](auto K, int64_t b0, int64_t count, const acc_t* derivative) {
          const int64_t k = event_size(K, p), n = math::packed_size(k);
          for (int64_t b = b0; b < b0 + count; ++b) {
            scalar_t* d_row = d_packed + b * n;
            for (int64_t e = 0; e < n; ++e) d_row[e] = scalar_t(0);
            const acc_t g_b = static_cast<acc_t>(g[b]);
            for (int64_t i = 0; i < k; ++i) {
              d_row[math::packed_index(i, i)] = static_cast<scalar_t>(g_b * derivative[(b - b0) * k + i]);
            }
          }
        });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) {
  m.impl("packed_to_scale_tril", &packed_to_scale_tril);
  m.impl("packed_to_scale_tril_backward", &packed_to_scale_tril_backward);
  m.impl("packed_scale_tril_log_det", &packed_scale_tril_log_det);
  m.impl("packed_scale_tril_log_det_backward", &packed_scale_tril_log_det_backward);
}

}  // namespace cpu
}  // namespace fusedgauss
