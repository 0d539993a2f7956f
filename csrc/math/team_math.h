#pragma once
// Per-sample math of one sample spread over a team of lanes: the CUDA kernels' path for
// event sizes whose factor does not fit one thread's registers (a warp per sample,
// csrc/cuda/warp.cuh). gaussian_math.h holds the same math for one lane per sample; the two
// agree to rounding (tests/cpp/test_team_math.cpp runs this file with a team of threads).
//
// A Team type provides
//   static constexpr int kSize;                        the number of lanes
//   int lane() const;                                  this lane, in [0, kSize)
//   void sync() const;                                 a barrier: every lane's writes to the
//                                                      team's memory are visible after it
//   template <typename T> T broadcast(T v, int src) const;   lane src's v, in every lane
//   template <typename T> T sum(T v) const;            the sum of v over the lanes, the same
//                                                      bits in every lane
// and every lane of a team makes the same sequence of these calls.
//
// Layouts. A k x k matrix lies in memory every lane reads (CUDA shared memory), row-major
// with row stride `ld` >= k; an odd ld puts the k entries of a column in distinct banks. A
// k-vector is distributed: entry i is slot i / kSize of lane i % kSize's array x[kSlots]
// (kSlots * kSize >= k). Slots past k are never read into a result.

#include <c10/macros/Macros.h>

#include <cstdint>
#include <limits>

#include "elementary_math.h"

namespace fusedgauss {
namespace math {

/// Entry `s` of a lane's slots. The loop has a compile-time trip count and unrolls, so the
/// array stays in registers where an index known only at run time would put it in memory.
template <int kSlots, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t slot(const acc_t (&x)[kSlots], int64_t s) {
  acc_t value = 0;
  for (int t = 0; t < kSlots; ++t) {
    if (t == s) value = x[t];
  }
  return value;
}

template <int kSlots, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void set_slot(acc_t (&x)[kSlots], int64_t s, acc_t value) {
  for (int t = 0; t < kSlots; ++t) {
    if (t == s) x[t] = value;
  }
}

/// The vector index of this lane's slot t.
template <class Team>
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t entry_index(const Team& team, int t) {
  return team.lane() + static_cast<int64_t>(t) * Team::kSize;
}

/// Entry i of a distributed vector, in every lane.
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t team_entry(const Team& team, const acc_t (&x)[kSlots], int64_t i) {
  return team.broadcast(slot(x, i / Team::kSize), static_cast<int>(i % Team::kSize));
}

/// Solves L x = b in place (`x` holds b on entry), column by column: once x_j = b_j / L_jj
/// is known, every lane removes L_ij x_j from its entries i > j.
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE void team_solve_lower(const Team& team, int64_t k, const acc_t* L, int64_t ld, acc_t (&x)[kSlots]) {
  for (int64_t j = 0; j < k; ++j) {
    const int owner = static_cast<int>(j % Team::kSize);
    // Only the owner's quotient is taken; the other lanes' is never used.
    const acc_t xj = team.broadcast(slot(x, j / Team::kSize) / L[j * ld + j], owner);
    if (team.lane() == owner) set_slot(x, j / Team::kSize, xj);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = entry_index(team, t);
      if (i > j && i < k) x[t] -= L[i * ld + j] * xj;
    }
  }
}

/// Solves L^T x = b in place (`x` holds b on entry), from the last entry up: once
/// x_i = b_i / L_ii is known, every lane removes L_ij x_i from its entries j < i (row i of L,
/// read across the lanes).
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE void team_solve_lower_transposed(const Team& team, int64_t k, const acc_t* L, int64_t ld,
                                                 acc_t (&x)[kSlots]) {
  for (int64_t i = k - 1; i >= 0; --i) {
    const int owner = static_cast<int>(i % Team::kSize);
    const acc_t xi = team.broadcast(slot(x, i / Team::kSize) / L[i * ld + i], owner);
    if (team.lane() == owner) set_slot(x, i / Team::kSize, xi);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t j = entry_index(team, t);
      if (j < i) x[t] -= L[i * ld + j] * xi;
    }
  }
}

