// The per-sample math of csrc/math, in double precision, against direct definitions.
#include <vector>

#include "check.h"
#include "math/gaussian_math.h"
#include "math/squash_math.h"
#include "random_matrices.h"

using namespace fusedgauss::math;

namespace {

void test_cholesky_reconstructs(int k) {
  const Matrix A = random_spd(k);
  const Matrix L = lower_factor(k, A);
  for (int i = 0; i < k; ++i) {
    EXPECT_TRUE(L[i * k + i] > 0);
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (int m = 0; m < k; ++m) s += L[i * k + m] * L[j * k + m];
      EXPECT_CLOSE(s, A[i * k + j], 1e-12);
    }
  }
}

void test_cholesky_rejects_indefinite(int k) {
  Matrix A = random_spd(k);
  A[(k - 1) * k + (k - 1)] = -1.0;
  bool ok = true;
  cholesky_in_place<1>(k, A.data(), &ok);
  EXPECT_TRUE(!ok);
  EXPECT_TRUE(std::isnan(A[(k - 1) * k + (k - 1)]));
}

void test_solves(int k) {
  const Matrix L = lower_factor(k, random_spd(k));
  std::vector<double> b(k), x(k), y(k);
  for (double& v : b) v = normal();
  x = b;
  solve_lower<1>(k, L.data(), x.data());
  y = b;
  solve_lower_transposed<1>(k, L.data(), y.data());
  for (int i = 0; i < k; ++i) {
    double lx = 0, lty = 0;
    for (int j = 0; j < k; ++j) {
      lx += L[i * k + j] * x[j];
      lty += L[j * k + i] * y[j];
    }
    EXPECT_CLOSE(lx, b[i], 1e-12);
    EXPECT_CLOSE(lty, b[i], 1e-12);
  }
}

void test_log_prob(int k) {
  const Matrix A = random_spd(k);
  const Matrix L = lower_factor(k, A);
  std::vector<double> value(k), loc(k), z(k);
  for (int i = 0; i < k; ++i) {
    value[i] = normal();
    loc[i] = normal();
  }
  for (int i = 0; i < k; ++i) z[i] = value[i] - loc[i];
  double squared_norm = 0, log_det_half = 0;
  whiten<1>(k, L.data(), z.data(), &squared_norm);
  sum_log_diagonal<1>(k, L.data(), &log_det_half);
  const double log_prob = gaussian_log_prob<double>(k, squared_norm, log_det_half);
  // Direct definition: -1/2 d^T A^{-1} d - 1/2 log det A - k/2 log 2 pi, with A^{-1} from
  // inverse_from_cholesky and det A = prod L_ii^2.
  Matrix L_inv(k * k), A_inv(k * k);
  inverse_from_cholesky<1>(k, L.data(), L_inv.data(), A_inv.data());
  double quadratic = 0, log_det = 0;
  for (int i = 0; i < k; ++i) {
    log_det += std::log(L[i * k + i] * L[i * k + i]);
    for (int j = 0; j < k; ++j) {
      const double a_inv = i >= j ? A_inv[i * k + j] : A_inv[j * k + i];
      quadratic += (value[i] - loc[i]) * a_inv * (value[j] - loc[j]);
    }
  }
  EXPECT_CLOSE(log_prob, -0.5 * quadratic - 0.5 * log_det - 0.5 * k * kLog2Pi, 1e-12);
  // inverse_from_cholesky: A A^{-1} = I.
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (int m = 0; m < k; ++m) s += A[i * k + m] * (m >= j ? A_inv[m * k + j] : A_inv[j * k + m]);
      EXPECT_CLOSE(s, i == j ? 1.0 : 0.0, 1e-10);
    }
}

void test_cholesky_backward_finite_differences(int k) {
  // f(A) = sum G .* chol(A), with A perturbed symmetrically: df = <dA, grad> for symmetric dA.
  const Matrix A = random_spd(k);
  const Matrix L = lower_factor(k, A);
  Matrix G(k * k);
  for (double& g : G) g = normal();
  Matrix grad(k * k);
  cholesky_backward<1>(k, G.data(), L.data(), grad.data());
  auto f = [&](const Matrix& X) {
    const Matrix LX = lower_factor(k, X);
    double s = 0;
    for (int i = 0; i < k * k; ++i) s += G[i] * LX[i];
    return s;
  };
  const double h = 1e-6;
  for (int i = 0; i < k; ++i)
    for (int j = 0; j <= i; ++j) {
      Matrix plus = A, minus = A;
      plus[i * k + j] += h;
      minus[i * k + j] -= h;
      if (i != j) {
        plus[j * k + i] += h;
        minus[j * k + i] -= h;
      }
      const double numeric = (f(plus) - f(minus)) / (2 * h);
      const double analytic = i == j ? grad[i * k + i] : grad[i * k + j] + grad[j * k + i];
      EXPECT_CLOSE(analytic, numeric, 1e-6);
      EXPECT_CLOSE(grad[i * k + j], grad[j * k + i], 1e-14);
    }
}

