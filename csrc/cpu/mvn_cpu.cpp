// CPU kernels of the full-covariance Gaussian log-prob ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
// One templated forward and one templated backward serve both: they differ only in where
// the Cholesky factor comes from (the operand itself, or a factorisation in scratch that is
// never written out) and in the formula of the matrix gradient. Samples are computed in
// blocks of W lanes, lane-minor (csrc/math), so the arithmetic vectorises across samples.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
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

/// Multiply-adds per sample: a triangular solve, plus a factorisation for a per-sample
/// covariance.
template <Param kParam>
int64_t work_per_sample(const MvnProblem& p) {
  const bool factorises = kParam == Param::kCovariance && !p.matrix.shared();
  return p.k * p.k * (factorises ? p.k : 1);
}

/// The Cholesky factors of a block of samples, lane-minor. A shared matrix is factorised
/// (covariance) and broadcast to every lane once; a per-sample one is gathered (and, for a
/// covariance, factorised) block by block into this object's scratch.
template <Param kParam, int kK, int W, typename scalar_t>
class BlockFactors {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  BlockFactors(const MvnProblem& p, bool need_log_det)
      : k_(p.k),
        matrix_(p.matrix.data.const_data_ptr<scalar_t>()),
        stride_(p.matrix.batch_stride),
        need_log_det_(need_log_det),
        L_(static_cast<size_t>(p.k * p.k * W)) {
    if (shared()) {
      load(0, 1);
    }
  }

  bool shared() const { return stride_ == 0; }

  /// Loads the factors of samples [b0, b0 + count); a no-op for a shared matrix.
  void load_block(int64_t b0, int count) {
    if (!shared()) {
      load(b0, count);
    }
  }

  const acc_t* L() const { return L_.data(); }
  const acc_t* log_det() const { return log_det_; }
  /// Whether lane l's covariance was positive-definite (always true for a scale_tril).
  bool ok(int l) const { return ok_[l]; }

 private:
  /// The event size, a constant when kK > 0 so that the math unrolls.
  int64_t k() const { return kK > 0 ? kK : k_; }

  void load(int64_t b0, int count) {
    gather_lower<W>(k(), matrix_ + b0 * stride_, stride_, count, L_.data());
    if constexpr (kParam == Param::kCovariance) {
      math::cholesky_in_place<W>(k(), L_.data(), ok_);
    } else {
      std::fill(ok_, ok_ + W, true);
    }
    if (need_log_det_) {
      math::sum_log_diagonal<W>(k(), L_.data(), log_det_);
    }
  }

  int64_t k_;
  const scalar_t* matrix_;
  int64_t stride_;
  bool need_log_det_;
  std::vector<acc_t> L_;
  acc_t log_det_[W] = {};
  bool ok_[W] = {};
};

/// value - loc for the samples [b0, b0 + count), lane-minor.
template <int W, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void load_differences(const MvnProblem& p, int64_t k, const scalar_t* value,
                                        const scalar_t* loc, int64_t b0, int count, acc_t* d) {
  gather_differences<W>(k, value + b0 * p.value.batch_stride, p.value.batch_stride,
                        loc + b0 * p.loc.batch_stride, p.loc.batch_stride, count, d);
}

template <Param kParam, int kK, int W, typename scalar_t>
void log_prob_forward_kernel(const MvnProblem& p, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : p.k;
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const BlockFactors<kParam, kK, W, scalar_t> shared_factors(p, /*need_log_det=*/true);
  const Chunks chunks(p.layout.batch_numel, grain_size(work_per_sample<kParam>(p)));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    BlockFactors<kParam, kK, W, scalar_t> factors = shared_factors;
    std::vector<acc_t> z(static_cast<size_t>(k * W));
    acc_t squared_norm[W];
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      load_differences<W>(p, k, value, loc, b0, count, z.data());
      factors.load_block(b0, count);
      math::whiten<W>(k, factors.L(), z.data(), squared_norm);
      for (int l = 0; l < count; ++l) {
        out[b0 + l] = factors.ok(l) ? static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm[l], factors.log_det()[l]))
                                    : std::numeric_limits<scalar_t>::quiet_NaN();
      }
    }
  });
}

/// Where one operand's gradient goes: nowhere (not requested), rows of a per-sample output,
/// or lane-minor block accumulators that are summed per chunk, then in chunk order.
template <typename scalar_t>
struct GradientSink {
  using acc_t = at::opmath_type<scalar_t>;

