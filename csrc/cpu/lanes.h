#pragma once
// Moving samples between the tensors' layout (one sample after another) and the lane-minor
// blocks of W samples that csrc/math computes on.
//
// Moving a block is a transpose of a (W x n) matrix, and done one element at a time it costs
// more than the math the block then does (a k=6 log-prob's gathers took half its time). For
// float, with W a multiple of 8, on a CPU with AVX2, it goes through 8 x 8 register
// transposes instead: eight row loads, 24 shuffles and eight column stores per 64 elements,
// about 2x faster (with AVX-512 and W a multiple of 16, the gathers use 16 x 16 ones), and
// the gather prefetches the rows of the block two ahead into L2, so that the loads from DRAM
// overlap the math of the blocks before (see prefetch_rows_ahead). Either way the results are
// the same bits.

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FUSEDGAUSS_X86_TRANSPOSES 1
#endif

namespace fusedgauss {
namespace cpu {

/// Samples the CPU kernels compute in lock-step: enough independent dependency chains to
/// fill the SIMD units.
constexpr int kLanes = 16;
/// Lanes for kernels that mostly stream large per-sample matrices through a gather (a
/// per-sample scale_tril with k > 16): a block of 16 such factors would not fit in L1, and
/// with little arithmetic per element there is nothing for more lanes to hide. Eight is the
/// fewest the 8 x 8 transposes take.
constexpr int kStreamingLanes = 8;

/// Runs fn(K) with K a std::integral_constant: k itself for the small event sizes of float
/// inputs, where a compile-time k unrolls every loop of a sample's math (the common policy
/// sizes, and the hot dtype), 0 (a runtime k) otherwise.
template <typename scalar_t, typename F>
void with_static_event_size(int64_t k, const F& fn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (k) {
      case 1: return fn(std::integral_constant<int, 1>{});
      case 2: return fn(std::integral_constant<int, 2>{});
      case 3: return fn(std::integral_constant<int, 3>{});
      case 4: return fn(std::integral_constant<int, 4>{});
      case 5: return fn(std::integral_constant<int, 5>{});
      case 6: return fn(std::integral_constant<int, 6>{});
      case 7: return fn(std::integral_constant<int, 7>{});
      case 8: return fn(std::integral_constant<int, 8>{});
      default: break;
    }
  }
  fn(std::integral_constant<int, 0>{});
}

namespace detail {

#if defined(FUSEDGAUSS_X86_TRANSPOSES)

/// v[r][c] -> v[c][r] for an 8 x 8 block of floats held as eight row vectors.
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void transpose_8x8(__m256* v) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/// The first `n` (< 8) floats at p, zeros after: no access past p + n, which may be the end
/// of a tensor.
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE __m256 load_first(const float* p, int n) {
  __m128 lo = _mm_setzero_ps(), hi = _mm_setzero_ps(), rest = _mm_setzero_ps();
  const bool past_four = n >= 4;
  if (past_four) {
    lo = _mm_loadu_ps(p);
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    rest = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
    if (n == 3) rest = _mm_movelh_ps(rest, _mm_load_ss(p + 2));
  } else if (n == 1) {
    rest = _mm_load_ss(p);
  }
  (past_four ? hi : lo) = rest;
  return _mm256_set_m128(hi, lo);
}

/// Stores the first `n` (< 8) floats of v at p, and nothing past p + n.
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void store_first(float* p, __m256 v, int n) {
  __m128 part = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(p, part);
    part = _mm256_extractf128_ps(v, 1);
    p += 4;
    n -= 4;
  }
  if (n >= 2) {
    _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(part));
    part = _mm_movehl_ps(part, part);
    p += 2;
    n -= 2;
  }
  if (n == 1) _mm_store_ss(p, part);
}

/// Blocks ahead whose rows a gather asks the memory system for: the samples stream in from
/// DRAM, and a block's math is short, so without this every block waits for its own loads.
constexpr int kPrefetchBlocks = 2;

/// Prefetches into L2, for the rows of a block (row pointers `rows`, `stride` floats apart), the
/// cache line at column c0 of the same rows kPrefetchBlocks blocks ahead. Called once per 16
/// columns, it spreads a long row's prefetches over the transposes. A k=17 gather of 75 MB
/// (8 lanes, interleaved runs): 10 ms with the whole block ahead prefetched into L1 at once,
/// 7-9 ms spread over the columns into L1, 5 ms spread into L2, 3.8 ms from cache. Prefetches
/// into L1 hold its few miss buffers until DRAM answers, and then the gather's own loads wait
/// for them; L2 tracks more misses at a time. Addresses past the tensor are harmless: a
/// prefetch never faults.
template <int W, int kRows>
C10_ALWAYS_INLINE void prefetch_rows_ahead(const float* const* rows, int64_t stride, int64_t c0) {
  if (stride == 0) return;  // shared by the batch: already in cache
  const int64_t ahead = kPrefetchBlocks * W * stride + c0;
  for (int r = 0; r < kRows; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead), _MM_HINT_T1);
}