/// Lanes compute independently: W samples in lock-step give, lane by lane, the W = 1 result,
/// and a failing lane does not disturb the others.
void test_lanes_match_single_samples(int k) {
  constexpr int W = 4;
  Matrix A_lanes(k * k * W), L_single[W];
  std::vector<double> b_lanes(k * W), x_single[W];
  for (int l = 0; l < W; ++l) {
    Matrix A = random_spd(k);
    if (l == 2) A[0] = -1.0;  // lane 2 is not positive-definite
    for (int e = 0; e < k * k; ++e) A_lanes[e * W + l] = A[e];
    L_single[l] = A;
    x_single[l].resize(k);
    for (int i = 0; i < k; ++i) b_lanes[i * W + l] = x_single[l][i] = normal();
  }
  bool ok[W];
  cholesky_in_place<W>(k, A_lanes.data(), ok);
  solve_lower<W>(k, A_lanes.data(), b_lanes.data());
  for (int l = 0; l < W; ++l) {
    bool ok_single = false;
    cholesky_in_place<1>(k, L_single[l].data(), &ok_single);
    EXPECT_TRUE(ok[l] == ok_single && ok[l] == (l != 2));
    if (!ok_single) {
      EXPECT_TRUE(std::isnan(b_lanes[(k - 1) * W + l]));
      continue;
    }
    solve_lower<1>(k, L_single[l].data(), x_single[l].data());
    for (int i = 0; i < k; ++i) EXPECT_CLOSE(b_lanes[i * W + l], x_single[l][i], 0.0);
  }
}

/// The column solves (the CPU kernels' at a compile-time k) solve what the row solves do. Their
/// operations are the same, in the same order, but a compiler may contract them into FMAs
/// differently (with -march=native this one does), so the bits may differ.
void test_column_solves_match_row_solves(int k) {
  constexpr int W = 4;
  Matrix L_lanes(k * k * W);
  for (int l = 0; l < W; ++l) {
    const Matrix L = lower_factor(k, random_spd(k));
    for (int e = 0; e < k * k; ++e) L_lanes[e * W + l] = L[e];
  }
  std::vector<double> b(k * W);
  for (double& x : b) x = normal();
  std::vector<double> rows = b, columns = b;
  solve_lower<W>(k, L_lanes.data(), rows.data());
  solve_lower_by_columns<W>(k, L_lanes.data(), columns.data());
  for (int e = 0; e < k * W; ++e) EXPECT_CLOSE(columns[e], rows[e], 1e-12);
  rows = b;
  columns = b;
  solve_lower_transposed<W>(k, L_lanes.data(), rows.data());
  solve_lower_transposed_by_columns<W>(k, L_lanes.data(), columns.data());
  for (int e = 0; e < k * W; ++e) EXPECT_CLOSE(columns[e], rows[e], 1e-12);
}

/// sum_log_diagonal renormalises its product: float diagonals spanning the whole float range
/// give the sum of their logs, where a plain product would overflow or underflow.
void test_log_det_over_the_float_range() {
  const int k = 8;
  std::vector<float> L(k * k, 0.0f);
  const float diagonal[k] = {1e-38f, 1e-38f, 3e38f, 3e38f, 1e-45f, 2.5f, 1e30f, 1e-30f};
  double expected = 0;
  for (int i = 0; i < k; ++i) {
    L[i * k + i] = diagonal[i];
    expected += std::log(static_cast<double>(diagonal[i]));
  }
  float got = 0;
  sum_log_diagonal<1>(k, L.data(), &got);
  EXPECT_CLOSE(got, expected, 1e-6);
  L[3 * k + 3] = -1.0f;
  sum_log_diagonal<1>(k, L.data(), &got);
  EXPECT_TRUE(std::isnan(got));
  L[3 * k + 3] = INFINITY;
  sum_log_diagonal<1>(k, L.data(), &got);
  EXPECT_TRUE(std::isinf(got) && got > 0);
}

/// Over 32 factors the product is renormalised: 100 diagonal entries near the top of the
/// float range (their product is about 2^12700), in 16 lanes with different diagonals.
void test_log_det_of_a_long_diagonal() {
  constexpr int W = 16;
  const int k = 100;
  std::vector<float> L(static_cast<size_t>(k * k * W), 0.0f);
  double expected[W] = {};
  for (int i = 0; i < k; ++i) {
    for (int l = 0; l < W; ++l) {
      const float d = 1.5e38f / static_cast<float>(1 + (i * 7 + l) % 13);
      L[(i * k + i) * W + l] = d;
      expected[l] += std::log(static_cast<double>(d));
    }
  }
  float got[W];
  sum_log_diagonal<W>(k, L.data(), got);
  for (int l = 0; l < W; ++l) EXPECT_CLOSE(got[l], expected[l], 1e-6);
}