  GradientSink(bool requested, const BatchedOperand& operand, std::vector<int64_t> event_shape,
               const Chunks& chunks, int64_t batch_numel)
      : requested(requested), reduces(requested && operand.reduces_gradient) {
    width = 1;
    for (int64_t s : event_shape) width *= s;
    if (reduces) {
      // One extra slot per chunk for the sum of the upstream gradients.
      partials = ChunkPartials<acc_t>(chunks, width + 1);
    } else if (requested) {
      event_shape.insert(event_shape.begin(), batch_numel);
      per_sample = empty_output(event_shape, operand.data.options());
    }
  }

  /// The per-sample output, or nullptr when this sink reduces or takes nothing.
  scalar_t* rows() { return per_sample.defined() ? per_sample.data_ptr<scalar_t>() : nullptr; }

  bool requested;
  bool reduces;
  int64_t width;
  at::Tensor per_sample;
  ChunkPartials<acc_t> partials;
};

template <Param kParam, int kK, int W, typename scalar_t>
std::array<at::Tensor, 3> log_prob_backward_kernel(const MvnProblem& p, const scalar_t* grad,
                                                   std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kCovariance = kParam == Param::kCovariance;
  const int64_t k = kK > 0 ? kK : p.k;
  const int64_t n = p.layout.batch_numel;
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const BlockFactors<kParam, kK, W, scalar_t> shared_factors(p, /*need_log_det=*/false);
  const Chunks chunks(n, grain_size(work_per_sample<kParam>(p)));
  GradientSink<scalar_t> value_sink(mask[0], p.value, {k}, chunks, n);
  GradientSink<scalar_t> loc_sink(mask[1], p.loc, {k}, chunks, n);
  GradientSink<scalar_t> matrix_sink(mask[2], p.matrix, {k, k}, chunks, n);
  // The covariance gradient needs Sigma^{-1} per sample, unless the matrix is shared and its
  // gradient reduced (then Sigma^{-1} enters once, at the end).
  const bool per_sample_inverse = kCovariance && matrix_sink.requested && !matrix_sink.reduces;

  chunks.run([&](int64_t chunk, int64_t begin, int64_t end) {
    BlockFactors<kParam, kK, W, scalar_t> factors = shared_factors;
    const auto block = [&](int64_t entries) { return std::vector<acc_t>(static_cast<size_t>(entries * W)); };
    std::vector<acc_t> z = block(k), w = block(k), gw = block(k);
    std::vector<acc_t> L_inv = block(per_sample_inverse ? k * k : 0);
    std::vector<acc_t> sigma_inv = block(per_sample_inverse ? k * k : 0);
    // Block accumulators of reduced gradients, lane-minor; the last entry sums g.
    std::vector<acc_t> value_acc = block(value_sink.reduces ? k : 0);
    std::vector<acc_t> loc_acc = block(loc_sink.reduces ? k : 0);
    std::vector<acc_t> matrix_acc = block(matrix_sink.reduces ? k * k + 1 : 0);
    std::vector<acc_t> z_row(static_cast<size_t>(k)), gw_row(static_cast<size_t>(k));
    scalar_t* value_out = value_sink.rows();
    scalar_t* loc_out = loc_sink.rows();
    scalar_t* matrix_out = matrix_sink.rows();
    acc_t g[W];

    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      // Lanes past the batch carry g = 0, so they add nothing to the reduced gradients.
      for (int l = 0; l < W; ++l) g[l] = l < count ? static_cast<acc_t>(grad[b0 + l]) : acc_t(0);
      load_differences<W>(p, k, value, loc, b0, count, z.data());
      factors.load_block(b0, count);
      const acc_t* L = factors.L();
      math::solve_lower<W>(k, L, z.data());
      // w = L^{-T} z = Sigma^{-1} (value - loc): d log p / d value = -w, d/d loc = w.
      std::copy(z.begin(), z.end(), w.begin());
      math::solve_lower_transposed<W>(k, L, w.data());

      // g w, lane-minor: the gradient of loc, and minus that of value.
      acc_t* FUSEDGAUSS_RESTRICT gw_block = gw.data();
      const acc_t* FUSEDGAUSS_RESTRICT w_block = w.data();
      for (int64_t i = 0; i < k; ++i) {
        for (int l = 0; l < W; ++l) gw_block[i * W + l] = g[l] * w_block[i * W + l];
      }
      if (value_sink.reduces) {
        acc_t* FUSEDGAUSS_RESTRICT acc = value_acc.data();
        for (int64_t e = 0; e < k * W; ++e) acc[e] -= gw_block[e];
      }
      if (loc_sink.reduces) {
        acc_t* FUSEDGAUSS_RESTRICT acc = loc_acc.data();
        for (int64_t e = 0; e < k * W; ++e) acc[e] += gw_block[e];
      }
      for (int l = 0; l < count; ++l) {
        if (value_out != nullptr) {
          for (int64_t i = 0; i < k; ++i) value_out[(b0 + l) * k + i] = static_cast<scalar_t>(-gw[i * W + l]);
        }
        if (loc_out != nullptr) {
          for (int64_t i = 0; i < k; ++i) loc_out[(b0 + l) * k + i] = static_cast<scalar_t>(gw[i * W + l]);
        }
      }

      if (matrix_sink.reduces) {
        // Shared matrix: accumulate g w v^T (v = z for scale_tril, w for covariance) over the
        // lower triangle, and the sum of g; the parameter terms are added once at the end.
        const acc_t* FUSEDGAUSS_RESTRICT v = kCovariance ? w.data() : z.data();
        acc_t* FUSEDGAUSS_RESTRICT acc = matrix_acc.data();
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j <= i; ++j) {
            for (int l = 0; l < W; ++l) acc[(i * k + j) * W + l] += gw_block[i * W + l] * v[j * W + l];
          }
        }
        for (int l = 0; l < W; ++l) acc[k * k * W + l] += g[l];
      } else if (matrix_out != nullptr) {
        if (per_sample_inverse) {
          math::inverse_from_cholesky<W>(k, L, L_inv.data(), sigma_inv.data());
        }
        for (int l = 0; l < count; ++l) {
          scalar_t* out = matrix_out + (b0 + l) * k * k;
          for (int64_t i = 0; i < k; ++i) {
            z_row[i] = z[i * W + l];
            gw_row[i] = gw[i * W + l];
          }
          if constexpr (!kCovariance) {
            // d/dL = tril(w z^T) - diag(1/L_ii)
            for (int64_t i = 0; i < k; ++i) {
              const acc_t gw = gw_row[i];
              scalar_t* row = out + i * k;
              for (int64_t j = 0; j < i; ++j) row[j] = static_cast<scalar_t>(gw * z_row[j]);
              row[i] = static_cast<scalar_t>(gw * z_row[i] - g[l] / L[(i * k + i) * W + l]);
              for (int64_t j = i + 1; j < k; ++j) row[j] = scalar_t(0);
            }
          } else {
            // d/dSigma = 1/2 (w w^T - Sigma^{-1}), symmetric
            for (int64_t i = 0; i < k; ++i) {
              for (int64_t j = 0; j <= i; ++j) {
                const acc_t s = sigma_inv[(i * k + j) * W + l];
                const auto gij = static_cast<scalar_t>(acc_t(0.5) * (gw_row[i] * w[j * W + l] - g[l] * s));
                out[i * k + j] = gij;
                out[j * k + i] = gij;
              }
            }
          }
        }
      }
    }
    if (value_sink.reduces) add_lane_sums<W>(k, value_acc.data(), value_sink.partials.chunk(chunk));
    if (loc_sink.reduces) add_lane_sums<W>(k, loc_acc.data(), loc_sink.partials.chunk(chunk));
    if (matrix_sink.reduces) add_lane_sums<W>(k * k + 1, matrix_acc.data(), matrix_sink.partials.chunk(chunk));
  });

  const auto options = p.value.data.options();
  // A reduced gradient in acc_t, and the sum of the upstream gradients from its last slot.
  const auto reduce = [&](const GradientSink<scalar_t>& sink) {
    const std::vector<acc_t> total = sink.partials.total();
    at::Tensor out = at::empty({sink.width}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    std::copy(total.begin(), total.begin() + sink.width, out.data_ptr<acc_t>());
    return std::make_pair(out, total[sink.width]);
  };

  std::array<at::Tensor, 3> grads;
  grads[0] = value_sink.reduces ? reduce(value_sink).first.to(options.dtype()) : value_sink.per_sample;
  grads[1] = loc_sink.reduces ? reduce(loc_sink).first.to(options.dtype()) : loc_sink.per_sample;
  if (!matrix_sink.reduces) {
    grads[2] = matrix_sink.per_sample;
  } else {
    auto [acc, grad_sum] = reduce(matrix_sink);
    acc_t* m = acc.template data_ptr<acc_t>();
    // Lane 0 of the shared factor, as one sample (W = 1).
    std::vector<acc_t> L(static_cast<size_t>(k * k), acc_t(0));
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) L[i * k + j] = shared_factors.L()[(i * k + j) * W];
    }
    if constexpr (!kCovariance) {
      for (int64_t i = 0; i < k; ++i) {
        m[i * k + i] -= grad_sum / L[i * k + i];
        for (int64_t j = i + 1; j < k; ++j) m[i * k + j] = 0;
      }
    } else {
      std::vector<acc_t> L_inv(static_cast<size_t>(k * k)), sigma_inv(static_cast<size_t>(k * k));
      math::inverse_from_cholesky<1>(k, L.data(), L_inv.data(), sigma_inv.data());
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
          const acc_t gij = acc_t(0.5) * (m[i * k + j] - grad_sum * sigma_inv[i * k + j]);
          m[i * k + j] = gij;
          m[j * k + i] = gij;
        }
      }
    }
    grads[2] = acc.view({k, k}).to(options.dtype());
  }
  return grads;
}

