#pragma once
// Elementwise math of the diagonal and tanh-squashed Gaussian ops, written once for every
// device: the CPU kernels call it in loops over contiguous elements (which the compiler turns
// into SIMD code), a CUDA thread calls it for each entry of its sample.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "gaussian_math.h"

namespace fusedgauss {
namespace math {

/// log(1 + x) for x > -1, accurate for small |x| (Goldberg's correction: with u = 1 + x
/// rounded, log(u) * x / (u - 1) cancels the rounding of u).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T log1p_(T x) {
  const T u = T(1) + x;
  const T d = u - T(1);
  const T corrected = log_(u) * (x / d);
  return d == T(0) ? x : corrected;
}

/// log(1 + x) for x in [-1/3, 1] (tanh_terms' argument, and softplus's log1p(e^{-|x|})), with
/// no log: with s = x / (2 + x), |s| <= 1/3, log(1 + x) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...);
/// through s^12 the series is off by at most (1/9)^7 / 15 = 1.4e-8 relative (at x = 1; 2e-10 for
/// |x| <= 1/3), below float's rounding. Measured against float64: at most 1.9 float ulps on
/// (0, 1]. double keeps log1p_.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T log1p_series(T x) {
  if constexpr (!std::is_same<T, float>::value) {
    return log1p_(x);
  } else {
    const float s = x / (2.f + x);
    const float z = s * s;
    float p = 1.f / 13.f;
    p = p * z + 1.f / 11.f;
    p = p * z + 1.f / 9.f;
    p = p * z + 1.f / 7.f;
    p = p * z + 1.f / 5.f;
    p = p * z + 1.f / 3.f;
    return 2.f * s + 2.f * s * z * p;
  }
}

/// Everything the ops need of y = tanh(u), computed stably for every u:
///   tanh            tanh(u)
///   log_det         log|dy/du| = log(1 - tanh(u)^2) = 2 (log 2 - |u| - log1p(e^{-2|u|}))
///   derivative      dy/du = 1 - tanh(u)^2 = 4 e^{-2|u|} / (1 + e^{-2|u|})^2
/// For |u| < 0.625 the closed forms in e^{-2|u|} cancel, so tanh comes from Cephes' odd
/// polynomial and log_det = log1p(-tanh^2); beyond, tanh(|u|) = (1 - t) / (1 + t) with
/// t = e^{-2|u|}. log_det and derivative stay finite and exact in the tails where tanh rounds
/// to +-1 (|u| > 9 in float32).
///
/// For a sum of log_det over a sample's entries taken as the log of a product (one log per
/// sample instead of a log1p per entry), log_det also comes as
///   log_det = log_det_linear + log(log_det_factor),   log_det_factor in [0.6, 1]:
///   1 - tanh(u)^2 and 0 for |u| < 0.625; beyond, (1 + t)^{-2} and 2 (log 2 - |u|).
/// The factor never under- or overflows (1 - tanh(u)^2 itself underflows for |u| > 44); its
/// rounding costs the log about an ulp of 1 in absolute terms, where log_det itself is
/// accurate relative to its own size (-u^2 for small u), so the split serves sums only.
template <typename T>
struct TanhTerms {
  T tanh;
  T log_det;
  T derivative;
  T log_det_factor;
  T log_det_linear;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE TanhTerms<T> tanh_terms(T u) {
  const T a = u < T(0) ? -u : u;
  const T t = exp_nonpositive(T(-2) * a);
  const T z = a * a;
  T p = T(-5.70498872745e-3);
  p = p * z + T(2.06390887954e-2);
  p = p * z - T(5.37397155531e-2);
  p = p * z + T(1.33314422036e-1);
  p = p * z - T(3.33332819422e-1);
  const bool small = a < T(0.625);
  // The polynomial is Cephes' float one; double's small branch uses libm's tanh.
  const T tanh_small = std::is_same<T, float>::value ? a + a * z * p : T(::tanh(static_cast<double>(a)));
  // Both branches are computed and one is selected, so that loops over elements vectorise;
  // the costly steps (a division, a log1p) are taken once, on the selected branch's operand,
  // which lies in [-0.31, 0.29] (log1p_series).
  const T reciprocal = T(1) / (T(1) + t);
  const T tanh_large = (T(1) - t) * reciprocal;
  const T tanh_abs = small ? tanh_small : tanh_large;
  const T one_minus_tanh_squared = T(1) - tanh_abs * tanh_abs;
  const T log1p_value = log1p_series(small ? -tanh_abs * tanh_abs : t);
  const T log_det = small ? log1p_value : T(2) * (T(kLog2) - a - log1p_value);
  const T derivative = small ? one_minus_tanh_squared : T(4) * t * reciprocal * reciprocal;
  const T log_det_factor = small ? one_minus_tanh_squared : reciprocal * reciprocal;
  const T log_det_linear = small ? T(0) : T(2) * (T(kLog2) - a);
  return {u < T(0) ? -tanh_abs : tanh_abs, log_det, derivative, log_det_factor, log_det_linear};
}

/// Per lane, the sum over a sample's entries of log|d tanh(u)/du| (TanhTerms::log_det), taken
/// as the sum of the linear parts plus the log of the product of the factors: one log per
/// lane instead of a log1p per entry, as sum_log_diagonal takes a factor's diagonal. Add each
/// entry's terms to its lane, call end_entry(i) after entry i of every lane (the products are
/// renormalised every kLogProductRun factors), then finish.
template <int W, typename T>
struct TanhLogDetSums {
  T linear[W];
  T product[W];
  int32_t exponent[W];

