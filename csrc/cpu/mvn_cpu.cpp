// CPU kernels of the full-covariance Gaussian ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
//   squashed_tril_log_prob(value, loc, scale_tril, value_is_pre_tanh)   and its backward
//   squashed_tril_rsample_log_prob(loc, scale_tril, eps)               and its backward
//   mvn_packed_log_prob, squashed_packed_log_prob (value, loc, packed scale_tril, ...) and theirs
// One templated forward and one templated backward serve the log-probs: they differ in where
// the Cholesky factor comes from (the operand itself, a factorisation in scratch that is never
// written out, or the unpacking of a policy head's packed output), in the formula of the
// matrix gradient, and, squashed, in mapping the value to its pre-tanh value first. Samples are computed in blocks of W lanes, lane-minor
// (csrc/math), so the arithmetic vectorises across samples.

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
#include "../math/packed_math.h"
#include "../math/squash_math.h"
#include "chunked.h"
#include "gradient_sink.h"
#include "lanes.h"
#include "simd.h"

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

/// What a pass needs of the factors beside L: a forward pass the log-prob's sum_i log L_ii, a
/// backward pass a packed factor's dL_ii/dx_ii (which the forward skips, a division each).
enum class Pass { kForward, kBackward };

/// The Cholesky factors of a block of samples, lane-minor. A shared matrix is factorised
/// (covariance) and broadcast to every lane once; a per-sample one is gathered (and, for a
/// covariance, factorised; packed, unpacked) block by block into this object's scratch.
///
/// Solves with a shared factor go through its inverse, computed once (in double) and
/// broadcast: a triangular solve is a chain of k dependent steps, one per row, while a
/// product with L^{-1} is k independent sums. Float32 errors against float64 stay those of
/// the solves, and below torch's, up to condition number 1e6 (test_ill_conditioned). With the
/// unrolled row loops (FUSEDGAUSS_UNROLL_ROWS), the compile-time gathers (gather_rows) and the
/// log-probs stored a block at a time, a shared k=6 scale_tril log-prob, two threads, 65536
/// samples went from 0.27 to 0.13 ms forward and from 0.44 to 0.30 ms backward (medians).
template <Param kParam, int kK, int W, typename scalar_t>
class BlockFactors {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kPacked = kParam == Param::kPacked;

  BlockFactors(const MvnProblem& p, Pass pass)
      : k_(p.k),
        matrix_(p.matrix.data.const_data_ptr<scalar_t>()),
        stride_(p.matrix.batch_stride),
        need_log_det_(pass == Pass::kForward),
        need_diag_derivative_(kPacked && pass == Pass::kBackward),
        gather_matrices_(p.k),
        L_(static_cast<size_t>(p.k * p.k * W)),
        packed_(static_cast<size_t>(kPacked ? math::packed_size(p.k) * W : 0)),
        diag_derivative_(static_cast<size_t>(need_diag_derivative_ ? p.k * W : 0)),
        diag_transform_(p.diag_transform),
        min_diag_(static_cast<acc_t>(p.min_diag)) {
    if (shared()) {
      load(0, 1);
      invert();
    }
  }

  bool shared() const { return stride_ == 0; }

  /// Loads the factors of samples [b0, b0 + count); a no-op for a shared matrix.
  C10_ALWAYS_INLINE void load_block(int64_t b0, int count) {
    if (!shared()) {
      load(b0, count);
    }
  }

  const acc_t* L() const { return L_.data(); }

  /// x = L^{-1} x for each lane (x lane-minor k x W). A per-sample factor of a compile-time k
  /// is solved by columns (math::solve_lower_by_columns; here the same bits): with the loops
  /// unrolled, a column's updates are independent, where a row sum is a chain. That took
  /// 5-20% off every log-prob kernel, forward and backward, tril and packed, of k = 2, 3, 6
  /// and 8 (one thread, 4096 samples: k=6 tril backward 142 -> 119 us). With a runtime k the
  /// two orders measured the same (k = 12, 17), and the rows stay.
  C10_ALWAYS_INLINE void solve(acc_t* x) const {
    if (shared()) {
      math::lower_times_in_place<W>(k(), inverse_.data(), x);
    } else {
      if constexpr (kK != 0) {
        math::solve_lower_by_columns<W>(k(), L_.data(), x);
      } else {
        math::solve_lower<W>(k(), L_.data(), x);
      }
    }
  }

  /// x = L^{-T} x for each lane (by columns as solve()).
  C10_ALWAYS_INLINE void solve_transposed(acc_t* x) const {
    if (shared()) {
      math::lower_transposed_times_in_place<W>(k(), inverse_.data(), x);
    } else {
      if constexpr (kK != 0) {
        math::solve_lower_transposed_by_columns<W>(k(), L_.data(), x);
      } else {
        math::solve_lower_transposed<W>(k(), L_.data(), x);
      }
    }
  }

  /// Lane 0's factor as one row-major matrix (zero above the diagonal): a shared factor.
  std::vector<acc_t> first_lane() const {
    std::vector<acc_t> L(static_cast<size_t>(k() * k()), acc_t(0));
    for (int64_t i = 0; i < k(); ++i) {
      for (int64_t j = 0; j <= i; ++j) L[i * k() + j] = L_[(i * k() + j) * W];
    }
    return L;
  }
  const acc_t* log_det() const { return log_det_; }
  /// dL_ii/dx_ii of a packed factor, lane-minor k x W.
  const acc_t* diag_derivative() const { return diag_derivative_.data(); }
  /// Whether lane l's covariance was positive-definite (always true for a scale_tril).
  bool ok(int l) const { return ok_[l]; }

 private:
  /// The event size, a constant when kK > 0 so that the math unrolls.
  int64_t k() const { return kK > 0 ? kK : k_; }

