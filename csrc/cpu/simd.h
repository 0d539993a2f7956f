#pragma once
// Runtime choice of the widest vector instructions a kernel's loops may use.
//
// The extension is compiled for the baseline x86-64 (SSE2), so that one wheel runs anywhere.
// The kernels' lane loops (16 samples in lock-step) and loops of transcendental math
// (csrc/math/squash_math.h) run several times faster with wider vectors: with_best_simd(body)
// compiles `body` three times, for the baseline, for AVX2+FMA (every x86 server of the last
// decade) and for AVX-512 (one 512-bit register holds a whole 16-lane row), and runs the copy
// of the active level. `body` must be a lambda marked FUSEDGAUSS_INLINE_BODY, so that it (and
// the always-inline math it calls) is compiled inside each copy.
//
// The active level is the best this CPU supports, or the one FUSEDGAUSS_CPU_SIMD names
// (baseline, avx2, avx512), or the one set_simd_level chose (fusedgauss.backends.use_cpu_simd),
// so that every level's code can be tested and timed on one machine. Asking for a level the CPU
// lacks is an error, never a quiet step down.

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define FUSEDGAUSS_X86_DISPATCH 1
#define FUSEDGAUSS_AVX2_TARGET __attribute__((target("avx2,fma")))
// GCC's generic tuning prefers 256-bit vectors even where 512-bit ones are allowed.
#define FUSEDGAUSS_AVX512_TARGET \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#define FUSEDGAUSS_INLINE_BODY __attribute__((always_inline))
#else
#define FUSEDGAUSS_AVX2_TARGET
#define FUSEDGAUSS_AVX512_TARGET
#define FUSEDGAUSS_INLINE_BODY
#endif

namespace fusedgauss {
namespace cpu {

enum class SimdLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "baseline";
  }
}

/// The widest level this CPU runs.
inline SimdLevel best_supported_simd() {
#if defined(FUSEDGAUSS_X86_DISPATCH)
  static const SimdLevel best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
      return SimdLevel::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
    return SimdLevel::kBaseline;
  }();
  return best;
#else
  return SimdLevel::kBaseline;
#endif
}

/// An error, prefixed by `source`, when this CPU lacks `level`.
inline void check_cpu_runs(SimdLevel level, const char* source) {
  TORCH_CHECK(static_cast<int>(level) <= static_cast<int>(best_supported_simd()), source, ": this CPU cannot run ",
              simd_level_name(level), " code; its widest level is ", simd_level_name(best_supported_simd()));
}

/// The level called `name`; an error naming the choices for any other name, and for a level
/// this CPU lacks.
inline SimdLevel parse_simd_level(const std::string& name, const char* source) {
  SimdLevel level;
  if (name == "baseline") {
    level = SimdLevel::kBaseline;
  } else if (name == "avx2") {
    level = SimdLevel::kAvx2;
  } else if (name == "avx512") {
    level = SimdLevel::kAvx512;
  } else {
    TORCH_CHECK(false, source, ": unknown SIMD level '", name, "'; choose baseline, avx2 or avx512");
  }
  check_cpu_runs(level, source);
  return level;
}

namespace detail {
// -1 until the first use reads FUSEDGAUSS_CPU_SIMD. One variable for the whole library.
inline std::atomic<int> active_simd_level{-1};
}  // namespace detail

/// The level the kernels run now.
inline SimdLevel simd_level() {
  int level = detail::active_simd_level.load(std::memory_order_relaxed);
  if (level < 0) {
    const char* env = std::getenv("FUSEDGAUSS_CPU_SIMD");
    const SimdLevel chosen =
        env != nullptr && *env != '\0' ? parse_simd_level(env, "FUSEDGAUSS_CPU_SIMD") : best_supported_simd();
    level = static_cast<int>(chosen);
    detail::active_simd_level.store(level, std::memory_order_relaxed);
  }
  return static_cast<SimdLevel>(level);
}

inline void set_simd_level(SimdLevel level) {
  check_cpu_runs(level, "set_simd_level");
  detail::active_simd_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

/// Whether the AVX2 transposes and the AVX2 copies of kernel bodies may run.
inline bool simd_at_least_avx2() { return static_cast<int>(simd_level()) >= static_cast<int>(SimdLevel::kAvx2); }

namespace detail {
template <typename Body>
FUSEDGAUSS_AVX512_TARGET void run_avx512(const Body& body) {
  body();
}

template <typename Body>
FUSEDGAUSS_AVX2_TARGET void run_avx2(const Body& body) {
  body();
}

template <typename Body>
void run_baseline(const Body& body) {
  body();
}
}  // namespace detail

/// The widest level for a body that is one chain of dependent divisions and square roots (a
/// Cholesky factorisation): with AVX2 its 16 lanes run as two 8-lane chains side by side,
/// where one 512-bit chain made the covariance and cholesky ops 10-20% slower.
constexpr SimdLevel kWidestCholeskySimd = SimdLevel::kAvx2;

/// Runs body's copy for the active level, or for kWidest where that is narrower.
template <SimdLevel kWidest = SimdLevel::kAvx512, typename Body>
void with_best_simd(const Body& body) {
#if defined(FUSEDGAUSS_X86_DISPATCH)
  const SimdLevel level = simd_level();
  if constexpr (kWidest == SimdLevel::kAvx512) {
    if (level == SimdLevel::kAvx512) return detail::run_avx512(body);
  }
  if (level != SimdLevel::kBaseline) return detail::run_avx2(body);
#endif
  detail::run_baseline(body);
}

}  // namespace cpu
}  // namespace fusedgauss