/// Runs fn(K, W) with std::integral_constants: K = k for the small event sizes of float
/// inputs, where a compile-time k unrolls every loop of a sample's math (the common policy
/// sizes, and the hot dtype), K = 0 (a runtime k) otherwise; W lanes, kStreamingLanes for a
/// per-sample scale_tril with k > 16 and kLanes otherwise.
template <Param kParam, typename scalar_t, typename F>
void with_block_shape(const MvnProblem& p, const F& fn) {
  using Lanes = std::integral_constant<int, kLanes>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (p.k) {
      case 1: return fn(std::integral_constant<int, 1>{}, Lanes{});
      case 2: return fn(std::integral_constant<int, 2>{}, Lanes{});
      case 3: return fn(std::integral_constant<int, 3>{}, Lanes{});
      case 4: return fn(std::integral_constant<int, 4>{}, Lanes{});
      case 5: return fn(std::integral_constant<int, 5>{}, Lanes{});
      case 6: return fn(std::integral_constant<int, 6>{}, Lanes{});
      case 7: return fn(std::integral_constant<int, 7>{}, Lanes{});
      case 8: return fn(std::integral_constant<int, 8>{}, Lanes{});
      default: break;
    }
  }
  const bool streaming = kParam == Param::kScaleTril && !p.matrix.shared() && p.k > 16;
  if (streaming) {
    return fn(std::integral_constant<int, 0>{}, std::integral_constant<int, kStreamingLanes>{});
  }
  fn(std::integral_constant<int, 0>{}, Lanes{});
}

