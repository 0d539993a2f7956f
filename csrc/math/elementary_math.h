#pragma once
// Elementary functions for the per-sample math, written once for every device.
//
// The float versions of exp and log are written out here instead of calling libm: libm's
// scalar calls cannot be vectorised, and in the CPU kernels' lane loops (a log per diagonal
// entry of a factor, an exp and two logs per entry of a squashed sample) they would cost more
// than the rest of a kernel together. They are branch-free (every select becomes a blend) and
// accurate to a few ulp. Double uses libm, and CUDA its own intrinsics.

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedgauss {
namespace math {

C10_HOST_DEVICE inline float sqrt_(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_(double x) { return ::sqrt(x); }
C10_HOST_DEVICE inline double log_(double x) { return ::log(x); }

namespace detail {

C10_HOST_DEVICE C10_ALWAYS_INLINE int32_t float_bits(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE float bits_float(int32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

}  // namespace detail

/// exp(x) for x <= 0 (the only exponentials these ops take: e^{-2|u|}). Cephes' expf:
///   x = n log 2 + r, |r| <= log(2)/2,   exp(x) = 2^n (1 + r + r^2 P(r)),
/// with log 2 split in two so that r is exact. Below -87.3, where the result leaves the normal
/// range, it returns about 1e-38 rather than a subnormal or zero.
C10_HOST_DEVICE C10_ALWAYS_INLINE float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float clamped = x < -87.3f ? -87.3f : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (exact for |n| < 2^22).
  const float n = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const float scale = detail::bits_float((static_cast<int32_t>(n) + 127) << 23);
  return x != x ? x : y * scale;
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE double exp_nonpositive(double x) { return ::exp(x); }

/// x = m 2^e with m in [1, 2), exactly, for x > 0 (subnormals included); +inf and NaN come
/// back as m = x. A float frexp of bit operations, which vectorises where libm's does not.
C10_HOST_DEVICE C10_ALWAYS_INLINE float split_exponent(float x, int32_t& e) {
#if defined(__CUDA_ARCH__)
  int half_e = 0;
  const float half_m = ::frexpf(x, &half_e);  // in [1/2, 1)
  e = half_e - 1;
  return 2.f * half_m;
#else
  const bool subnormal = x < 1.17549435e-38f;
  const float normal = subnormal ? x * 8388608.f : x;  // 2^23
  const int32_t bits = detail::float_bits(normal);
  e = ((bits >> 23) & 0xff) - 127 - (subnormal ? 23 : 0);
  const float m = detail::bits_float((bits & 0x007fffff) | 0x3f800000);
  return x < std::numeric_limits<float>::infinity() ? m : x;
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE double split_exponent(double x, int32_t& e) {
  int half_e = 0;
  const double half_m = ::frexp(x, &half_e);
  e = half_e - 1;
  return 2 * half_m;
}

/// log(x) for any float. Cephes' logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1,
///   log x = e log 2 + f - f^2/2 + f^3 P(f);
/// subnormals are scaled into the normal range first; 0 gives -inf, negatives and NaN give NaN,
/// +inf gives +inf.
C10_HOST_DEVICE C10_ALWAYS_INLINE float log_(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  const bool subnormal = x < 1.17549435e-38f;
  const float normal = subnormal ? x * 8388608.f : x;  // 2^23
  const int32_t bits = detail::float_bits(normal);
  int32_t e = ((bits >> 23) & 0xff) - 127 - (subnormal ? 23 : 0);
  float m = detail::bits_float((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1 : e;
  const float f = m - 1.f;
  const float ef = static_cast<float>(e);
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float f2 = f * f;
  float y = f * f2 * p + ef * -2.12194440e-4f - 0.5f * f2;
  y = (f + y) + ef * 0.693359375f;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  return x == kInf ? kInf : x == 0.f ? -kInf : !(x > 0.f) ? kNaN : y;
#endif
}

}  // namespace math
}  // namespace fusedgauss
