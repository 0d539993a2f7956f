#pragma once
// Per-sample math of the Gaussian ops, written once for every device.
//
// Every function works on a block of W samples in lock-step, stored lane-minor: entry i of
// a k-vector is x[i * W + l] for lane (sample) l, and entry (i, j) of a row-major k x k
// matrix is A[(i * k + j) * W + l]. With W = 1 this is the plain layout of one sample, as a
// CUDA thread uses it; the CPU kernels use W > 1 so that the lane loops become SIMD
// instructions and the W dependency chains of a triangular solve run side by side.
//
// `acc_t` is the accumulation type (float for half/bfloat16/float inputs, double for double);
// `mat_t` is the element type of a matrix read straight from an input, which may be narrower.
// Nothing here allocates, synchronises or throws. A failed factorisation is reported per
// lane; its lane carries NaN from then on and the other lanes are unaffected.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "elementary_math.h"

// The functions are always inlined, so a caller that knows k at compile time gets every loop
// unrolled. Arguments of these functions never overlap. Saying so lets the compiler keep the lane loops
// in SIMD registers instead of reloading after every store.
#define FUSEDGAUSS_RESTRICT __restrict__

// Row loops of the triangular products and solves, unrolled: with a compile-time k GCC's own
// limits stopped at the size of the lane loops inside, left the row loops rolled and kept the
// running sums on the stack. CUDA (W = 1) is left to nvcc.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FUSEDGAUSS_UNROLL_ROWS _Pragma("GCC unroll 8")
#else
#define FUSEDGAUSS_UNROLL_ROWS
#endif

namespace fusedgauss {
namespace math {

// log(2*pi)
constexpr double kLog2Pi = 1.8378770664093454835606594728112;
// log(2)
constexpr double kLog2 = 0.69314718055994530941723212145818;


/// Solves L x = b in place for each lane (forward substitution); `x` holds b on entry.
///   x_i = (b_i - sum_{j<i} L_ij x_j) / L_ii
/// The chain from x_{i-1} to x_i is one FMA and one multiply: the sum takes x_{i-1} last,
/// and 1/L_ii, which does not depend on x, is computed off the chain (a division on it took
/// longer than the rest of the step).
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void solve_lower(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L, acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t i = 0; i < k; ++i) {
    acc_t inv_diag[W];
    for (int l = 0; l < W; ++l) inv_diag[l] = acc_t(1) / static_cast<acc_t>(L[(i * k + i) * W + l]);
    acc_t s[W];
    for (int l = 0; l < W; ++l) s[l] = x[i * W + l];
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t j = 0; j < i; ++j) {
      const mat_t* Lij = L + (i * k + j) * W;
      const acc_t* xj = x + j * W;
      for (int l = 0; l < W; ++l) s[l] -= static_cast<acc_t>(Lij[l]) * xj[l];
    }
    for (int l = 0; l < W; ++l) x[i * W + l] = s[l] * inv_diag[l];
  }
}

/// y += L x for each lane (L lower-triangular): y_i += sum_{j<=i} L_ij x_j.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void add_lower_times(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L,
                                                       const acc_t* FUSEDGAUSS_RESTRICT x, acc_t* FUSEDGAUSS_RESTRICT y) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t i = 0; i < k; ++i) {
    acc_t s[W];
    for (int l = 0; l < W; ++l) s[l] = y[i * W + l];
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t j = 0; j <= i; ++j) {
      const mat_t* Lij = L + (i * k + j) * W;
      for (int l = 0; l < W; ++l) s[l] += static_cast<acc_t>(Lij[l]) * x[j * W + l];
    }
    for (int l = 0; l < W; ++l) y[i * W + l] = s[l];
  }
}