/// y += L x (L lower-triangular): y_i += sum_{j <= i} L_ij x_j, each x_j broadcast in turn.
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE void team_add_lower_times(const Team& team, int64_t k, const acc_t* L, int64_t ld,
                                          const acc_t (&x)[kSlots], acc_t (&y)[kSlots]) {
  for (int64_t j = 0; j < k; ++j) {
    const acc_t xj = team_entry(team, x, j);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = entry_index(team, t);
      if (i >= j && i < k) y[t] += L[i * ld + j] * xj;
    }
  }
}

/// y = L^T x (L lower-triangular): y_j = sum_{i >= j} L_ij x_i, each x_i broadcast in turn
/// (row i of L across the lanes); y is zero past k.
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE void team_lower_transposed_times(const Team& team, int64_t k, const acc_t* L, int64_t ld,
                                                 const acc_t (&x)[kSlots], acc_t (&y)[kSlots]) {
  for (int t = 0; t < kSlots; ++t) y[t] = 0;
  for (int64_t i = 0; i < k; ++i) {
    const acc_t xi = team_entry(team, x, i);
    for (int t = 0; t < kSlots; ++t) {
      if (entry_index(team, t) <= i) y[t] += L[i * ld + entry_index(team, t)] * xi;
    }
  }
}

/// sum_i x_i y_i over the first k entries of two distributed vectors, in every lane.
template <class Team, int kSlots, typename acc_t>
C10_HOST_DEVICE acc_t team_dot(const Team& team, int64_t k, const acc_t (&x)[kSlots], const acc_t (&y)[kSlots]) {
  acc_t s = 0;
  for (int t = 0; t < kSlots; ++t) {
    if (entry_index(team, t) < k) s += x[t] * y[t];
  }
  return team.sum(s);
}

/// sum_i log L_ii, in every lane; a non-positive diagonal entry makes it NaN, as its log
/// would.
template <class Team, typename acc_t>
C10_HOST_DEVICE acc_t team_sum_log_diagonal(const Team& team, int64_t k, const acc_t* L, int64_t ld) {
  acc_t s = 0;
  for (int64_t i = team.lane(); i < k; i += Team::kSize) {
    const acc_t d = L[i * ld + i];
    s += log_(d > acc_t(0) ? d : std::numeric_limits<acc_t>::quiet_NaN());
  }
  return team.sum(s);
}

/// Cholesky factor of the symmetric matrix whose lower triangle is in `A`, in place
/// (right-looking, column by column):
///   L_jj = sqrt(A_jj),   L_ij = A_ij / L_jj (i > j),   A_im -= L_ij L_mj (j < m <= i),
/// the trailing update by rows, a row per lane. Only the lower triangle is read or written.
/// Returns, in every lane, whether every pivot was positive; after a failed pivot the factor
/// holds NaN, as cholesky_in_place's lane does.
template <class Team, typename acc_t>
C10_HOST_DEVICE bool team_cholesky_in_place(const Team& team, int64_t k, acc_t* A, int64_t ld) {
  bool ok = true;
  for (int64_t j = 0; j < k; ++j) {
    team.sync();  // the staged matrix, then the last column's updates
    const acc_t pivot = A[j * ld + j];
    ok = ok & (pivot > acc_t(0));
    const acc_t L_jj = sqrt_(pivot > acc_t(0) ? pivot : std::numeric_limits<acc_t>::quiet_NaN());
    team.sync();  // every lane has read the pivot before it is overwritten
    for (int64_t i = j + team.lane(); i < k; i += Team::kSize) {
      A[i * ld + j] = i == j ? L_jj : A[i * ld + j] / L_jj;
    }
    team.sync();
    for (int64_t i = j + 1 + team.lane(); i < k; i += Team::kSize) {
      const acc_t L_ij = A[i * ld + j];
      for (int64_t m = j + 1; m <= i; ++m) A[i * ld + m] -= L_ij * A[m * ld + j];
    }
  }
  team.sync();
  return ok;
}