/// split_exponent is an exact frexp with the mantissa in [1, 2), subnormals included.
void test_split_exponent() {
  for (double e10 = -45.0; e10 <= 38.5; e10 += 0.0377) {
    const float x = static_cast<float>(std::pow(10.0, e10));
    if (x == 0.0f) continue;
    int32_t e = 0;
    const float m = split_exponent(x, e);
    EXPECT_TRUE(m >= 1.0f && m < 2.0f);
    EXPECT_TRUE(std::ldexp(static_cast<double>(m), e) == static_cast<double>(x));
    const double md = split_exponent(static_cast<double>(x), e);
    EXPECT_TRUE(md >= 1.0 && md < 2.0 && std::ldexp(md, e) == static_cast<double>(x));
  }
  int32_t e = 0;
  EXPECT_TRUE(std::isinf(split_exponent(INFINITY, e)) && std::isnan(split_exponent(std::nanf(""), e)));
}

/// The float exp and log of elementary_math.h (the vectorisable polynomials) against libm, over
/// their whole domain, with the special values.
void test_float_exp_and_log() {
  for (double x = -87.0; x <= 0.0; x += 0.0137) {
    EXPECT_CLOSE(exp_nonpositive(static_cast<float>(x)) / std::exp(static_cast<double>(static_cast<float>(x))), 1.0, 4e-7);
  }
  for (double e = -44.0; e <= 38.0; e += 0.0731) {
    const float x = static_cast<float>(std::pow(10.0, e));
    EXPECT_CLOSE(log_(x), std::log(static_cast<double>(x)), 2e-7);
  }
  EXPECT_TRUE(std::isinf(log_(0.0f)) && log_(0.0f) < 0);
  EXPECT_TRUE(std::isnan(log_(-1.0f)) && std::isnan(log_(std::nanf(""))));
  EXPECT_TRUE(std::isinf(log_(INFINITY)) && log_(INFINITY) > 0);
  EXPECT_TRUE(std::isnan(exp_nonpositive(std::nanf(""))));
}

/// tanh_terms against its definitions: tanh, log(1 - tanh^2) and its derivative, in float
/// (polynomials) and double (libm), from 0 into the range where tanh rounds to 1.
void test_tanh_terms() {
  for (double u = -30.0; u <= 30.0; u += 0.00731) {
    const double a = std::fabs(u);
    const double log_det = a < 0.5 ? std::log1p(-std::tanh(u) * std::tanh(u))
                                   : 2 * (std::log(2.0) - a - std::log1p(std::exp(-2 * a)));
    const TanhTerms<double> d = tanh_terms(u);
    EXPECT_CLOSE(d.tanh, std::tanh(u), 1e-15);
    EXPECT_CLOSE(d.log_det, log_det, 1e-14);
    EXPECT_CLOSE(d.derivative, std::exp(log_det), 1e-14);
    const auto uf = static_cast<float>(u);
    const TanhTerms<float> f = tanh_terms(uf);
    EXPECT_CLOSE(f.tanh, std::tanh(static_cast<double>(uf)), 3e-7);
    EXPECT_CLOSE(f.log_det, log_det, 1e-6);
  }
  // Small arguments keep their relative accuracy.
  EXPECT_CLOSE(tanh_terms(1e-20f).tanh / 1e-20, 1.0, 1e-6);
  EXPECT_CLOSE(tanh_terms(-1e-6).log_det / -1e-12, 1.0, 1e-9);
}

/// atanh_clamped inverts tanh inside the clamp, clamps at the dtype's epsilon, and its
/// derivative is 1 / (1 - y^2) inside, 0 outside.
void test_atanh_clamped() {
  const double eps = 2.220446049250313e-16;
  for (double y = -0.999; y <= 0.999; y += 0.0123) {
    EXPECT_CLOSE(atanh_clamped(y, eps), std::atanh(y), 1e-13);
    EXPECT_CLOSE(atanh_clamped_derivative(y, eps), 1 / (1 - y * y), 1e-13);
  }
  EXPECT_CLOSE(atanh_clamped(1.0, eps), std::atanh(1 - eps), 1e-13);
  EXPECT_CLOSE(atanh_clamped(-1.0, eps), -std::atanh(1 - eps), 1e-13);
  EXPECT_TRUE(atanh_clamped_derivative(1.0, eps) == 0.0);
  EXPECT_TRUE(std::isnan(atanh_clamped(std::nan(""), eps)));
}

}  // namespace

int main() {
  test_log_det_over_the_float_range();
  test_log_det_of_a_long_diagonal();
  test_split_exponent();
  test_float_exp_and_log();
  test_tanh_terms();
  test_atanh_clamped();
  for (int k : {1, 2, 3, 6, 17, 32}) {
    test_cholesky_reconstructs(k);
    test_cholesky_rejects_indefinite(k);
    test_solves(k);
    test_log_prob(k);
    test_cholesky_backward_finite_differences(k);
    test_lanes_match_single_samples(k);
    test_column_solves_match_row_solves(k);
  }
  std::printf("%s: %d failures\n", failures() ? "FAILED" : "ok", failures());
  return failures();
}