/// x = M x in place for each lane, M lower-triangular: x_i = sum_{j<=i} M_ij x_j, from the last
/// row up, so that each row reads entries not yet overwritten. With M = L^{-1} it does what
/// solve_lower does without its chain: each row's sum depends on the inputs alone, so the
/// rows run side by side.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lower_times_in_place(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT M,
                                                            acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t i = k - 1; i >= 0; --i) {
    acc_t s[W] = {};
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t j = 0; j <= i; ++j) {
      const mat_t* Mij = M + (i * k + j) * W;
      for (int l = 0; l < W; ++l) s[l] += static_cast<acc_t>(Mij[l]) * x[j * W + l];
    }
    for (int l = 0; l < W; ++l) x[i * W + l] = s[l];
  }
}

/// x = M^T x in place for each lane, M lower-triangular: x_j = sum_{i>=j} M_ij x_i, from the
/// first row down, so that each row reads entries not yet overwritten. With M = L^{-1},
/// solve_lower_transposed without its chain.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lower_transposed_times_in_place(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT M,
                                                                       acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t j = 0; j < k; ++j) {
    acc_t s[W] = {};
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t i = j; i < k; ++i) {
      const mat_t* Mij = M + (i * k + j) * W;
      for (int l = 0; l < W; ++l) s[l] += static_cast<acc_t>(Mij[l]) * x[i * W + l];
    }
    for (int l = 0; l < W; ++l) x[j * W + l] = s[l];
  }
}

/// solve_lower by columns: x_j = x_j / L_jj, then x_i -= L_ij x_j for every i > j. The same
/// operations in the same order as solve_lower (each x_i takes x_0, x_1, ... in turn), so the
/// same bits where the compiler contracts both into FMAs alike (it did for the CPU log-probs
/// of k = 2..8: identical outputs and gradients either way; with -march=native,
/// tests/cpp/test_math.cpp's build does not); but the updates of one column are independent,
/// where solve_lower's row sums are chains of dependent multiply-adds as long as the row.
/// Which order is faster depends on the caller (BlockFactors::solve, csrc/cpu/mvn_cpu.cpp).
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void solve_lower_by_columns(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L,
                                                              acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t j = 0; j < k; ++j) {
    acc_t xj[W];
    for (int l = 0; l < W; ++l) xj[l] = x[j * W + l] * (acc_t(1) / static_cast<acc_t>(L[(j * k + j) * W + l]));
    for (int l = 0; l < W; ++l) x[j * W + l] = xj[l];
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t i = j + 1; i < k; ++i) {
      const mat_t* Lij = L + (i * k + j) * W;
      for (int l = 0; l < W; ++l) x[i * W + l] -= static_cast<acc_t>(Lij[l]) * xj[l];
    }
  }
}

/// solve_lower_transposed by columns of L^T (rows of L): x_j = x_j / L_jj, then
/// x_i -= L_ji x_j for every i < j, from the last j up; the same bits as
/// solve_lower_transposed, without its chains (see solve_lower_by_columns).
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void solve_lower_transposed_by_columns(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L,
                                                                         acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t j = k - 1; j >= 0; --j) {
    acc_t xj[W];
    for (int l = 0; l < W; ++l) xj[l] = x[j * W + l] * (acc_t(1) / static_cast<acc_t>(L[(j * k + j) * W + l]));
    for (int l = 0; l < W; ++l) x[j * W + l] = xj[l];
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t i = 0; i < j; ++i) {
      const mat_t* Lji = L + (j * k + i) * W;
      for (int l = 0; l < W; ++l) x[i * W + l] -= static_cast<acc_t>(Lji[l]) * xj[l];
    }
  }
}