  C10_ALWAYS_INLINE void load(int64_t b0, int count) {
    if constexpr (kPacked) {
      gather_rows<W, kK * (kK + 1) / 2>(math::packed_size(k()), matrix_ + b0 * stride_, stride_, count,
                                         packed_.data());
      unpack();
    } else {
      gather_matrices_(matrix_ + b0 * stride_, stride_, count, L_.data());
    }
    if constexpr (kParam == Param::kCovariance) {
      math::cholesky_in_place<W>(k(), L_.data(), ok_);
    } else {
      std::fill(ok_, ok_ + W, true);
    }
    if (need_log_det_) {
      math::sum_log_diagonal<W>(k(), L_.data(), log_det_);
    }
  }

  /// inverse_ = L^{-1} of the shared factor in every lane, computed in double: the products
  /// that replace the solves then start from L^{-1} rounded once.
  void invert() {
    const std::vector<acc_t> L = first_lane();
    const std::vector<double> L_double(L.begin(), L.end());
    std::vector<double> L_inv(L.size(), 0.0), sigma_inv(L.size());
    math::inverse_from_cholesky<1>(k(), L_double.data(), L_inv.data(), sigma_inv.data());
    inverse_.assign(L.size() * W, acc_t(0));
    for (size_t e = 0; e < L.size(); ++e) {
      std::fill_n(inverse_.begin() + static_cast<int64_t>(e) * W, W, static_cast<acc_t>(L_inv[e]));
    }
  }

  /// L (its upper triangle stays zero) and dL_ii/dx_ii from the packed rows: row i's entries
  /// below the diagonal are one contiguous run in both layouts.
  ///
  /// A row's copy is a loop per entry over the lanes, which GCC keeps inline: as one loop over
  /// the row's i * W values it became a call to memmove with a runtime k, one per row (13% of a
  /// k=17 backward's profile). The diagonal transforms follow in a loop of their own, so that
  /// their chains (an exp, a division, a log series) overlap rather than wait on the copies
  /// between them. k=17, 4096 samples, one thread, fastest of 15: backward 671 -> 608 us,
  /// forward 390 -> 360 us.
  C10_ALWAYS_INLINE void unpack() {
    const acc_t* FUSEDGAUSS_RESTRICT x = packed_.data();
    acc_t* FUSEDGAUSS_RESTRICT L = L_.data();
    acc_t* FUSEDGAUSS_RESTRICT derivative = diag_derivative_.data();
    const acc_t min_diag = min_diag_;
    const bool need_derivative = need_diag_derivative_;
    for (int64_t i = 1; i < k(); ++i) {
      const acc_t* row = x + math::packed_index(i, 0) * W;
      for (int64_t j = 0; j < i; ++j) {
        for (int l = 0; l < W; ++l) L[(i * k() + j) * W + l] = row[j * W + l];
      }
    }
    math::with_diag_transform(diag_transform_, [&](auto transform) FUSEDGAUSS_INLINE_BODY {
      for (int64_t i = 0; i < k(); ++i) {
        const acc_t* entry = x + math::packed_index(i, i) * W;
        acc_t* Lii = L + (i * k() + i) * W;
        if (need_derivative) {
          for (int l = 0; l < W; ++l) {
            const math::DiagEntry<acc_t> d = math::diag_entry(decltype(transform)::value, entry[l], min_diag);
            Lii[l] = d.value;
            derivative[i * W + l] = d.derivative;
          }
        } else {
          for (int l = 0; l < W; ++l) Lii[l] = math::diag_entry(decltype(transform)::value, entry[l], min_diag).value;
        }
      }
    });
  }

  int64_t k_;
  const scalar_t* matrix_;
  int64_t stride_;
  bool need_log_det_;
  bool need_diag_derivative_;
  MatrixGather<W, kK> gather_matrices_;
  std::vector<acc_t> L_;
  std::vector<acc_t> inverse_;  // a shared factor's L^{-1}, lane-minor
  std::vector<acc_t> packed_;
  std::vector<acc_t> diag_derivative_;
  math::DiagTransform diag_transform_;
  acc_t min_diag_;
  acc_t log_det_[W] = {};
  bool ok_[W] = {};
};

/// value - loc for the samples [b0, b0 + count), lane-minor.
template <int W, int kK, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void load_differences(const MvnProblem& p, int64_t k, const scalar_t* value,
                                        const scalar_t* loc, int64_t b0, int count, acc_t* d) {
  gather_differences<W, kK>(k, value + b0 * p.value.batch_stride, p.value.batch_stride,
                        loc + b0 * p.loc.batch_stride, p.loc.batch_stride, count, d);
}

/// g[l] = upstream[b0 + l] for the block's first `count` lanes and 0 past them, or 0 in every
/// lane when there is no upstream gradient. A full block is a plain copy, which GCC makes one
/// vector load; with the lane test in the copy it loaded and stored lane by lane.
template <int W, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void load_upstream_lanes(const scalar_t* upstream, int64_t b0, int count, acc_t* g) {
  if (upstream != nullptr && count == W) {
    for (int l = 0; l < W; ++l) g[l] = static_cast<acc_t>(upstream[b0 + l]);
  } else {
    for (int l = 0; l < W; ++l) g[l] = upstream != nullptr && l < count ? static_cast<acc_t>(upstream[b0 + l]) : acc_t(0);
  }
}

/// out[l] = lanes[l] for the block's first `count` lanes; a full block as one plain copy,
/// which vectorises (see load_upstream_lanes).
template <int W, typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void store_lanes(const acc_t* lanes, int count, scalar_t* out) {
  if (count == W) {
    for (int l = 0; l < W; ++l) out[l] = static_cast<scalar_t>(lanes[l]);
  } else {
    for (int l = 0; l < count; ++l) out[l] = static_cast<scalar_t>(lanes[l]);
  }
}

