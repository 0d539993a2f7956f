#pragma once
// Per-sample math of the Gaussian ops, written once for every device.
//
// Every function here works on one sample: k-vectors and row-major k x k matrices
// (leading dimension k) in caller-provided storage. They are C10_HOST_DEVICE templates so
// the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) run the same arithmetic.
// `acc_t` is the accumulation type (float for half/bfloat16/float inputs, double for
// double); `mat_t` is the element type of a matrix read straight from the input tensor,
// which may be narrower than acc_t.
//
// Nothing here allocates, synchronises or throws: a failed factorisation is reported by
// the return value so the caller can write NaN for that sample alone.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fusedgauss {
namespace math {

// log(2*pi)
constexpr double kLog2Pi = 1.8378770664093454835606594728112;

C10_HOST_DEVICE inline float sqrt_(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_(double x) { return ::sqrt(x); }
C10_HOST_DEVICE inline float log_(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_(double x) { return ::log(x); }

/// Solves L x = b in place (forward substitution); `x` holds b on entry.
/// x_i = (b_i - sum_{j<i} L_ij x_j) / L_ii
template <typename acc_t, typename mat_t>
C10_HOST_DEVICE inline void solve_lower(int64_t k, const mat_t* L, acc_t* x) {
  for (int64_t i = 0; i < k; ++i) {
    const mat_t* row = L + i * k;
    acc_t s = x[i];
    for (int64_t j = 0; j < i; ++j) {
      s -= static_cast<acc_t>(row[j]) * x[j];
    }
    x[i] = s / static_cast<acc_t>(row[i]);
  }
}

/// Solves L^T x = b in place (back substitution); `x` holds b on entry.
/// Column-oriented so that it walks the rows of L, which are contiguous:
/// once x_i is known, its contribution L_ij x_i is removed from every equation j < i.
template <typename acc_t, typename mat_t>
C10_HOST_DEVICE inline void solve_lower_transposed(int64_t k, const mat_t* L, acc_t* x) {
  for (int64_t i = k - 1; i >= 0; --i) {
    const mat_t* row = L + i * k;
    const acc_t xi = x[i] / static_cast<acc_t>(row[i]);
    x[i] = xi;
    for (int64_t j = 0; j < i; ++j) {
      x[j] -= static_cast<acc_t>(row[j]) * xi;
    }
  }
}

/// sum_i log L_ii
template <typename acc_t, typename mat_t>
C10_HOST_DEVICE inline acc_t sum_log_diagonal(int64_t k, const mat_t* L) {
  acc_t s = 0;
  for (int64_t i = 0; i < k; ++i) {
    s += log_(static_cast<acc_t>(L[i * k + i]));
  }
  return s;
}

/// log N(x; mu, L L^T) = -1/2 ||z||^2 - sum_i log L_ii - (k/2) log(2 pi),
/// given the squared Mahalanobis norm ||z||^2 = ||L^{-1}(x - mu)||^2.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gaussian_log_prob(int64_t k, acc_t squared_norm, acc_t sum_log_diag) {
  return acc_t(-0.5) * squared_norm - sum_log_diag -
         acc_t(0.5) * static_cast<acc_t>(k) * static_cast<acc_t>(kLog2Pi);
}

/// z = L^{-1} (value - loc), written to `z`; returns ||z||^2.
template <typename acc_t, typename in_t, typename mat_t>
C10_HOST_DEVICE inline acc_t whiten(int64_t k, const in_t* value, const in_t* loc, const mat_t* L,
                                    acc_t* z) {
  for (int64_t i = 0; i < k; ++i) {
    z[i] = static_cast<acc_t>(value[i]) - static_cast<acc_t>(loc[i]);
  }
  solve_lower(k, L, z);
  acc_t squared_norm = 0;
  for (int64_t i = 0; i < k; ++i) {
    squared_norm += z[i] * z[i];
  }
  return squared_norm;
}

/// Copies the lower triangle (diagonal included) of a k x k matrix, converting to acc_t.
template <typename acc_t, typename mat_t>
C10_HOST_DEVICE inline void load_lower_triangle(int64_t k, const mat_t* src, acc_t* dst) {
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      dst[i * k + j] = static_cast<acc_t>(src[i * k + j]);
    }
  }
}