/// Solves L^T x = b in place for each lane (back substitution); `x` holds b on entry.
///   x_i = (b_i - sum_{j>i} L_ji x_j) / L_ii
/// Walks a column of L, which in the lane-minor layout costs no more than a row, so that the
/// sum stays in registers. As in solve_lower, the newest unknown (x_{i+1}) enters the sum last
/// and 1/L_ii is computed off the chain.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void solve_lower_transposed(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L,
                                                   acc_t* FUSEDGAUSS_RESTRICT x) {
  FUSEDGAUSS_UNROLL_ROWS
  for (int64_t i = k - 1; i >= 0; --i) {
    acc_t inv_diag[W];
    for (int l = 0; l < W; ++l) inv_diag[l] = acc_t(1) / static_cast<acc_t>(L[(i * k + i) * W + l]);
    acc_t s[W];
    for (int l = 0; l < W; ++l) s[l] = x[i * W + l];
    FUSEDGAUSS_UNROLL_ROWS
    for (int64_t j = k - 1; j > i; --j) {
      const mat_t* Lji = L + (j * k + i) * W;
      const acc_t* xj = x + j * W;
      for (int l = 0; l < W; ++l) s[l] -= static_cast<acc_t>(Lji[l]) * xj[l];
    }
    for (int l = 0; l < W; ++l) x[i * W + l] = s[l] * inv_diag[l];
  }
}

/// The factor x of a sum of logs taken as the log of a product (sum_log_diagonal, and the CPU
/// diagonal kernels' sums of log scale): x = m 2^e with m in [1, 2) (split_exponent, exact), e
/// added to `exponent` and m returned, to be multiplied into the product's mantissa. A
/// non-positive x gives NaN, as its log would, and NaN or +inf stay themselves.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t log_product_factor(acc_t x, int32_t& exponent) {
  int32_t e = 0;
  const acc_t m = split_exponent(x > acc_t(0) ? x : std::numeric_limits<acc_t>::quiet_NaN(), e);
  exponent += e;
  return m;
}

/// The factors a product of mantissas in [1, 2) takes before it is renormalised
/// (mantissa = log_product_factor(mantissa, exponent)), so that it stays below 2^32 and never
/// overflows or underflows whatever k and the scale of the factors.
constexpr int64_t kLogProductRun = 32;

/// log(mantissa 2^exponent): the sum of the logs whose factors made them.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t log_of_product(acc_t mantissa, int32_t exponent) {
  return log_(mantissa) + static_cast<acc_t>(exponent) * static_cast<acc_t>(kLog2);
}

/// out[l] = sum_i log L_ii for each lane. A non-positive diagonal entry makes its lane NaN,
/// as its log would.
///
/// One log per lane instead of k (the logs were most of a small-k forward's arithmetic): the
/// diagonal's mantissas are multiplied and its exponents added (log_product_factor),
///   sum_i log L_ii = log(prod_i m_i) + (sum_i e_i) log 2,   L_ii = m_i 2^{e_i}, m_i in [1, 2),
/// with the product renormalised every kLogProductRun factors.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sum_log_diagonal(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L, acc_t* FUSEDGAUSS_RESTRICT out) {
  acc_t mantissa[W];
  int32_t exponent[W];
  for (int l = 0; l < W; ++l) {
    mantissa[l] = 1;
    exponent[l] = 0;
  }
  for (int64_t i = 0; i < k; ++i) {
    const mat_t* Lii = L + (i * k + i) * W;
    for (int l = 0; l < W; ++l) mantissa[l] *= log_product_factor(static_cast<acc_t>(Lii[l]), exponent[l]);
    if (i % kLogProductRun == kLogProductRun - 1) {
      for (int l = 0; l < W; ++l) mantissa[l] = log_product_factor(mantissa[l], exponent[l]);
    }
  }
  for (int l = 0; l < W; ++l) out[l] = log_of_product(mantissa[l], exponent[l]);
}

/// log N(x; mu, L L^T) = -1/2 ||z||^2 - sum_i log L_ii - (k/2) log(2 pi),
/// given the squared Mahalanobis norm ||z||^2 = ||L^{-1}(x - mu)||^2.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t gaussian_log_prob(int64_t k, acc_t squared_norm, acc_t sum_log_diag) {
  return acc_t(-0.5) * squared_norm - sum_log_diag -
         acc_t(0.5) * static_cast<acc_t>(k) * static_cast<acc_t>(kLog2Pi);
}