/// X = L^{-1} (lower triangle; the entries above the diagonal are not written), a column per
/// lane:
///   X_jj = 1 / L_jj,   X_ij = -(sum_{j<=m<i} L_im X_mj) / L_ii  (i > j).
template <class Team, typename acc_t>
C10_HOST_DEVICE void team_invert_lower(const Team& team, int64_t k, const acc_t* L, int64_t ld, acc_t* X,
                                       int64_t ldx) {
  for (int64_t j = team.lane(); j < k; j += Team::kSize) {
    X[j * ldx + j] = acc_t(1) / L[j * ld + j];
    for (int64_t i = j + 1; i < k; ++i) {
      acc_t s = 0;
      for (int64_t m = j; m < i; ++m) s += L[i * ld + m] * X[m * ldx + j];
      X[i * ldx + j] = -s / L[i * ld + i];
    }
  }
  team.sync();
}

/// Entry (i, j) of Sigma^{-1} = L^{-T} L^{-1} from X = L^{-1} (team_invert_lower):
///   (Sigma^{-1})_ij = sum_{m >= max(i, j)} X_mi X_mj.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t inverse_product_entry(int64_t k, const acc_t* X, int64_t ldx, int64_t i,
                                                              int64_t j) {
  acc_t s = 0;
  for (int64_t m = i > j ? i : j; m < k; ++m) s += X[m * ldx + i] * X[m * ldx + j];
  return s;
}

/// Gradient of a loss through A = L L^T -> L, cholesky_backward's (gaussian_math.h) formula
/// and convention:
///   P = Phi(L^T G) made symmetric,  dA = L^{-T} P L^{-1},  symmetrised exactly,
/// in place in `W` (row stride ld): the lower triangle of G on entry, dA (full) on return.
/// Each step gives a lane whole columns (rows, in the third), so lanes exchange nothing
/// between the syncs:
///   1. P_ij = P_ji = 1/2 sum_{m >= i} L_mi G_mj (i >= j), column j from its top row down:
///      P_ij replaces G_ij, which no lower row of the column needs, and P_ji goes above
///      the diagonal, where G has nothing;
///   2. Z = L^{-T} P, each column by back substitution in place;
///   3. dA = Z L^{-1}: row j of dA solves L^T x = (row j of Z)^T, in place.
template <class Team, typename acc_t>
C10_HOST_DEVICE void team_cholesky_backward(const Team& team, int64_t k, const acc_t* L, int64_t ld, acc_t* W) {
  team.sync();
  for (int64_t j = team.lane(); j < k; j += Team::kSize) {
    for (int64_t i = j; i < k; ++i) {
      acc_t s = 0;
      for (int64_t m = i; m < k; ++m) s += L[m * ld + i] * W[m * ld + j];
      W[i * ld + j] = acc_t(0.5) * s;
      W[j * ld + i] = acc_t(0.5) * s;
    }
  }
  team.sync();
  // Steps 2 and 3 are one back substitution, through the columns of W and then its rows:
  // entry i of right-hand side j is W[i * along + j * across].
  const auto solve_lower_transposed_in_place = [&](int64_t along, int64_t across) {
    for (int64_t j = team.lane(); j < k; j += Team::kSize) {
      acc_t* x = W + j * across;
      for (int64_t i = k - 1; i >= 0; --i) {
        acc_t s = x[i * along];
        for (int64_t m = i + 1; m < k; ++m) s -= L[m * ld + i] * x[m * along];
        x[i * along] = s / L[i * ld + i];
      }
    }
    team.sync();
  };
  solve_lower_transposed_in_place(ld, 1);
  solve_lower_transposed_in_place(1, ld);
  // The pair (i, j), i > j, belongs to column j's lane alone.
  for (int64_t j = team.lane(); j < k; j += Team::kSize) {
    for (int64_t i = j + 1; i < k; ++i) {
      const acc_t mean = acc_t(0.5) * (W[i * ld + j] + W[j * ld + i]);
      W[i * ld + j] = mean;
      W[j * ld + i] = mean;
    }
  }
  team.sync();
}

}  // namespace math
}  // namespace fusedgauss