/// The scale_tril gradients tril(a b^T) - c diag(1/L_ii) of a block of samples, lane-minor:
/// the form of every scale_tril gradient here, with a = g w, b = z, c = g for a log-prob (g - h
/// with a log-det output) and a = g_u, b = eps, c = g_log_prob for a sample. Dense k x k (zero
/// above the diagonal), or kPacked: row by row in the packed layout, with the diagonal entries
/// times dL_ii/dx_ii (`diag_derivative`), the gradient of a packed factor written straight
/// (through the dense gradient and packing it, the upper triangle's zeros were written and the
/// rest copied once more).
template <bool kPacked, int W, typename acc_t>
C10_ALWAYS_INLINE void scale_tril_gradient_block(int64_t k, const acc_t* FUSEDGAUSS_RESTRICT a,
                                                 const acc_t* FUSEDGAUSS_RESTRICT b, const acc_t* FUSEDGAUSS_RESTRICT c,
                                                 const acc_t* FUSEDGAUSS_RESTRICT L,
                                                 const acc_t* FUSEDGAUSS_RESTRICT diag_derivative,
                                                 acc_t* FUSEDGAUSS_RESTRICT out) {
  for (int64_t i = 0; i < k; ++i) {
    acc_t* row = out + (kPacked ? math::packed_index(i, 0) : i * k) * W;
    const acc_t* ai = a + i * W;
    for (int64_t j = 0; j < i; ++j) {
      for (int l = 0; l < W; ++l) row[j * W + l] = ai[l] * b[j * W + l];
    }
    const acc_t* Lii = L + (i * k + i) * W;
    for (int l = 0; l < W; ++l) {
      const acc_t diagonal = ai[l] * b[i * W + l] - c[l] / Lii[l];
      row[i * W + l] = kPacked ? diagonal * diag_derivative[i * W + l] : diagonal;
    }
    if constexpr (!kPacked) {
      for (int64_t e = (i + 1) * W; e < k * W; ++e) row[e] = acc_t(0);
    }
  }
}

/// A shared scale_tril's gradient from its reduced sum of a b^T (lower triangle, in `m`) and
/// the sum of c: subtracts sum(c) / L_ii on the diagonal, zeroes the upper triangle. L is one
/// row-major factor.
template <typename acc_t>
void finish_shared_scale_tril_gradient(int64_t k, const acc_t* L, acc_t c_sum, acc_t* m) {
  for (int64_t i = 0; i < k; ++i) {
    m[i * k + i] -= c_sum / L[i * k + i];
    for (int64_t j = i + 1; j < k; ++j) m[i * k + j] = 0;
  }
}

/// The squash of a squashed_tril_log_prob, for a block of samples: the pre-tanh values u of
/// the value operand (the values themselves, or atanh of the clamped actions), lane-minor,
/// with per lane the Jacobian sum_i log(1 - tanh(u_i)^2), and what the value's gradient needs.
/// kK > 0 is the event size known at compile time (as in gather_rows).
template <int kK, int W, typename scalar_t>
class SquashBlock {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  SquashBlock(int64_t k, bool from_action)
      : k_(k), from_action_(from_action), x_(static_cast<size_t>(k * W)), u_(x_.size()), two_tanh_(x_.size()) {}

  /// d = u - loc for the samples [b0, b0 + count), lane-minor; also fills log_det_jacobian().
  C10_ALWAYS_INLINE void load_differences(const MvnProblem& p, const scalar_t* value, const scalar_t* loc, int64_t b0,
                                          int count, acc_t* FUSEDGAUSS_RESTRICT d) {
    gather_rows<W, kK>(k_, value + b0 * p.value.batch_stride, p.value.batch_stride, count, x_.data());
    gather_rows<W, kK>(k_, loc + b0 * p.loc.batch_stride, p.loc.batch_stride, count, d);
    const int64_t entries = k_ * W;
    const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
    const acc_t* FUSEDGAUSS_RESTRICT x = x_.data();
    acc_t* FUSEDGAUSS_RESTRICT u = u_.data();
    acc_t* FUSEDGAUSS_RESTRICT two_tanh = two_tanh_.data();
    acc_t* FUSEDGAUSS_RESTRICT jacobian = log_det_jacobian_;
    if (from_action_) {
      for (int64_t e = 0; e < entries; ++e) u[e] = math::atanh_clamped(x[e], eps);
    } else {
      for (int64_t e = 0; e < entries; ++e) u[e] = x[e];
    }
    math::TanhLogDetSums<W, acc_t> sums;
    for (int64_t i = 0; i < k_; ++i) {
      for (int l = 0; l < W; ++l) {
        const math::TanhTerms<acc_t> tt = math::tanh_terms(u[i * W + l]);
        sums.add(l, tt);
        two_tanh[i * W + l] = acc_t(2) * tt.tanh;
      }
      sums.end_entry(i);
    }
    sums.finish(jacobian);
    for (int64_t e = 0; e < entries; ++e) d[e] = u[e] - d[e];
  }

  const acc_t* log_det_jacobian() const { return log_det_jacobian_; }

  /// d log p / d value in place, lane-minor, given the Gaussian part's -g w in `grad`:
  /// (-g w + g 2 tanh(u)) [* d atanh_clamped(x) / dx when the values are actions].
  C10_ALWAYS_INLINE void value_gradient(const acc_t* g, acc_t* FUSEDGAUSS_RESTRICT grad) const {
    const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
    for (int64_t i = 0; i < k_; ++i) {
      for (int l = 0; l < W; ++l) {
        const int64_t e = i * W + l;
        const acc_t d_u = grad[e] + g[l] * two_tanh_[e];
        grad[e] = from_action_ ? d_u * math::atanh_clamped_derivative(x_[e], eps) : d_u;
      }
    }
  }

 private:
  int64_t k_;
  bool from_action_;
  std::vector<acc_t> x_, u_, two_tanh_;
  acc_t log_det_jacobian_[W] = {};
};

