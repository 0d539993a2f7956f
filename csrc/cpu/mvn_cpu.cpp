// CPU kernels of the full-covariance Gaussian log-prob ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
// One templated forward and one templated backward serve both: they differ only in where
// the Cholesky factor comes from (the operand itself, or a factorisation in scratch that is
// never written out) and in the formula of the matrix gradient.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../math/gaussian_math.h"
#include "chunked.h"

namespace fusedgauss {
namespace cpu {
namespace {

enum class Param { kScaleTril, kCovariance };

constexpr const char* matrix_name(Param param) {
  return param == Param::kScaleTril ? "scale_tril" : "covariance";
}

/// The Cholesky factor L of each sample's matrix operand. For a scale_tril it is the operand
/// itself; for a covariance it is factorised once when shared, otherwise per sample into
/// caller scratch.
template <Param kParam, typename scalar_t>
class Factors {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  using mat_t = std::conditional_t<kParam == Param::kScaleTril, scalar_t, acc_t>;

  explicit Factors(const MvnProblem& p)
      : k_(p.k), matrix_(p.matrix.data.const_data_ptr<scalar_t>()), stride_(p.matrix.batch_stride) {
    if (!p.matrix.shared()) {
      return;
    }
    if constexpr (kParam == Param::kScaleTril) {
      shared_ = matrix_;
    } else {
      shared_storage_.resize(static_cast<size_t>(k_ * k_));
      math::load_lower_triangle(k_, matrix_, shared_storage_.data());
      if (math::cholesky_in_place(k_, shared_storage_.data())) {
        shared_ = shared_storage_.data();
      }
    }
    if (shared_ != nullptr) {
      shared_log_det_ = math::sum_log_diagonal<acc_t>(k_, shared_);
    }
  }

  bool shared() const { return stride_ == 0; }
  /// The shared factor, or nullptr when a shared covariance is not positive-definite.
  const mat_t* shared_factor() const { return shared_; }
  acc_t shared_log_det() const { return shared_log_det_; }

  /// Sample b's factor, or nullptr when its covariance is not positive-definite.
  /// `scratch` holds k*k accumulators for a per-sample factorisation.
  const mat_t* get(int64_t b, acc_t* scratch) const {
    if (shared()) {
      return shared_;
    }
    if constexpr (kParam == Param::kScaleTril) {
      return matrix_ + b * stride_;
    } else {
      math::load_lower_triangle(k_, matrix_ + b * stride_, scratch);
      return math::cholesky_in_place(k_, scratch) ? scratch : nullptr;
    }
  }

 private:
  int64_t k_;
  const scalar_t* matrix_;
  int64_t stride_;
  const mat_t* shared_ = nullptr;
  acc_t shared_log_det_ = 0;
  std::vector<acc_t> shared_storage_;
};

/// Multiply-adds per sample: a triangular solve, plus a factorisation for a per-sample
/// covariance.
template <Param kParam>
int64_t work_per_sample(const MvnProblem& p) {
  const bool factorises = kParam == Param::kCovariance && !p.matrix.shared();
  return p.k * p.k * (factorises ? p.k : 1);
}

template <Param kParam, typename scalar_t>
void log_prob_forward_kernel(const MvnProblem& p, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const Factors<kParam, scalar_t> factors(p);
  const Chunks chunks(p.layout.batch_numel, grain_size(work_per_sample<kParam>(p)));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> z(static_cast<size_t>(k));
    std::vector<acc_t> scratch(kParam == Param::kCovariance ? static_cast<size_t>(k * k) : 0);
    for (int64_t b = begin; b < end; ++b) {
      const auto* L = factors.get(b, scratch.data());
      if (L == nullptr) {
        out[b] = std::numeric_limits<scalar_t>::quiet_NaN();
        continue;
      }
      const acc_t squared_norm = math::whiten(k, value + b * p.value.batch_stride,
                                              loc + b * p.loc.batch_stride, L, z.data());
      const acc_t log_det =
          factors.shared() ? factors.shared_log_det() : math::sum_log_diagonal<acc_t>(k, L);
      out[b] = static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det));
    }
  });
}

/// Where one operand's gradient goes: nowhere (not requested), a per-sample row of the
/// output, or per-chunk partial sums for a shared operand, reduced in chunk order.
template <typename scalar_t>
struct GradientSink {
  using acc_t = at::opmath_type<scalar_t>;

  GradientSink(bool requested, const BatchedOperand& operand, std::vector<int64_t> event_shape,
               const Chunks& chunks, int64_t batch_numel)
      : shared(operand.reduces_gradient) {
    if (!requested) {
      return;
    }
    int64_t width = 1;
    for (int64_t s : event_shape) {
      width *= s;
    }
    if (shared) {
      // One extra slot per chunk for the sum of the upstream gradients.
      partials = ChunkPartials<acc_t>(chunks, width + 1);
    } else {
      event_shape.insert(event_shape.begin(), batch_numel);
      per_sample = at::empty(event_shape, operand.data.options());
    }
  }