/// prefetch_rows_ahead for a gather's rows of a (and of b, when given), at every 16th column.
/// (A function, not a lambda in the gather: GCC 12 dropped the prefetches of the lambda.)
template <int W, int kRows>
C10_ALWAYS_INLINE void prefetch_columns_ahead(const float* const* a_rows, int64_t a_stride, const float* const* b_rows,
                                              int64_t b_stride, int64_t c0) {
  if (c0 % 16 != 0) return;
  prefetch_rows_ahead<W, kRows>(a_rows, a_stride, c0);
  if (b_rows != nullptr) prefetch_rows_ahead<W, kRows>(b_rows, b_stride, c0);
}

/// Eight rows' columns c0 .. c0 + width - 1 (width <= 8, zeros past it), minus those of b's rows
/// when b is given, transposed: v[c] holds column c0 + c of the eight rows.
template <bool kFullWidth>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void load_transposed_8x8(const float* const* a_rows, const float* const* b_rows,
                                                                 int64_t c0, int width, __m256* v) {
  for (int r = 0; r < 8; ++r) {
    v[r] = kFullWidth ? _mm256_loadu_ps(a_rows[r] + c0) : load_first(a_rows[r] + c0, width);
    if (b_rows != nullptr) {
      v[r] = _mm256_sub_ps(v[r], kFullWidth ? _mm256_loadu_ps(b_rows[r] + c0) : load_first(b_rows[r] + c0, width));
    }
  }
  transpose_8x8(v);
}

/// dst[i * W + l] = a_l[i] (- b_l[i] when b is given) for i < n, with a_l = a + min(l,
/// count - 1) * a_stride (and b_l); lanes past `count` repeat the last sample.
template <int W>
FUSEDGAUSS_AVX2_TARGET void rows_to_lanes_avx2(int64_t n, const float* a, int64_t a_stride, const float* b,
                                               int64_t b_stride, int count, float* dst) {
  static_assert(W % 8 == 0, "8 x 8 transposes need whole groups of 8 lanes");
  for (int g = 0; g < W; g += 8) {
    const float* a_rows[8];
    const float* b_rows[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t sample = std::min(g + r, count - 1);
      a_rows[r] = a + sample * a_stride;
      b_rows[r] = b != nullptr ? b + sample * b_stride : nullptr;
    }
    const float* const* b_rows_or_null = b != nullptr ? b_rows : nullptr;
    __m256 v[8];
    int64_t c0 = 0;
    // The full 8-column blocks apart from the last partial one: without a width test per row
    // (a k=6 gather from cache: 0.51 against 0.57 ms).
    for (; c0 + 8 <= n; c0 += 8) {
      prefetch_columns_ahead<W, 8>(a_rows, a_stride, b_rows_or_null, b_stride, c0);
      load_transposed_8x8<true>(a_rows, b_rows_or_null, c0, 8, v);
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + (c0 + c) * W + g, v[c]);
    }
    if (c0 < n) {
      const int width = static_cast<int>(n - c0);
      prefetch_columns_ahead<W, 8>(a_rows, a_stride, b_rows_or_null, b_stride, c0);
      load_transposed_8x8<false>(a_rows, b_rows_or_null, c0, width, v);
      for (int c = 0; c < width; ++c) _mm256_storeu_ps(dst + (c0 + c) * W + g, v[c]);
    }
  }
}

/// The first `count` lanes of the lane-minor n-vectors in src, as rows of dst (row stride n).
template <int W>
FUSEDGAUSS_AVX2_TARGET void lanes_to_rows_avx2(int64_t n, const float* src, int count, float* dst) {
  static_assert(W % 8 == 0, "8 x 8 transposes need whole groups of 8 lanes");
  for (int g = 0; g < count; g += 8) {
    const int rows = std::min(8, count - g);
    __m256 v[8];
    for (int64_t c0 = 0; c0 < n; c0 += 8) {
      const int width = static_cast<int>(std::min<int64_t>(8, n - c0));
      for (int c = 0; c < 8; ++c) v[c] = c < width ? _mm256_loadu_ps(src + (c0 + c) * W + g) : _mm256_setzero_ps();
      transpose_8x8(v);
      for (int r = 0; r < rows; ++r) {
        float* out = dst + (g + r) * n + c0;
        if (width == 8) {
          _mm256_storeu_ps(out, v[r]);
        } else {
          store_first(out, v[r], width);
        }
      }
    }
  }
}