/// out[l] = ||z||^2 for each lane.
template <int W, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void squared_norms(int64_t k, const acc_t* FUSEDGAUSS_RESTRICT z,
                                                     acc_t* FUSEDGAUSS_RESTRICT out) {
  for (int l = 0; l < W; ++l) out[l] = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int l = 0; l < W; ++l) out[l] += z[i * W + l] * z[i * W + l];
  }
}

/// z = L^{-1} d in place (`z` holds d = value - loc on entry); squared_norm[l] = ||z||^2.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void whiten(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L, acc_t* FUSEDGAUSS_RESTRICT z,
                                    acc_t* FUSEDGAUSS_RESTRICT squared_norm) {
  solve_lower<W>(k, L, z);
  squared_norms<W>(k, z, squared_norm);
}

/// Cholesky factor of the symmetric matrix whose lower triangle is in `A`, in place, for each
/// lane (Cholesky-Banachiewicz, row by row):
///   L_ij = (A_ij - sum_{m<j} L_im L_jm) / L_jj,   L_ii = sqrt(A_ii - sum_{m<i} L_im^2).
/// Only the lower triangle is read or written. ok[l] becomes false when a pivot of lane l is
/// not positive (A is not positive-definite, or NaN); that lane then holds NaN.
template <int W, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cholesky_in_place(int64_t k, acc_t* A, bool* ok) {
  for (int l = 0; l < W; ++l) ok[l] = true;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t s[W];
      for (int l = 0; l < W; ++l) s[l] = A[(i * k + j) * W + l];
      for (int64_t m = 0; m < j; ++m) {
        const acc_t* Aim = A + (i * k + m) * W;
        const acc_t* Ajm = A + (j * k + m) * W;
        for (int l = 0; l < W; ++l) s[l] -= Aim[l] * Ajm[l];
      }
      if (j < i) {
        // As in solve_lower: the division leaves the chain along row i.
        acc_t inv_diag[W];
        for (int l = 0; l < W; ++l) inv_diag[l] = acc_t(1) / A[(j * k + j) * W + l];
        for (int l = 0; l < W; ++l) A[(i * k + j) * W + l] = s[l] * inv_diag[l];
      } else {
        // Separate loops and no short-circuit &&: the lanes' square roots then run side by
        // side instead of as a chain of branches. With the select inside the square-root
        // loop, GCC 12 took each lane's square root on its own (vsqrtss, 16 per pivot).
        acc_t pivot[W];
        for (int l = 0; l < W; ++l) pivot[l] = s[l] > acc_t(0) ? s[l] : std::numeric_limits<acc_t>::quiet_NaN();
        for (int l = 0; l < W; ++l) A[(i * k + i) * W + l] = sqrt_(pivot[l]);
        for (int l = 0; l < W; ++l) ok[l] = ok[l] & (s[l] > acc_t(0));
      }
    }
  }
}