/// A covariance is factorised per sample (a chain of square roots and divisions), and with a
/// runtime k the AVX-512 copies measured 5-10% slower than the AVX2 ones (k=17).
constexpr SimdLevel widest_simd(Param param, int kK) {
  return param == Param::kCovariance ? kWidestCholeskySimd : kK == 0 ? SimdLevel::kAvx2 : SimdLevel::kAvx512;
}

/// Writes the log-prob of each sample to `out` and, when `log_det_out` is given (the ops whose
/// factor is given: scale_tril, packed), the sample's sum_i log L_ii, which the log-prob
/// computes anyway: an entropy reads it instead of a pass of its own.
template <Param kParam, int kK, int W, typename scalar_t>
void log_prob_forward_kernel(const MvnProblem& p, scalar_t* out, ValueSquash squash = {},
                             scalar_t* log_det_out = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : p.k;
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const BlockFactors<kParam, kK, W, scalar_t> shared_factors(p, Pass::kForward);
  const Chunks chunks(p.layout.batch_numel, grain_size(work_per_sample<kParam>(p)));
  chunks.run_vectorised<widest_simd(kParam, kK)>([&](int64_t, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    BlockFactors<kParam, kK, W, scalar_t> factors = shared_factors;
    std::vector<acc_t> z(static_cast<size_t>(k * W));
    SquashBlock<kK, W, scalar_t> squash_block(squash.squashed ? k : 0, squash.from_action);
    acc_t squared_norm[W];
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      if (squash.squashed) {
        squash_block.load_differences(p, value, loc, b0, count, z.data());
      } else {
        load_differences<W, kK>(p, k, value, loc, b0, count, z.data());
      }
      factors.load_block(b0, count);
      factors.solve(z.data());
      math::squared_norms<W>(k, z.data(), squared_norm);
      // Every lane, then the block's samples: as one loop over `count` lanes that also tested
      // ok(l), it ran lane by lane.
      acc_t log_prob[W];
      for (int l = 0; l < W; ++l) {
        log_prob[l] = math::gaussian_log_prob(k, squared_norm[l], factors.log_det()[l]) -
                      squash_block.log_det_jacobian()[l];
      }
      if constexpr (kParam == Param::kCovariance) {
        for (int l = 0; l < W; ++l) {
          if (!factors.ok(l)) log_prob[l] = std::numeric_limits<acc_t>::quiet_NaN();
        }
      }
      store_lanes<W>(log_prob, count, out + b0);
      if (log_det_out != nullptr) store_lanes<W>(factors.log_det(), count, log_det_out + b0);
    }
  });
}