// GCC 12's 512-bit shuffle intrinsics start from _mm512_undefined_ps(), which its own
// -W(maybe-)uninitialized then reports at every use (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

/// v[r][c] -> v[c][r] for a 16 x 16 block of floats held as sixteen row vectors: pairs of
/// rows interleave, then 4-row groups gather each column within a 128-bit lane, then two rounds
/// of 128-bit lane shuffles put the four lanes of a column in order (64 shuffles).
FUSEDGAUSS_AVX512_TARGET C10_ALWAYS_INLINE void transpose_16x16(__m512* v) {
  __m512 t[16], u[16];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]);
    t[2 * p + 1] = _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]);
  }
  // u[4q + c], 128-bit lane L: rows 4q..4q+3 of column 4L + c.
  for (int q = 0; q < 4; ++q) {
    u[4 * q] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
    u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even_top = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // lanes 0, 2 of rows 0-7
    const __m512 odd_top = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);   // lanes 1, 3 of rows 0-7
    const __m512 even_bottom = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 odd_bottom = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    v[c] = _mm512_shuffle_f32x4(even_top, even_bottom, 0x88);
    v[8 + c] = _mm512_shuffle_f32x4(even_top, even_bottom, 0xDD);
    v[4 + c] = _mm512_shuffle_f32x4(odd_top, odd_bottom, 0x88);
    v[12 + c] = _mm512_shuffle_f32x4(odd_top, odd_bottom, 0xDD);
  }
}

/// Rows up to this long (vectors, and the matrices of k <= 8) gather through the 16 x 16
/// transposes; longer ones through the 8 x 8 ones, which were about 10% faster for them (a
/// k=17 covariance forward), where the 16 x 16 ones were for k=6 (1.2-1.4x).
constexpr int64_t kWideGatherMaxColumns = 64;

/// rows_to_lanes_avx2 with 16 x 16 transposes: fewer loads, stores and shuffles per element,
/// masked loads at the row ends, and each lane row written by one 512-bit store, which the
/// math's 512-bit loads then take straight from the store buffer.
template <int W>
FUSEDGAUSS_AVX512_TARGET void rows_to_lanes_avx512(int64_t n, const float* a, int64_t a_stride, const float* b,
                                                   int64_t b_stride, int count, float* dst) {
  static_assert(W % 16 == 0, "16 x 16 transposes need whole groups of 16 lanes");
  for (int g = 0; g < W; g += 16) {
    const float* a_rows[16];
    const float* b_rows[16];
    for (int r = 0; r < 16; ++r) {
      const int64_t sample = std::min(g + r, count - 1);
      a_rows[r] = a + sample * a_stride;
      b_rows[r] = b != nullptr ? b + sample * b_stride : nullptr;
    }
    __m512 v[16];
    for (int64_t c0 = 0; c0 < n; c0 += 16) {
      const int width = static_cast<int>(std::min<int64_t>(16, n - c0));
      const __mmask16 columns = static_cast<__mmask16>((1u << width) - 1);
      prefetch_columns_ahead<W, 16>(a_rows, a_stride, b != nullptr ? b_rows : nullptr, b_stride, c0);
      for (int r = 0; r < 16; ++r) {
        v[r] = _mm512_maskz_loadu_ps(columns, a_rows[r] + c0);
        if (b != nullptr) v[r] = _mm512_sub_ps(v[r], _mm512_maskz_loadu_ps(columns, b_rows[r] + c0));
      }
      transpose_16x16(v);
      for (int c = 0; c < width; ++c) _mm512_storeu_ps(dst + (c0 + c) * W + g, v[c]);
    }
  }
}

#pragma GCC diagnostic pop

#endif  // FUSEDGAUSS_X86_TRANSPOSES

/// Whether blocks of this kind can move through the AVX2 transposes (on a CPU that has AVX2).
template <int W, typename acc_t, typename elem_t>
constexpr bool kTransposable =
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
    W % 8 == 0 && std::is_same_v<acc_t, float> && std::is_same_v<elem_t, float>;
#else
    false;
#endif

}  // namespace detail