/// Cholesky factor of the symmetric matrix whose lower triangle is in `A`, in place
/// (Cholesky-Banachiewicz, row by row so every dot product walks contiguous rows):
///   L_ij = (A_ij - sum_{m<j} L_im L_jm) / L_jj,   L_ii = sqrt(A_ii - sum_{m<i} L_im^2).
/// Only the lower triangle is read or written. Returns false, leaving `A` partly
/// overwritten, when a pivot is not positive (A is not positive-definite, or is NaN).
template <typename acc_t>
C10_HOST_DEVICE inline bool cholesky_in_place(int64_t k, acc_t* A) {
  for (int64_t i = 0; i < k; ++i) {
    acc_t* row_i = A + i * k;
    for (int64_t j = 0; j <= i; ++j) {
      const acc_t* row_j = A + j * k;
      acc_t s = row_i[j];
      for (int64_t m = 0; m < j; ++m) {
        s -= row_i[m] * row_j[m];
      }
      if (j < i) {
        row_i[j] = s / row_j[j];
      } else {
        if (!(s > acc_t(0))) {
          return false;
        }
        row_i[i] = sqrt_(s);
      }
    }
  }
  return true;
}

/// Lower triangle of Sigma^{-1} = L^{-T} L^{-1} for a Cholesky factor L.
/// `L_inv` receives L^{-1} (lower triangle), `sigma_inv` the lower triangle of
/// (Sigma^{-1})_ij = sum_{m >= i} (L^{-1})_mi (L^{-1})_mj  for i >= j.
template <typename acc_t, typename mat_t>
C10_HOST_DEVICE inline void inverse_from_cholesky(int64_t k, const mat_t* L, acc_t* L_inv,
                                                  acc_t* sigma_inv) {
  // Row i of L^{-1}: (L^{-1})_ii = 1/L_ii, (L^{-1})_ij = -(sum_{j<=m<i} L_im (L^{-1})_mj) / L_ii.
  for (int64_t i = 0; i < k; ++i) {
    const mat_t* row = L + i * k;
    const acc_t inv_diag = acc_t(1) / static_cast<acc_t>(row[i]);
    for (int64_t j = 0; j < i; ++j) {
      acc_t s = 0;
      for (int64_t m = j; m < i; ++m) {
        s += static_cast<acc_t>(row[m]) * L_inv[m * k + j];
      }
      L_inv[i * k + j] = -s * inv_diag;
    }
    L_inv[i * k + i] = inv_diag;
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t s = 0;
      for (int64_t m = i; m < k; ++m) {
        s += L_inv[m * k + i] * L_inv[m * k + j];
      }
      sigma_inv[i * k + j] = s;
    }
  }
}

/// Gradient of a loss through A = L L^T -> L (the convention of torch.linalg.cholesky's
/// backward, so the result is symmetric):
///   P    = Phi(L^T G), the lower triangle of L^T G with its diagonal halved, made symmetric
///          as P = (Phi + Phi^T) / 2,
///   dA   = L^{-T} P L^{-1}.
/// `grad_L` is read through its lower triangle only. `work` (k*k) receives dA, full and
/// symmetric.
template <typename acc_t, typename grad_t, typename mat_t>
C10_HOST_DEVICE inline void cholesky_backward(int64_t k, const grad_t* grad_L, const mat_t* L,
                                              acc_t* work) {
  // work_ij = (L^T G)_ij = sum_{m >= i} L_mi G_mj for i >= j (both factors are lower).
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t s = 0;
      for (int64_t m = i; m < k; ++m) {
        s += static_cast<acc_t>(L[m * k + i]) * static_cast<acc_t>(grad_L[m * k + j]);
      }
      work[i * k + j] = s;
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const acc_t half = acc_t(0.5) * work[i * k + j];
      work[i * k + j] = half;
      work[j * k + i] = half;
    }
    work[i * k + i] *= acc_t(0.5);
  }
  // Rows of P L^{-1} = (L^{-T} P)^T: each row r of P solves L^T x = P_r, since P is symmetric.
  for (int64_t r = 0; r < k; ++r) {
    solve_lower_transposed(k, L, work + r * k);
  }
  // Transpose so the columns of P L^{-1} become rows, then L^{-T} applied to each gives the
  // rows of L^{-T} P L^{-1} (symmetric, so rows and columns agree up to rounding).
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const acc_t t = work[i * k + j];
      work[i * k + j] = work[j * k + i];
      work[j * k + i] = t;
    }
  }
  for (int64_t r = 0; r < k; ++r) {
    solve_lower_transposed(k, L, work + r * k);
  }
  // Symmetrise exactly, so the gradient has no rounding asymmetry.
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const acc_t mean = acc_t(0.5) * (work[i * k + j] + work[j * k + i]);
      work[i * k + j] = mean;
      work[j * k + i] = mean;
    }
  }
}

}  // namespace math
}  // namespace fusedgauss