template <Param kParam>
at::Tensor log_prob_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& matrix) {
  return log_prob_forward_op<kParam>(value, loc, matrix, [](const MvnProblem& p, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), forward_op_name(kParam), [&] {
      with_block_shape<kParam, scalar_t>(p, [&](auto K, auto W) {
        log_prob_forward_kernel<kParam, decltype(K)::value, decltype(W)::value, scalar_t>(p, out.data_ptr<scalar_t>());
      });
    });
  });
}

template <Param kParam>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_backward(const at::Tensor& grad,
                                                                 const at::Tensor& value,
                                                                 const at::Tensor& loc,
                                                                 const at::Tensor& matrix,
                                                                 std::array<bool, 3> mask) {
  const auto run = [](const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
    std::array<at::Tensor, 3> grads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), backward_op_name(kParam), [&] {
      with_block_shape<kParam, scalar_t>(p, [&](auto K, auto W) {
        grads = log_prob_backward_kernel<kParam, decltype(K)::value, decltype(W)::value, scalar_t>(
            p, grad.const_data_ptr<scalar_t>(), mask);
      });
    });
    return grads;
  };
  return log_prob_backward_op<kParam>(grad, value, loc, matrix, mask, run);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) {
  m.impl("mvn_tril_log_prob", &log_prob_forward<Param::kScaleTril>);
  m.impl("mvn_tril_log_prob_backward", &log_prob_backward<Param::kScaleTril>);
  m.impl("mvn_cov_log_prob", &log_prob_forward<Param::kCovariance>);
  m.impl("mvn_cov_log_prob_backward", &log_prob_backward<Param::kCovariance>);
}

}  // namespace cpu
}  // namespace fusedgauss