/// `grad_log_det` (the scale_tril and packed ops, per-sample factors; null: none) is the
/// upstream gradient h of the sum_i log L_ii output: it enters where the log-prob's own
/// -g sum_i log L_ii does, as the diagonal coefficient c = g - h of
/// d/dL = tril(g w z^T) - c diag(1/L_ii). (A shared factor's part of it is added by the op
/// wrapper, LogProbOps::backward_with_log_det.) `head_rows` (a packed factor; undefined: none)
/// takes the per-sample gradients of loc and packed side by side (LogProbOps::packed_head_backward).
template <Param kParam, int kK, int W, typename scalar_t>
std::array<at::Tensor, 3> log_prob_backward_kernel(const MvnProblem& p, const scalar_t* grad,
                                                   std::array<bool, 3> mask, ValueSquash squash = {},
                                                   const scalar_t* grad_log_det = nullptr,
                                                   const at::Tensor& head_rows = at::Tensor()) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kCovariance = kParam == Param::kCovariance;
  constexpr bool kPacked = kParam == Param::kPacked;
  const int64_t k = kK > 0 ? kK : p.k;
  const int64_t n = p.layout.batch_numel;
  // Entries of the matrix operand's gradient, and where entry (i, j <= i) of a reduced one
  // accumulates: k x k row-major, or packed.
  const int64_t matrix_entries = kPacked ? math::packed_size(k) : k * k;
  const auto slot = [k](int64_t i, int64_t j) { return kPacked ? math::packed_index(i, j) : i * k + j; };
  const scalar_t* value = p.value.data.const_data_ptr<scalar_t>();
  const scalar_t* loc = p.loc.data.const_data_ptr<scalar_t>();
  const BlockFactors<kParam, kK, W, scalar_t> shared_factors(p, Pass::kBackward);
  const Chunks chunks(n, grain_size(work_per_sample<kParam>(p)));
  GradientSink<scalar_t> value_sink(mask[0], p.value, {k}, chunks, n);
  const auto head_part = [&](int64_t start, int64_t width) {
    return head_rows.defined() ? head_rows.narrow(1, start, width) : at::Tensor();
  };
  GradientSink<scalar_t> loc_sink(mask[1], p.loc, {k}, chunks, n, 0, head_part(0, k));
  GradientSink<scalar_t> matrix_sink(mask[2], p.matrix, kPacked ? std::vector<int64_t>{matrix_entries}
                                                                  : std::vector<int64_t>{k, k},
                                     chunks, n, /*extra_slots=*/1, head_part(k, matrix_entries));
  // A head's rows are [loc | packed], so their lane-minor block is loc's block followed by
  // packed's: the two gradients are computed side by side in one buffer and leave in one write
  // of whole rows (which streams when large; a stretch of rows does not, GradientSink::streams).
  const bool head = head_rows.defined();
  GradientSink<scalar_t> head_sink(head, p.matrix, {k + matrix_entries}, chunks, n, 0, head_rows);
  // The covariance gradient needs Sigma^{-1} per sample, unless the matrix is shared and its
  // gradient reduced (then Sigma^{-1} enters once, at the end).
  const bool per_sample_inverse = kCovariance && matrix_sink.requested && !matrix_sink.reduces;

  chunks.run_vectorised<widest_simd(kParam, kK)>([&](int64_t chunk, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    BlockFactors<kParam, kK, W, scalar_t> factors = shared_factors;
    const auto block = [&](int64_t entries) { return std::vector<acc_t>(static_cast<size_t>(entries * W)); };
    std::vector<acc_t> z = block(k), w = block(k), g_value = block(k);
    std::vector<acc_t> gw = block(head ? k + matrix_entries : k);  // a head's: [gw | matrix_grad]
    SquashBlock<kK, W, scalar_t> squash_block(squash.squashed ? k : 0, squash.from_action);
    std::vector<acc_t> L_inv = block(per_sample_inverse ? k * k : 0);
    std::vector<acc_t> sigma_inv = block(per_sample_inverse ? k * k : 0);
    std::vector<acc_t> matrix_block = block(matrix_sink.requested && !matrix_sink.reduces && !head ? matrix_entries : 0);
    acc_t* matrix_grad = head ? gw.data() + k * W : matrix_block.data();
    // Block accumulators of reduced gradients, lane-minor; the last entry sums g.
    std::vector<acc_t> value_acc = block(value_sink.reduces ? k : 0);
    std::vector<acc_t> loc_acc = block(loc_sink.reduces ? k : 0);
    std::vector<acc_t> matrix_acc = block(matrix_sink.reduces ? matrix_entries + 1 : 0);
    SinkRows<W, scalar_t> value_rows(value_sink), loc_rows(loc_sink), matrix_rows(matrix_sink), head_rows_out(head_sink);
    acc_t g[W], diag_coefficient[W];

    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      // Lanes past the batch carry g = 0, so they add nothing to the reduced gradients.
      load_upstream_lanes<W>(grad, b0, count, g);
      load_upstream_lanes<W>(grad_log_det, b0, count, diag_coefficient);
      for (int l = 0; l < W; ++l) diag_coefficient[l] = g[l] - diag_coefficient[l];
      if (squash.squashed) {
        squash_block.load_differences(p, value, loc, b0, count, z.data());
      } else {
        load_differences<W, kK>(p, k, value, loc, b0, count, z.data());
      }
      factors.load_block(b0, count);
      const acc_t* L = factors.L();
      factors.solve(z.data());
      // w = L^{-T} z = Sigma^{-1} (value - loc): d log p / d value = -w, d/d loc = w.
      std::copy(z.begin(), z.end(), w.begin());
      factors.solve_transposed(w.data());

      // g w, lane-minor: the gradient of loc, and minus that of value (of u, when squashed).
      acc_t* FUSEDGAUSS_RESTRICT gw_block = gw.data();
      const acc_t* FUSEDGAUSS_RESTRICT w_block = w.data();
      for (int64_t i = 0; i < k; ++i) {
        for (int l = 0; l < W; ++l) gw_block[i * W + l] = g[l] * w_block[i * W + l];
      }
      if (value_sink.requested) {
        for (int64_t e = 0; e < k * W; ++e) g_value[e] = -gw_block[e];
        if (squash.squashed) squash_block.value_gradient(g, g_value.data());
      }
      if (value_sink.reduces) {
        acc_t* FUSEDGAUSS_RESTRICT acc = value_acc.data();
        for (int64_t e = 0; e < k * W; ++e) acc[e] += g_value[e];
      }
      if (loc_sink.reduces) {
        acc_t* FUSEDGAUSS_RESTRICT acc = loc_acc.data();
        for (int64_t e = 0; e < k * W; ++e) acc[e] += gw_block[e];
      }
      if (value_rows.active()) value_rows.write(g_value.data(), b0, count);
      if (loc_rows.active() && !head) loc_rows.write(gw_block, b0, count);

      if (matrix_sink.reduces) {
        // Shared matrix: accumulate g w v^T (v = z for scale_tril, w for covariance) over the
        // lower triangle, and the sum of g; the parameter terms are added once at the end.
        const acc_t* FUSEDGAUSS_RESTRICT v = kCovariance ? w.data() : z.data();
        acc_t* FUSEDGAUSS_RESTRICT acc = matrix_acc.data();
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j <= i; ++j) {
            for (int l = 0; l < W; ++l) acc[slot(i, j) * W + l] += gw_block[i * W + l] * v[j * W + l];
          }
        }
        for (int l = 0; l < W; ++l) acc[matrix_entries * W + l] += g[l];
      } else if (matrix_rows.active()) {
        if constexpr (!kCovariance) {
          // d/dL = tril(g w z^T) - c diag(1/L_ii), c = g - h (h = 0 without grad_log_det);
          // packed, through the diagonal transform
          scale_tril_gradient_block<kPacked, W>(k, gw_block, z.data(), diag_coefficient, L, factors.diag_derivative(),
                                                matrix_grad);
        } else {
          // d/dSigma = 1/2 (g w w^T - g Sigma^{-1}), symmetric
          math::inverse_from_cholesky<W>(k, L, L_inv.data(), sigma_inv.data());
          acc_t* FUSEDGAUSS_RESTRICT out = matrix_grad;
          const acc_t* FUSEDGAUSS_RESTRICT s_inv = sigma_inv.data();
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j <= i; ++j) {
              for (int l = 0; l < W; ++l) {
                const acc_t gij = acc_t(0.5) * (gw_block[i * W + l] * w_block[j * W + l] - g[l] * s_inv[(i * k + j) * W + l]);
                out[(i * k + j) * W + l] = gij;
                out[(j * k + i) * W + l] = gij;
              }
            }
          }
        }
        if (head) {
          head_rows_out.write(gw_block, b0, count);
        } else {
          matrix_rows.write(matrix_grad, b0, count);
        }
      }
    }
    if (value_sink.reduces) add_lane_sums<W>(k, value_acc.data(), value_sink.partials.chunk(chunk));
    if (loc_sink.reduces) add_lane_sums<W>(k, loc_acc.data(), loc_sink.partials.chunk(chunk));
    if (matrix_sink.reduces) {
      add_lane_sums<W>(matrix_entries + 1, matrix_acc.data(), matrix_sink.partials.chunk(chunk));
    }
  });

  const auto options = p.value.data.options();
  std::array<at::Tensor, 3> grads;
  grads[0] = value_sink.reduces ? value_sink.reduced(options).first.to(options.dtype()) : value_sink.per_sample;
  grads[1] = loc_sink.reduces ? loc_sink.reduced(options).first.to(options.dtype()) : loc_sink.per_sample;
  if (!matrix_sink.reduces) {
    grads[2] = matrix_sink.per_sample;
  } else {
    auto [acc, extra] = matrix_sink.reduced(options);
    const acc_t grad_sum = extra[0];
    acc_t* m = acc.template data_ptr<acc_t>();
    const std::vector<acc_t> L = shared_factors.first_lane();
    if constexpr (kPacked) {
      // As finish_shared_scale_tril_gradient, in packed order, then through the transform.
      for (int64_t i = 0; i < k; ++i) {
        acc_t& d = m[math::packed_index(i, i)];
        d = (d - grad_sum / L[i * k + i]) * shared_factors.diag_derivative()[i * W];
      }
    } else if constexpr (!kCovariance) {
      finish_shared_scale_tril_gradient(k, L.data(), grad_sum, m);
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
    grads[2] = (kPacked ? acc : acc.view({k, k})).to(options.dtype());
  }
  return grads;
}

