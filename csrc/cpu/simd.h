#pragma once
// Runtime choice of the widest vector instructions a kernel's loops may use.
//
// The extension is compiled for the baseline x86-64 (SSE2), so that one wheel runs anywhere.
// Loops of transcendental math (csrc/math/squash_math.h) run about 4x faster with AVX2 and
// FMA, which every x86 server of the last decade has: with_best_simd(body) compiles `body`
// twice, once for AVX2+FMA, and runs that copy when the CPU supports it. `body` must be a
// lambda marked FUSEDGAUSS_INLINE_BODY, so that it (and the always-inline math it calls) is
// compiled inside each copy.

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSEDGAUSS_AVX2_TARGET __attribute__((target("avx2,fma")))
#define FUSEDGAUSS_INLINE_BODY __attribute__((always_inline))
#else
#define FUSEDGAUSS_AVX2_TARGET
#define FUSEDGAUSS_INLINE_BODY
#endif

namespace fusedgauss {
namespace cpu {

inline bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

namespace detail {
template <typename Body>
FUSEDGAUSS_AVX2_TARGET void run_avx2(const Body& body) {
  body();
}

template <typename Body>
void run_baseline(const Body& body) {
  body();
}
}  // namespace detail

template <typename Body>
void with_best_simd(const Body& body) {
  if (cpu_has_avx2_fma()) {
    detail::run_avx2(body);
  } else {
    detail::run_baseline(body);
  }
}

}  // namespace cpu
}  // namespace fusedgauss
