#pragma once
// The packed scale_tril of a policy head, written once for every device: a sample's
// n = k(k+1)/2 network outputs, row by row as torch.tril_indices(k, k) lists them, with a
// transform on the diagonal entries that keeps them positive.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "squash_math.h"

namespace fusedgauss {
namespace math {

/// What turns a packed diagonal entry x into L_ii (plus min_diag): softplus(x), exp(x) or x.
enum class DiagTransform : int { kNone = 0, kSoftplus = 1, kExp = 2 };

/// Entries of a packed lower triangle of size k.
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t packed_size(int64_t k) { return k * (k + 1) / 2; }

/// Position of entry (i, j), j <= i, in a packed lower triangle.
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t packed_index(int64_t i, int64_t j) { return i * (i + 1) / 2 + j; }

/// The row i of packed position p: packed_index(i, 0) <= p < packed_index(i + 1, 0). The
/// floating-point root is corrected by one step either way, which covers its rounding for
/// every p below 2^50.
C10_HOST_DEVICE C10_ALWAYS_INLINE int64_t packed_row(int64_t p) {
  int64_t i = static_cast<int64_t>((::sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) / 2.0);
  if (packed_index(i, 0) > p) --i;
  if (packed_index(i + 1, 0) <= p) ++i;
  return i;
}

template <typename T>
struct DiagEntry {
  T value;       // L_ii = transform(x) + min_diag
  T derivative;  // dL_ii / dx
};

/// The diagonal entry of a scale_tril from its packed value x:
///   softplus   L_ii = log(1 + e^x) + min_diag = max(x, 0) + log1p(e^{-|x|}) + min_diag,
///              dL_ii/dx = sigmoid(x)
///   exp        L_ii = e^x + min_diag, dL_ii/dx = e^x (which saturates near 1e38 in float)
///   none       L_ii = x + min_diag,   dL_ii/dx = 1
/// Within each case every select is branch-free, so that a loop over entries with one
/// transform vectorises once the compiler hoists the switch.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE DiagEntry<T> diag_entry(DiagTransform transform, T x, T min_diag) {
  switch (transform) {
    case DiagTransform::kSoftplus: {
      const T e = exp_nonpositive(x < T(0) ? x : -x);  // e^{-|x|}
      return {(x > T(0) ? x : T(0)) + log1p_series(e) + min_diag, (x >= T(0) ? T(1) : e) / (T(1) + e)};
    }
    case DiagTransform::kExp: {
      const T e = exp_nonpositive(x < T(0) ? x : -x);
      const T exp_x = x <= T(0) ? e : T(1) / e;
      return {exp_x + min_diag, exp_x};
    }
    default:
      return {x + min_diag, T(1)};
  }
}

/// log L_ii of a diagonal entry from its packed value x, and its derivative:
///   log_diag = log(transform(x) + min_diag),   d log_diag / dx = (dL_ii/dx) / L_ii.
/// Summed over i, the log-determinant of L (an entropy, a KL) with its gradient.
template <typename T>
struct LogDiagEntry {
  T log_diag;
  T derivative;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LogDiagEntry<T> log_diag_entry(DiagTransform transform, T x, T min_diag) {
  const DiagEntry<T> d = diag_entry(transform, x, min_diag);
  return {log_(d.value), d.derivative / d.value};
}

/// Runs fn(std::integral_constant<DiagTransform, t>) for the runtime transform t: inside fn
/// the transform is a constant, diag_entry's switch folds away, and a loop of diag_entry
/// calls vectorises.
template <typename F>
C10_ALWAYS_INLINE void with_diag_transform(DiagTransform t, const F& fn) {
  switch (t) {
    case DiagTransform::kSoftplus:
      return fn(std::integral_constant<DiagTransform, DiagTransform::kSoftplus>{});
    case DiagTransform::kExp:
      return fn(std::integral_constant<DiagTransform, DiagTransform::kExp>{});
    default:
      return fn(std::integral_constant<DiagTransform, DiagTransform::kNone>{});
  }
}

/// Entry (i, j) of a sample's scale_tril from its packed value x (0 above the diagonal).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T scale_tril_entry(int64_t i, int64_t j, T x, DiagTransform transform,
                                                     T min_diag) {
  if (j > i) return T(0);
  return i == j ? diag_entry(transform, x, min_diag).value : x;
}

/// d/dx of a packed entry at (i, j), j <= i, from the gradient g of scale_tril entry (i, j).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T packed_gradient_entry(int64_t i, int64_t j, T g, T x,
                                                          DiagTransform transform) {
  return i == j ? g * diag_entry(transform, x, T(0)).derivative : g;
}

}  // namespace math
}  // namespace fusedgauss