/// A reparameterised squashed sample for a block of samples, lane-minor: u = loc + L eps
/// (no solve), the Jacobian terms of tanh(u), and the Gaussian part of the log-prob, which at
/// u = loc + L eps is -1/2 ||eps||^2 - sum_i log L_ii - (k/2) log 2 pi.
template <int kK, int W, typename scalar_t>
struct RsampleBlock {
  using acc_t = at::opmath_type<scalar_t>;

  explicit RsampleBlock(int64_t k)
      : eps(static_cast<size_t>(k * W)), u(eps.size()), action(eps.size()), derivative(eps.size()),
        two_tanh(eps.size()) {}

  /// Loads eps and loc of samples [b0, b0 + count) and computes u, tanh(u) and its terms.
  template <typename Factors>
  C10_ALWAYS_INLINE void load(const MvnProblem& p, int64_t k, const Factors& factors, int64_t b0, int count) {
    // The problem's "value" operand is eps.
    gather_rows<W, kK>(k, p.value.data.const_data_ptr<scalar_t>() + b0 * p.value.batch_stride, p.value.batch_stride,
                   count, eps.data());
    gather_rows<W, kK>(k, p.loc.data.const_data_ptr<scalar_t>() + b0 * p.loc.batch_stride, p.loc.batch_stride, count,
                   u.data());
    math::add_lower_times<W>(k, factors.L(), eps.data(), u.data());
    acc_t* FUSEDGAUSS_RESTRICT a = action.data();
    acc_t* FUSEDGAUSS_RESTRICT dy = derivative.data();
    acc_t* FUSEDGAUSS_RESTRICT tt2 = two_tanh.data();
    acc_t* FUSEDGAUSS_RESTRICT jacobian = log_det_jacobian;
    const acc_t* FUSEDGAUSS_RESTRICT pre_tanh = u.data();
    math::TanhLogDetSums<W, acc_t> sums;
    for (int64_t i = 0; i < k; ++i) {
      for (int l = 0; l < W; ++l) {
        const math::TanhTerms<acc_t> tt = math::tanh_terms(pre_tanh[i * W + l]);
        a[i * W + l] = tt.tanh;
        dy[i * W + l] = tt.derivative;
        tt2[i * W + l] = acc_t(2) * tt.tanh;
        sums.add(l, tt);
      }
      sums.end_entry(i);
    }
    sums.finish(jacobian);
  }

  std::vector<acc_t> eps, u, action, derivative, two_tanh;
  acc_t log_det_jacobian[W] = {};
};

template <int kK, int W, typename scalar_t>
void rsample_forward_kernel(const MvnProblem& p, RsampleOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : p.k;
  const BlockFactors<Param::kScaleTril, kK, W, scalar_t> shared_factors(p, Pass::kForward);
  scalar_t* action_out = out.action.data_ptr<scalar_t>();
  scalar_t* pre_tanh_out = out.pre_tanh.data_ptr<scalar_t>();
  scalar_t* log_prob_out = out.log_prob.data_ptr<scalar_t>();
  const Chunks chunks(p.layout.batch_numel, grain_size(k * k));
  chunks.run_vectorised([&](int64_t, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    BlockFactors<Param::kScaleTril, kK, W, scalar_t> factors = shared_factors;
    RsampleBlock<kK, W, scalar_t> sample(k);
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      factors.load_block(b0, count);
      sample.load(p, k, factors, b0, count);
      scatter_rows<W>(k, sample.action.data(), count, action_out + b0 * k);
      scatter_rows<W>(k, sample.u.data(), count, pre_tanh_out + b0 * k);
      for (int l = 0; l < count; ++l) {
        acc_t squared_norm = 0;
        for (int64_t i = 0; i < k; ++i) squared_norm += sample.eps[i * W + l] * sample.eps[i * W + l];
        log_prob_out[b0 + l] = static_cast<scalar_t>(
            math::gaussian_log_prob(k, squared_norm, factors.log_det()[l]) - sample.log_det_jacobian[l]);
      }
    }
  });
}