  /// The partial sums of chunk c, or nullptr when this sink takes per-sample rows or nothing.
  acc_t* partial(bool requested, int64_t c) { return requested && shared ? partials.chunk(c) : nullptr; }
  /// The per-sample output, or nullptr when this sink reduces or takes nothing.
  scalar_t* rows() { return per_sample.defined() ? per_sample.data_ptr<scalar_t>() : nullptr; }

  bool shared;
  at::Tensor per_sample;
  ChunkPartials<acc_t> partials;
};

template <Param kParam, typename scalar_t>
std::array<at::Tensor, 3> log_prob_backward_kernel(const MvnProblem& p, const scalar_t* grad,
                                                   std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t k = p.k;
  const int64_t n = p.layout.batch_numel;
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const Factors<kParam, scalar_t> factors(p);
  const Chunks chunks(n, grain_size(work_per_sample<kParam>(p)));
  GradientSink<scalar_t> value_sink(mask[0], p.value, {k}, chunks, n);
  GradientSink<scalar_t> loc_sink(mask[1], p.loc, {k}, chunks, n);
  GradientSink<scalar_t> matrix_sink(mask[2], p.matrix, {k, k}, chunks, n);

  chunks.run([&](int64_t chunk, int64_t begin, int64_t end) {
    std::vector<acc_t> z(static_cast<size_t>(k));
    std::vector<acc_t> w(static_cast<size_t>(k));
    constexpr bool kCovariance = kParam == Param::kCovariance;
    std::vector<acc_t> scratch(kCovariance ? static_cast<size_t>(3 * k * k) : 0);
    acc_t* factor_scratch = scratch.data();
    acc_t* L_inv = kCovariance ? scratch.data() + k * k : nullptr;
    acc_t* sigma_inv = kCovariance ? scratch.data() + 2 * k * k : nullptr;
    acc_t* value_partial = value_sink.partial(mask[0], chunk);
    acc_t* loc_partial = loc_sink.partial(mask[1], chunk);
    acc_t* matrix_partial = matrix_sink.partial(mask[2], chunk);
    scalar_t* value_out = value_sink.rows();
    scalar_t* loc_out = loc_sink.rows();
    scalar_t* matrix_out = matrix_sink.rows();

    for (int64_t b = begin; b < end; ++b) {
      const acc_t g = static_cast<acc_t>(grad[b]);
      const auto* L = factors.get(b, factor_scratch);
      if (L != nullptr) {
        math::whiten(k, value + b * p.value.batch_stride, loc + b * p.loc.batch_stride, L, z.data());
        // w = L^{-T} z = Sigma^{-1} (value - loc): d log p / d value = -w, d/d loc = w.
        for (int64_t i = 0; i < k; ++i) {
          w[i] = z[i];
        }
        math::solve_lower_transposed(k, L, w.data());
      } else {
        // A covariance that is not positive-definite poisons its own gradients only.
        for (int64_t i = 0; i < k; ++i) {
          z[i] = w[i] = kNaN;
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        const acc_t gw = g * w[i];
        if (value_partial != nullptr) value_partial[i] -= gw;
        if (value_out != nullptr) value_out[b * k + i] = static_cast<scalar_t>(-gw);
        if (loc_partial != nullptr) loc_partial[i] += gw;
        if (loc_out != nullptr) loc_out[b * k + i] = static_cast<scalar_t>(gw);
      }
      if (matrix_partial != nullptr) {
        // Shared matrix: accumulate g w v^T (v = z for scale_tril, w for covariance) over
        // the lower triangle and the sum of g; the parameter terms are added once at the end.
        const acc_t* v = kParam == Param::kScaleTril ? z.data() : w.data();
        for (int64_t i = 0; i < k; ++i) {
          const acc_t gw = g * w[i];
          acc_t* row = matrix_partial + i * k;
          for (int64_t j = 0; j <= i; ++j) {
            row[j] += gw * v[j];
          }
        }
        matrix_partial[k * k] += g;
      } else if (matrix_out != nullptr) {
        scalar_t* out = matrix_out + b * k * k;
        if constexpr (kParam == Param::kScaleTril) {
          // d/dL = tril(w z^T) - diag(1/L_ii)
          for (int64_t i = 0; i < k; ++i) {
            const acc_t gw = g * w[i];
            for (int64_t j = 0; j < i; ++j) {
              out[i * k + j] = static_cast<scalar_t>(gw * z[j]);
            }
            const acc_t L_ii = L != nullptr ? static_cast<acc_t>(L[i * k + i]) : kNaN;
            out[i * k + i] = static_cast<scalar_t>(gw * z[i] - g / L_ii);
            for (int64_t j = i + 1; j < k; ++j) {
              out[i * k + j] = scalar_t(0);
            }
          }
        } else {
          // d/dSigma = 1/2 (w w^T - Sigma^{-1}), symmetric
          if (L != nullptr) {
            math::inverse_from_cholesky(k, L, L_inv, sigma_inv);
          }
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j <= i; ++j) {
              const acc_t s = L != nullptr ? sigma_inv[i * k + j] : kNaN;
              const auto gij = static_cast<scalar_t>(acc_t(0.5) * g * (w[i] * w[j] - s));
              out[i * k + j] = gij;
              out[j * k + i] = gij;
            }
          }
        }
      }
    }
  });

  const auto options = p.value.data.options();
  // The reduced sum of a shared operand's gradient, in acc_t, and the sum of the upstream
  // gradients kept in its last slot.
  const auto reduce = [&](const GradientSink<scalar_t>& sink, int64_t width) {
    const std::vector<acc_t> total = sink.partials.total();
    at::Tensor out = at::empty({width}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    std::copy(total.begin(), total.begin() + width, out.data_ptr<acc_t>());
    return std::make_pair(out, total[width]);
  };

  std::array<at::Tensor, 3> grads;
  if (mask[0]) {
    grads[0] = value_sink.shared ? reduce(value_sink, k).first.to(options.dtype()) : value_sink.per_sample;
  }
  if (mask[1]) {
    grads[1] = loc_sink.shared ? reduce(loc_sink, k).first.to(options.dtype()) : loc_sink.per_sample;
  }
  if (mask[2]) {
    if (!matrix_sink.shared) {
      grads[2] = matrix_sink.per_sample;
    } else {
      auto [acc, grad_sum] = reduce(matrix_sink, k * k);
      acc_t* m = acc.template data_ptr<acc_t>();
      const auto* L = factors.shared_factor();
      if constexpr (kParam == Param::kScaleTril) {
        for (int64_t i = 0; i < k; ++i) {
          m[i * k + i] -= grad_sum / static_cast<acc_t>(L[i * k + i]);
          for (int64_t j = i + 1; j < k; ++j) {
            m[i * k + j] = 0;
          }
        }
      } else {
        std::vector<acc_t> L_inv(static_cast<size_t>(k * k));
        std::vector<acc_t> sigma_inv(static_cast<size_t>(k * k), kNaN);
        if (L != nullptr) {
          math::inverse_from_cholesky(k, L, L_inv.data(), sigma_inv.data());
        }
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
  }
  return grads;
}

template <Param kParam>
at::Tensor log_prob_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& matrix) {
  constexpr const char* op = kParam == Param::kScaleTril ? "mvn_tril_log_prob" : "mvn_cov_log_prob";
  const MvnProblem p = prepare_mvn_problem(op, matrix_name(kParam), value, loc, matrix);
  at::Tensor out = at::empty(p.layout.batch_shape, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), op, [&] {
    log_prob_forward_kernel<kParam, scalar_t>(p, out.data_ptr<scalar_t>());
  });
  return out;
}