/// Lower triangles of L^{-1} and of Sigma^{-1} = L^{-T} L^{-1}, for each lane:
///   (L^{-1})_ii = 1/L_ii,  (L^{-1})_ij = -(sum_{j<=m<i} L_im (L^{-1})_mj) / L_ii,
///   (Sigma^{-1})_ij = sum_{m >= i} (L^{-1})_mi (L^{-1})_mj   for i >= j.
template <int W, typename acc_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void inverse_from_cholesky(int64_t k, const mat_t* FUSEDGAUSS_RESTRICT L,
                                                  acc_t* FUSEDGAUSS_RESTRICT L_inv, acc_t* FUSEDGAUSS_RESTRICT sigma_inv) {
  for (int64_t i = 0; i < k; ++i) {
    acc_t inv_diag[W];
    for (int l = 0; l < W; ++l) inv_diag[l] = acc_t(1) / static_cast<acc_t>(L[(i * k + i) * W + l]);
    for (int64_t j = 0; j < i; ++j) {
      acc_t s[W] = {};
      for (int64_t m = j; m < i; ++m) {
        const mat_t* Lim = L + (i * k + m) * W;
        const acc_t* Xmj = L_inv + (m * k + j) * W;
        for (int l = 0; l < W; ++l) s[l] += static_cast<acc_t>(Lim[l]) * Xmj[l];
      }
      for (int l = 0; l < W; ++l) L_inv[(i * k + j) * W + l] = -s[l] * inv_diag[l];
    }
    for (int l = 0; l < W; ++l) L_inv[(i * k + i) * W + l] = inv_diag[l];
  }
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t s[W] = {};
      for (int64_t m = i; m < k; ++m) {
        const acc_t* Xmi = L_inv + (m * k + i) * W;
        const acc_t* Xmj = L_inv + (m * k + j) * W;
        for (int l = 0; l < W; ++l) s[l] += Xmi[l] * Xmj[l];
      }
      for (int l = 0; l < W; ++l) sigma_inv[(i * k + j) * W + l] = s[l];
    }
  }
}

/// Gradient of a loss through A = L L^T -> L, for each lane (the convention of
/// torch.linalg.cholesky's backward, so the result is symmetric):
///   P  = Phi(L^T G) made symmetric, Phi = the lower triangle with its diagonal halved,
///   dA = L^{-T} P L^{-1}.
/// `grad_L` is read through its lower triangle only. `work` (k*k*W) receives dA, full and
/// exactly symmetric.
template <int W, typename acc_t, typename grad_t, typename mat_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void cholesky_backward(int64_t k, const grad_t* FUSEDGAUSS_RESTRICT grad_L,
                                              const mat_t* FUSEDGAUSS_RESTRICT L, acc_t* FUSEDGAUSS_RESTRICT work) {
  // (L^T G)_ij = sum_{m >= i} L_mi G_mj for i >= j (both factors are lower).
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      acc_t s[W] = {};
      for (int64_t m = i; m < k; ++m) {
        const mat_t* Lmi = L + (m * k + i) * W;
        const grad_t* Gmj = grad_L + (m * k + j) * W;
        for (int l = 0; l < W; ++l) s[l] += static_cast<acc_t>(Lmi[l]) * static_cast<acc_t>(Gmj[l]);
      }
      // P_ij = P_ji = M_ij / 2 below the diagonal, P_ii = M_ii / 2 on it.
      for (int l = 0; l < W; ++l) {
        work[(i * k + j) * W + l] = acc_t(0.5) * s[l];
        work[(j * k + i) * W + l] = acc_t(0.5) * s[l];
      }
    }
  }
  // Row r of P L^{-1} = (L^{-T} P_r)^T, since P is symmetric: solve L^T x = P_r per row.
  for (int64_t r = 0; r < k; ++r) solve_lower_transposed<W>(k, L, work + r * k * W);
  // Transposed, the columns of P L^{-1} become rows; L^{-T} applied to each gives the rows of
  // L^{-T} P L^{-1}.
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      for (int l = 0; l < W; ++l) {
        const acc_t t = work[(i * k + j) * W + l];
        work[(i * k + j) * W + l] = work[(j * k + i) * W + l];
        work[(j * k + i) * W + l] = t;
      }
    }
  }
  for (int64_t r = 0; r < k; ++r) solve_lower_transposed<W>(k, L, work + r * k * W);
  // Symmetrise exactly, so the gradient carries no rounding asymmetry.
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      for (int l = 0; l < W; ++l) {
        const acc_t mean = acc_t(0.5) * (work[(i * k + j) * W + l] + work[(j * k + i) * W + l]);
        work[(i * k + j) * W + l] = mean;
        work[(j * k + i) * W + l] = mean;
      }
    }
  }
}

}  // namespace math
}  // namespace fusedgauss