/// Gradients of loc, scale_tril and eps from those of the action, u and the log-prob, with
/// g_u = pre_tanh_gradient per entry (csrc/math/squash_math.h):
///   d/dloc = g_u,  d/dL = tril(g_u eps^T) - g_log_prob diag(1/L_ii),
///   d/deps = L^T g_u - g_log_prob eps.
template <int kK, int W, typename scalar_t>
std::array<at::Tensor, 3> rsample_backward_kernel(const MvnProblem& p, const RsampleGradients& upstream,
                                                  std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : p.k;
  const int64_t n = p.layout.batch_numel;
  const BlockFactors<Param::kScaleTril, kK, W, scalar_t> shared_factors(p, Pass::kBackward);
  const Chunks chunks(n, grain_size(k * k));
  GradientSink<scalar_t> loc_sink(mask[0], p.loc, {k}, chunks, n);
  GradientSink<scalar_t> matrix_sink(mask[1], p.matrix, {k, k}, chunks, n, /*extra_slots=*/1);
  GradientSink<scalar_t> eps_sink(mask[2], p.value, {k}, chunks, n);
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  const scalar_t* grad_action = data(upstream.action);
  const scalar_t* grad_pre_tanh = data(upstream.pre_tanh);
  const scalar_t* grad_log_prob = data(upstream.log_prob);

  chunks.run_vectorised([&](int64_t chunk, int64_t begin, int64_t end) FUSEDGAUSS_INLINE_BODY {
    BlockFactors<Param::kScaleTril, kK, W, scalar_t> factors = shared_factors;
    RsampleBlock<kK, W, scalar_t> sample(k);
    const auto block = [&](int64_t entries) { return std::vector<acc_t>(static_cast<size_t>(entries * W)); };
    std::vector<acc_t> g_action = block(k), g_u = block(k), g_eps = block(k);
    std::vector<acc_t> loc_acc = block(loc_sink.reduces ? k : 0), eps_acc = block(eps_sink.reduces ? k : 0);
    std::vector<acc_t> matrix_acc = block(matrix_sink.reduces ? k * k + 1 : 0);
    std::vector<acc_t> matrix_grad = block(matrix_sink.requested && !matrix_sink.reduces ? k * k : 0);
    SinkRows<W, scalar_t> loc_rows(loc_sink), matrix_rows(matrix_sink), eps_rows(eps_sink);
    acc_t g_log_prob[W];
    for (int64_t b0 = begin; b0 < end; b0 += W) {
      const int count = static_cast<int>(std::min<int64_t>(W, end - b0));
      factors.load_block(b0, count);
      sample.load(p, k, factors, b0, count);
      const acc_t* L = factors.L();
      // Lanes past the batch, and outputs autograd passed no gradient for, carry zeros.
      std::fill(g_action.begin(), g_action.end(), acc_t(0));
      std::fill(g_u.begin(), g_u.end(), acc_t(0));
      if (grad_action != nullptr) gather_rows<W, kK>(k, grad_action + b0 * k, k, count, g_action.data());
      if (grad_pre_tanh != nullptr) gather_rows<W, kK>(k, grad_pre_tanh + b0 * k, k, count, g_u.data());
      load_upstream_lanes<W>(grad_log_prob, b0, count, g_log_prob);
      if (count < W) {
        for (int64_t i = 0; i < k; ++i) {
          for (int l = count; l < W; ++l) g_action[i * W + l] = g_u[i * W + l] = 0;
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        for (int l = 0; l < W; ++l) {
          const int64_t e = i * W + l;
          g_u[e] += g_action[e] * sample.derivative[e] + g_log_prob[l] * sample.two_tanh[e];
        }
      }
      const acc_t* eps = sample.eps.data();

      if (loc_sink.reduces) {
        for (int64_t e = 0; e < k * W; ++e) loc_acc[e] += g_u[e];
      } else if (loc_sink.requested) {
        loc_rows.write(g_u.data(), b0, count);
      }
      if (eps_sink.requested) {
        std::copy(g_u.begin(), g_u.end(), g_eps.begin());
        math::lower_transposed_times_in_place<W>(k, L, g_eps.data());
        for (int64_t i = 0; i < k; ++i) {
          for (int l = 0; l < W; ++l) g_eps[i * W + l] -= g_log_prob[l] * eps[i * W + l];
        }
        if (eps_sink.reduces) {
          for (int64_t e = 0; e < k * W; ++e) eps_acc[e] += g_eps[e];
        } else {
          eps_rows.write(g_eps.data(), b0, count);
        }
      }
      if (matrix_sink.reduces) {
        acc_t* FUSEDGAUSS_RESTRICT acc = matrix_acc.data();
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j <= i; ++j) {
            for (int l = 0; l < W; ++l) acc[(i * k + j) * W + l] += g_u[i * W + l] * eps[j * W + l];
          }
        }
        for (int l = 0; l < W; ++l) acc[k * k * W + l] += g_log_prob[l];
      } else if (matrix_sink.requested) {
        scale_tril_gradient_block</*kPacked=*/false, W>(k, g_u.data(), eps, g_log_prob, L,
                                                        /*diag_derivative=*/static_cast<const acc_t*>(nullptr),
                                                        matrix_grad.data());
        matrix_rows.write(matrix_grad.data(), b0, count);
      }
    }
    if (loc_sink.reduces) add_lane_sums<W>(k, loc_acc.data(), loc_sink.partials.chunk(chunk));
    if (eps_sink.reduces) add_lane_sums<W>(k, eps_acc.data(), eps_sink.partials.chunk(chunk));
    if (matrix_sink.reduces) add_lane_sums<W>(k * k + 1, matrix_acc.data(), matrix_sink.partials.chunk(chunk));
  });

  const auto options = p.loc.data.options();
  std::array<at::Tensor, 3> grads;
  grads[0] = loc_sink.reduces ? loc_sink.reduced(options).first.to(options.dtype()) : loc_sink.per_sample;
  grads[2] = eps_sink.reduces ? eps_sink.reduced(options).first.to(options.dtype()) : eps_sink.per_sample;
  if (matrix_sink.reduces) {
    auto [acc, extra] = matrix_sink.reduced(options);
    finish_shared_scale_tril_gradient(k, shared_factors.first_lane().data(), extra[0], acc.template data_ptr<acc_t>());
    grads[1] = acc.view({k, k}).to(options.dtype());
  } else {
    grads[1] = matrix_sink.per_sample;
  }
  return grads;
}