template <Param kParam>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_backward(const at::Tensor& grad,
                                                                 const at::Tensor& value,
                                                                 const at::Tensor& loc,
                                                                 const at::Tensor& matrix,
                                                                 std::array<bool, 3> mask) {
  constexpr const char* op =
      kParam == Param::kScaleTril ? "mvn_tril_log_prob_backward" : "mvn_cov_log_prob_backward";
  const MvnProblem p = prepare_mvn_problem(op, matrix_name(kParam), value, loc, matrix);
  check_same_dtype_and_device(op, "grad", grad, value);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(p.layout.batch_shape), op, ": grad has shape ",
              grad.sizes(), " but the log-prob has shape ", c10::IntArrayRef(p.layout.batch_shape));
  const at::Tensor grad_contiguous = grad.contiguous();
  std::array<at::Tensor, 3> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), op, [&] {
    grads = log_prob_backward_kernel<kParam, scalar_t>(p, grad_contiguous.const_data_ptr<scalar_t>(), mask);
  });
  const std::array<const at::Tensor*, 3> inputs{&value, &loc, &matrix};
  const std::array<const BatchedOperand*, 3> operands{&p.value, &p.loc, &p.matrix};
  std::array<at::Tensor, 3> out;
  for (size_t i = 0; i < 3; ++i) {
    // Gradients that were not asked for are empty tensors: the schema has no optional outputs.
    out[i] = mask[i] ? gradient_for(grads[i], *inputs[i], *operands[i], p.layout)
                     : at::empty({0}, value.options());
  }
  return {out[0], out[1], out[2]};
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
