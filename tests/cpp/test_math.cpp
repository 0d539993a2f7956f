// The per-sample math of csrc/math, in double precision, against direct definitions.
#include <random>
#include <vector>

#include "check.h"
#include "math/gaussian_math.h"

using namespace fusedgauss::math;
using Matrix = std::vector<double>;

namespace {

std::mt19937_64 rng(1234);

double normal() { return std::normal_distribution<double>()(rng); }

/// A random symmetric positive-definite k x k matrix: B B^T / k + I / 2.
Matrix random_spd(int k) {
  Matrix B(k * k), A(k * k, 0.0);
  for (double& b : B) b = normal();
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      for (int m = 0; m < k; ++m) A[i * k + j] += B[i * k + m] * B[j * k + m] / k;
      if (i == j) A[i * k + j] += 0.5;
    }
  return A;
}

Matrix lower_factor(int k, const Matrix& A) {
  Matrix L = A;
  CHECK(cholesky_in_place(k, L.data()));
  for (int i = 0; i < k; ++i)
    for (int j = i + 1; j < k; ++j) L[i * k + j] = 0;
  return L;
}

void test_cholesky_reconstructs(int k) {
  const Matrix A = random_spd(k);
  const Matrix L = lower_factor(k, A);
  for (int i = 0; i < k; ++i) {
    CHECK(L[i * k + i] > 0);
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (int m = 0; m < k; ++m) s += L[i * k + m] * L[j * k + m];
      CHECK_CLOSE(s, A[i * k + j], 1e-12);
    }
  }
}

void test_cholesky_rejects_indefinite(int k) {
  Matrix A = random_spd(k);
  A[(k - 1) * k + (k - 1)] = -1.0;
  CHECK(!cholesky_in_place(k, A.data()));
}

void test_solves(int k) {
  const Matrix L = lower_factor(k, random_spd(k));
  std::vector<double> b(k), x(k), y(k);
  for (double& v : b) v = normal();
  x = b;
  solve_lower(k, L.data(), x.data());
  y = b;
  solve_lower_transposed(k, L.data(), y.data());
  for (int i = 0; i < k; ++i) {
    double lx = 0, lty = 0;
    for (int j = 0; j < k; ++j) {
      lx += L[i * k + j] * x[j];
      lty += L[j * k + i] * y[j];
    }
    CHECK_CLOSE(lx, b[i], 1e-12);
    CHECK_CLOSE(lty, b[i], 1e-12);
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
  const double squared_norm = whiten(k, value.data(), loc.data(), L.data(), z.data());
  const double log_prob = gaussian_log_prob<double>(k, squared_norm, sum_log_diagonal<double>(k, L.data()));
  // Direct definition: -1/2 d^T A^{-1} d - 1/2 log det A - k/2 log 2 pi, with A^{-1} from
  // inverse_from_cholesky and det A = prod L_ii^2.
  Matrix L_inv(k * k), A_inv(k * k);
  inverse_from_cholesky(k, L.data(), L_inv.data(), A_inv.data());
  double quadratic = 0, log_det = 0;
  for (int i = 0; i < k; ++i) {
    log_det += std::log(L[i * k + i] * L[i * k + i]);
    for (int j = 0; j < k; ++j) {
      const double a_inv = i >= j ? A_inv[i * k + j] : A_inv[j * k + i];
      quadratic += (value[i] - loc[i]) * a_inv * (value[j] - loc[j]);
    }
  }
  CHECK_CLOSE(log_prob, -0.5 * quadratic - 0.5 * log_det - 0.5 * k * kLog2Pi, 1e-12);
  // inverse_from_cholesky: A A^{-1} = I.
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (int m = 0; m < k; ++m) s += A[i * k + m] * (m >= j ? A_inv[m * k + j] : A_inv[j * k + m]);
      CHECK_CLOSE(s, i == j ? 1.0 : 0.0, 1e-10);
    }
}

void test_cholesky_backward_finite_differences(int k) {
  // f(A) = sum G .* chol(A), with A perturbed symmetrically: df = <dA, grad> for symmetric dA.
  const Matrix A = random_spd(k);
  const Matrix L = lower_factor(k, A);
  Matrix G(k * k);
  for (double& g : G) g = normal();
  Matrix grad(k * k);
  cholesky_backward(k, G.data(), L.data(), grad.data());
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
      CHECK_CLOSE(analytic, numeric, 1e-6);
      CHECK_CLOSE(grad[i * k + j], grad[j * k + i], 1e-14);
    }
}

}  // namespace

int main() {
  for (int k : {1, 2, 3, 6, 17, 32}) {
    test_cholesky_reconstructs(k);
    test_cholesky_rejects_indefinite(k);
    test_solves(k);
    test_log_prob(k);
    test_cholesky_backward_finite_differences(k);
  }
  std::printf("%s: %d failures\n", failures() ? "FAILED" : "ok", failures());
  return failures();
}