/// Runs fn(K, W) with std::integral_constants: K as with_static_event_size (lanes.h) gives
/// it; W lanes: kSolveLanes for a Cholesky factor given (not factorised) with a compile-time
/// k, kLargeFactorLanes for a per-sample one with k > 16, and kLanes otherwise.
template <Param kParam, typename scalar_t, int kLargeFactorLanes = kStreamingLanes, typename F>
void with_block_shape(const MvnProblem& p, const F& fn) {
  constexpr bool kFactorGiven = kParam != Param::kCovariance;
  const bool large_factors = kFactorGiven && !p.matrix.shared() && p.k > 16;
  with_static_event_size<scalar_t>(p.k, [&](auto K) {
    if constexpr (decltype(K)::value == 0) {
      if (large_factors) return fn(K, std::integral_constant<int, kLargeFactorLanes>{});
    } else if constexpr (kFactorGiven) {
      return fn(K, std::integral_constant<int, kSolveLanes>{});
    }
    fn(K, std::integral_constant<int, kLanes>{});
  });
}

/// The kernels behind this device's log-prob ops (LogProbOps, csrc/common/op_wrappers.h).
struct LogProbKernels {
  template <Param kParam>
  static void forward(const MvnProblem& p, at::Tensor& out, ValueSquash squash, const at::Tensor& log_det);
  template <Param kParam>
  static std::array<at::Tensor, 3> backward(const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask,
                                            ValueSquash squash, const at::Tensor& grad_log_det,
                                            const at::Tensor& head_rows = at::Tensor());
};

template <Param kParam>
void LogProbKernels::forward(const MvnProblem& p, at::Tensor& out, ValueSquash squash, const at::Tensor& log_det) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), forward_op_name(kParam), [&] {
    // Large per-sample factors keep 16 lanes here, two chains of a triangular solve side by
    // side: a block holds the factors alone (18 KB at k=17), which L1 takes. A k=17 scale_tril
    // forward, two threads, 65536 samples, in-process A/B: 3.6 -> 3.3 ms (medians); one thread,
    // 4096 samples (from cache): 0.37 -> 0.32 ms. The backward, which also holds their
    // gradient, keeps kStreamingLanes: with 16 lanes it went from 7.2 to 8.5 ms.
    with_block_shape<kParam, scalar_t, kLanes>(p, [&](auto K, auto W) {
      log_prob_forward_kernel<kParam, decltype(K)::value, decltype(W)::value, scalar_t>(
          p, out.data_ptr<scalar_t>(), squash, log_det.defined() ? log_det.data_ptr<scalar_t>() : nullptr);
    });
  });
}

template <Param kParam>
std::array<at::Tensor, 3> LogProbKernels::backward(const MvnProblem& p, const at::Tensor& grad,
                                                   std::array<bool, 3> mask, ValueSquash squash,
                                                   const at::Tensor& grad_log_det, const at::Tensor& head_rows) {
  std::array<at::Tensor, 3> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), backward_op_name(kParam), [&] {
    with_block_shape<kParam, scalar_t>(p, [&](auto K, auto W) {
      grads = log_prob_backward_kernel<kParam, decltype(K)::value, decltype(W)::value, scalar_t>(
          p, grad.const_data_ptr<scalar_t>(), mask, squash,
          grad_log_det.defined() ? grad_log_det.const_data_ptr<scalar_t>() : nullptr, head_rows);
    });
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_tril_rsample_log_prob(const at::Tensor& loc,
                                                                              const at::Tensor& scale_tril,
                                                                              const at::Tensor& eps) {
  constexpr const char* op = "squashed_tril_rsample_log_prob";
  const MvnProblem p = prepare_mvn_problem(op, "scale_tril", eps, loc, scale_tril, "eps");
  RsampleOutputs out = empty_rsample_outputs(p.layout, p.k, loc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "squashed_tril_rsample_log_prob", [&] {
    with_block_shape<Param::kScaleTril, scalar_t>(p, [&](auto K, auto W) {
      rsample_forward_kernel<decltype(K)::value, decltype(W)::value, scalar_t>(p, out);
    });
  });
  return {out.action, out.pre_tanh, out.log_prob};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_tril_rsample_log_prob_backward(
    const c10::optional<at::Tensor>& grad_action, const c10::optional<at::Tensor>& grad_pre_tanh,
    const c10::optional<at::Tensor>& grad_log_prob, const at::Tensor& loc, const at::Tensor& scale_tril,
    const at::Tensor& eps, std::array<bool, 3> mask) {
  constexpr const char* op = "squashed_tril_rsample_log_prob_backward";
  const MvnProblem p = prepare_mvn_problem(op, "scale_tril", eps, loc, scale_tril, "eps");
  const RsampleGradients upstream =
      check_rsample_gradients(op, grad_action, grad_pre_tanh, grad_log_prob, loc, p.layout, p.k);
  std::array<at::Tensor, 3> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "squashed_tril_rsample_log_prob_backward", [&] {
    with_block_shape<Param::kScaleTril, scalar_t>(p, [&](auto K, auto W) {
      grads = rsample_backward_kernel<decltype(K)::value, decltype(W)::value, scalar_t>(p, upstream, mask);
    });
  });
  return gradients_for_inputs(grads, {&loc, &scale_tril, &eps}, {&p.loc, &p.matrix, &p.value}, p.layout, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) {
  LogProbOps<LogProbKernels>::register_kernels(m);
  m.impl("squashed_tril_rsample_log_prob", &squashed_tril_rsample_log_prob);
  m.impl("squashed_tril_rsample_log_prob_backward", &squashed_tril_rsample_log_prob_backward);
}

}  // namespace cpu
}  // namespace fusedgauss
