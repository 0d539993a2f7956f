#pragma once
// Random double-precision inputs of the C++ math tests, from one seeded generator per test
// program.
#include <random>
#include <vector>

#include "check.h"
#include "math/gaussian_math.h"

using Matrix = std::vector<double>;

inline std::mt19937_64& test_rng() {
  static std::mt19937_64 rng(1234);
  return rng;
}

inline double normal() { return std::normal_distribution<double>()(test_rng()); }

/// A random symmetric positive-definite k x k matrix: B B^T / k + I / 2.
inline Matrix random_spd(int k) {
  Matrix B(k * k), A(k * k, 0.0);
  for (double& b : B) b = normal();
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      for (int m = 0; m < k; ++m) A[i * k + j] += B[i * k + m] * B[j * k + m] / k;
      if (i == j) A[i * k + j] += 0.5;
    }
  return A;
}

/// The Cholesky factor of A, zero above the diagonal.
inline Matrix lower_factor(int k, const Matrix& A) {
  Matrix L = A;
  bool ok = false;
  fusedgauss::math::cholesky_in_place<1>(k, L.data(), &ok);
  EXPECT_TRUE(ok);
  for (int i = 0; i < k; ++i)
    for (int j = i + 1; j < k; ++j) L[i * k + j] = 0;
  return L;
}