  C10_HOST_DEVICE C10_ALWAYS_INLINE TanhLogDetSums() {
    for (int l = 0; l < W; ++l) {
      linear[l] = 0;
      product[l] = 1;
      exponent[l] = 0;
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void add(int l, const TanhTerms<T>& tt) {
    linear[l] += tt.log_det_linear;
    product[l] *= tt.log_det_factor;
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void end_entry(int64_t i) {
    if (i % kLogProductRun != kLogProductRun - 1) return;
    for (int l = 0; l < W; ++l) product[l] = log_product_factor(product[l], exponent[l]);
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void finish(T* FUSEDGAUSS_RESTRICT out) const {
    for (int l = 0; l < W; ++l) out[l] = linear[l] + log_of_product(product[l], exponent[l]);
  }
};

/// The clamp of an action before its atanh: the epsilon of the action's own dtype (scalar_t,
/// which may be half), in the type the math runs in.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE acc_t action_epsilon() {
  return static_cast<acc_t>(std::numeric_limits<scalar_t>::epsilon());
}

/// The pre-tanh value of an action y in [-1, 1]: atanh(clamp(y, -1 + eps, 1 - eps)) =
/// 1/2 log1p(2y / (1 - y)), with eps the epsilon of the action's own dtype, so that an action
/// that rounded to +-1 maps to a large finite u. NaN stays NaN.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T atanh_clamped(T y, T eps) {
  const T bound = T(1) - eps;
  const T c = y > bound ? bound : y < -bound ? -bound : y;
  return T(0.5) * log1p_(T(2) * c / (T(1) - c));
}

/// d atanh_clamped(y) / dy: 1 / (1 - y^2) inside the clamp, 0 where it clamps (as the gradient
/// of torch.clamp).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T atanh_clamped_derivative(T y, T eps) {
  const T bound = T(1) - eps;
  const bool inside = y >= -bound && y <= bound;
  return inside ? T(1) / ((T(1) - y) * (T(1) + y)) : T(0);
}

/// Where the pre-tanh value u of a squashed log-prob comes from: there is no squash (a plain
/// Gaussian), u is given, or u = atanh_clamped(action).
enum class Squash { kNone, kFromPreTanh, kFromAction };

/// One event entry of a diagonal Gaussian log-prob, without the -1/2 log(2 pi) constant and
/// without -log s, which the caller sums per sample (a shared scale's once; a per-sample one's
/// as the log of a product, log_product_factor): with u the pre-tanh value of x (x itself when
/// unsquashed) and z = (u - m) / s,
///   -1/2 z^2  [- log(1 - tanh(u)^2) when squashed].
template <Squash kSquash, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T diag_log_prob_entry(T x, T m, T s, T eps) {
  const T u = kSquash == Squash::kFromAction ? atanh_clamped(x, eps) : x;
  const T z = (u - m) / s;
  const T term = T(-0.5) * z * z;
  return kSquash == Squash::kNone ? term : term - tanh_terms(u).log_det;
}

template <typename T>
struct LogProbEntryGradients {
  T value;
  T loc;
  T scale;
};

/// d/dx, d/dm, d/ds of diag_log_prob_entry:
///   d/dm = z / s,  d/ds = (z^2 - 1) / s,  d/du = -z / s [+ 2 tanh(u)],
///   d/dx = d/du [* d atanh_clamped(x) / dx when u comes from the action].
template <Squash kSquash, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE LogProbEntryGradients<T> diag_log_prob_entry_gradients(T x, T m, T s, T eps) {
  const T u = kSquash == Squash::kFromAction ? atanh_clamped(x, eps) : x;
  const T inv_s = T(1) / s;
  const T z = (u - m) * inv_s;
  const T d_loc = z * inv_s;
  const T d_u = kSquash == Squash::kNone ? -d_loc : -d_loc + T(2) * tanh_terms(u).tanh;
  const T d_value = kSquash == Squash::kFromAction ? d_u * atanh_clamped_derivative(x, eps) : d_u;
  return {d_value, d_loc, (z * z - T(1)) * inv_s};
}

/// The total derivative of a squashed sample's outputs with respect to its pre-tanh value u,
/// given the upstream gradients of the action tanh(u), of u itself and of the log-prob (whose
/// u-dependent part is -log(1 - tanh(u)^2)):
///   g_action (1 - tanh(u)^2) + g_pre_tanh + g_log_prob 2 tanh(u).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T pre_tanh_gradient(const TanhTerms<T>& tt, T grad_action, T grad_pre_tanh,
                                                      T grad_log_prob) {
  return grad_action * tt.derivative + grad_pre_tanh + grad_log_prob * T(2) * tt.tanh;
}

/// One entry of a reparameterised squashed diagonal sample from noise e:
/// u = m + s e, action = tanh(u), and the log-prob term -1/2 e^2 - log(1 - tanh(u)^2) (since
/// (u - m) / s = e exactly, no division and no atanh), without -log s, as diag_log_prob_entry.
/// For a per-sample sum of logs taken as the log of a product (TanhTerms), the term also comes
/// as log_prob_linear - log(log_det_factor).
template <typename T>
struct RsampleEntry {
  T action;
  T pre_tanh;
  T log_prob;
  T log_prob_linear;
  T log_det_factor;
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE RsampleEntry<T> diag_rsample_entry(T m, T s, T e) {
  const T u = m + s * e;
  const TanhTerms<T> tt = tanh_terms(u);
  const T gaussian = T(-0.5) * e * e;
  return {tt.tanh, u, gaussian - tt.log_det, gaussian - tt.log_det_linear, tt.log_det_factor};
}

template <typename T>
struct RsampleEntryGradients {
  T loc;
  T scale;
  T eps;
};

/// d/dm, d/ds, d/de of diag_rsample_entry's outputs, with g_u = pre_tanh_gradient:
///   d/dm = g_u,  d/ds = g_u e - g_log_prob / s,  d/de = g_u s - g_log_prob e.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE RsampleEntryGradients<T> diag_rsample_entry_gradients(T grad_action, T grad_pre_tanh,
                                                                                 T grad_log_prob, T m, T s, T e) {
  const T g_u = pre_tanh_gradient(tanh_terms(m + s * e), grad_action, grad_pre_tanh, grad_log_prob);
  return {g_u, g_u * e - grad_log_prob / s, g_u * s - grad_log_prob * e};
}

}  // namespace math
}  // namespace fusedgauss