/// dst[i * W + l] = a_l[i] - b_l[i] for the k-vectors a_l = a + l * a_stride (and b_l) of
/// `count` samples; lanes past `count` repeat the last sample, so they compute finite values
/// that are never stored.
template <int W, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_differences(int64_t k, const src_t* __restrict__ a, int64_t a_stride,
                                          const src_t* __restrict__ b, int64_t b_stride, int count,
                                          acc_t* __restrict__ dst) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, src_t>) {
    if constexpr (W % 16 == 0) {
      if (simd_level() == SimdLevel::kAvx512 && k <= detail::kWideGatherMaxColumns) {
        return detail::rows_to_lanes_avx512<W>(k, a, a_stride, b, b_stride, count, dst);
      }
    }
    if (simd_at_least_avx2()) return detail::rows_to_lanes_avx2<W>(k, a, a_stride, b, b_stride, count, dst);
  }
#endif
  for (int l = 0; l < W; ++l) {
    const src_t* al = a + std::min(l, count - 1) * a_stride;
    const src_t* bl = b + std::min(l, count - 1) * b_stride;
    for (int64_t i = 0; i < k; ++i) dst[i * W + l] = static_cast<acc_t>(al[i]) - static_cast<acc_t>(bl[i]);
  }
}

/// dst[i * W + l] = a_l[i] for the n-vectors a_l = a + l * stride of `count` samples; lanes
/// past `count` repeat the last sample. A batch of k x k matrices is gathered whole, n = k * k.
template <int W, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_rows(int64_t n, const src_t* __restrict__ a, int64_t stride, int count,
                                   acc_t* __restrict__ dst) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, src_t>) {
    if constexpr (W % 16 == 0) {
      if (simd_level() == SimdLevel::kAvx512 && n <= detail::kWideGatherMaxColumns) {
        return detail::rows_to_lanes_avx512<W>(n, a, stride, nullptr, 0, count, dst);
      }
    }
    if (simd_at_least_avx2()) return detail::rows_to_lanes_avx2<W>(n, a, stride, nullptr, 0, count, dst);
  }
#endif
  for (int l = 0; l < W; ++l) {
    const src_t* al = a + std::min(l, count - 1) * stride;
    for (int64_t i = 0; i < n; ++i) dst[i * W + l] = static_cast<acc_t>(al[i]);
  }
}

/// The first `count` lanes of the lane-minor n-vectors in src, as rows of dst (row stride n).
template <int W, typename dst_t, typename acc_t>
C10_ALWAYS_INLINE void scatter_rows(int64_t n, const acc_t* __restrict__ src, int count, dst_t* __restrict__ dst) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  // No 16 x 16 version: the rows of a sample are rarely 64-byte aligned, and 512-bit stores
  // across cache lines made a k=6 backward slower than these 256-bit ones (AMD Zen).
  if constexpr (detail::kTransposable<W, acc_t, dst_t>) {
    if (simd_at_least_avx2()) return detail::lanes_to_rows_avx2<W>(n, src, count, dst);
  }
#endif
  for (int l = 0; l < count; ++l) {
    for (int64_t i = 0; i < n; ++i) dst[l * n + i] = static_cast<dst_t>(src[i * W + l]);
  }
}

/// dst[(i * k + j) * W + l] for j <= i: the lower triangles of `count` row-major k x k
/// matrices, lane-minor; lanes past `count` repeat the last matrix. For a matrix read once
/// (shared by the batch), or of a dtype the transposes do not take.
template <int W, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_lower(int64_t k, const src_t* __restrict__ src, int64_t stride, int count,
                                    acc_t* __restrict__ dst) {
  for (int l = 0; l < W; ++l) {
    const src_t* s = src + std::min(l, count - 1) * stride;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) dst[(i * k + j) * W + l] = static_cast<acc_t>(s[i * k + j]);
    }
  }
}

/// Per-sample k x k matrices, lane-minor: the whole matrices through the transposes where
/// they apply (the entries above the diagonal come along, and the math never reads them),
/// the lower triangles otherwise.
template <int W, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_matrices(int64_t k, const src_t* __restrict__ src, int64_t stride, int count,
                                       acc_t* __restrict__ dst) {
  if (detail::kTransposable<W, acc_t, src_t> && simd_at_least_avx2()) {
    gather_rows<W>(k * k, src, stride, count, dst);
  } else {
    gather_lower<W>(k, src, stride, count, dst);
  }
}

/// out[e] += sum over lanes of acc[e * W + l], lanes in order (reproducible sums).
template <int W, typename acc_t>
C10_ALWAYS_INLINE void add_lane_sums(int64_t width, const acc_t* acc, acc_t* out) {
  for (int64_t e = 0; e < width; ++e) {
    acc_t s = 0;
    for (int l = 0; l < W; ++l) s += acc[e * W + l];
    out[e] += s;
  }
}

}  // namespace cpu
}  // namespace fusedgauss
