#pragma once
// Moving samples between the tensors' layout (one sample after another) and the lane-minor
// blocks of W samples that csrc/math computes on.
//
// Moving a block is a transpose of a (W x n) matrix, and done one element at a time it costs
// more than the math the block then does (a k=6 log-prob's gathers took half its time). For
// float, with W a multiple of 8, on a CPU with AVX2, it goes through registers instead, four
// columns of eight rows at a time: each 256-bit register is loaded with the four columns of
// two rows, one per 128-bit half, and a 4 x 4 transpose within the halves (8 shuffles) leaves
// one column of the eight rows in each register. The loads do half of the transposing, so a
// 32-element step takes 8 shuffles where an 8 x 8 register transpose takes 12 per 32 and a
// 16 x 16 one 16 per 32 (at twice the cost each on AMD Zen 4, which splits 512-bit
// shuffles), and a row's last columns need no masked transpose of a whole block. A gather
// of 16 lanes of k=6 samples (L2): 3.3 ns per scale_tril (36 floats) against 9.0 through
// 16 x 16 and 3.9 through 8 x 8 transposes, 3.2 ns per value - loc against 4.7 and 5.1. A
// scatter keeps 8 x 8 transposes for whole 8-column blocks (see lanes_to_rows_avx2), and
// per-sample gradients too big for the caches leave through non-temporal stores
// (stream_rows). The gather also prefetches the rows of the block two ahead into L2, so that
// the loads from DRAM overlap the math of the blocks before (see prefetch_rows_ahead). Either
// way the results are the same bits.

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

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
/// Lanes for the kernels that solve with a given Cholesky factor (scale_tril, packed) of a
/// compile-time k. A triangular solve is one chain of dependent multiply-adds down the rows,
/// and 32 lanes, two AVX-512 vectors a row, run two chains side by side: a k=6 per-sample
/// scale_tril log-prob, two threads, 65536 samples, forward 0.53 -> 0.47 ms, backward
/// 0.98 -> 0.90 (medians); k=3 1.15 -> 1.03 ms both ways. A covariance's kernels keep
/// kLanes: with a factorisation per block, 32 lanes made the k=6 step 1.2x slower.
constexpr int kSolveLanes = 32;
/// Lanes for kernels that mostly stream large per-sample matrices through a gather (the
/// backward and the sampling of a per-sample scale_tril with k > 16): a block of 16 such
/// factors and their gradient would not fit in L1, and with little arithmetic per element
/// there is nothing for more lanes to hide. Eight is the fewest the transposes take (they
/// move groups of 8 rows). The log-prob forward, which holds the factors alone, keeps kLanes.
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
///
/// kContiguousStride > 0 says that the rows follow each other at that stride: rows shorter
/// than a cache line then share lines, and only the rows that start a new line are
/// prefetched (rows 0, 3 and 6 of eight 6-float rows), not every row.
template <int W, int kRows, int kContiguousStride>
C10_ALWAYS_INLINE void prefetch_rows_ahead(const float* const* rows, int64_t stride, int64_t c0) {
  if (stride == 0) return;  // shared by the batch: already in cache
  const int64_t ahead = kPrefetchBlocks * W * stride + c0;
  for (int r = 0; r < kRows; ++r) {
    constexpr int kLineFloats = 16;
    const bool starts_a_line = kContiguousStride == 0 || kContiguousStride >= kLineFloats || r == 0 ||
                               r * kContiguousStride / kLineFloats != (r - 1) * kContiguousStride / kLineFloats;
    if (starts_a_line) _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead), _MM_HINT_T1);
  }
}

/// prefetch_rows_ahead for a gather's rows of a (and of b, when given), at every 16th column.
/// (A function, not a lambda in the gather: GCC 12 dropped the prefetches of the lambda.)
template <int W, int kRows, int kContiguousStride>
C10_ALWAYS_INLINE void prefetch_columns_ahead(const float* const* a_rows, int64_t a_stride, const float* const* b_rows,
                                              int64_t b_stride, int64_t c0) {
  if (c0 % 16 != 0) return;
  prefetch_rows_ahead<W, kRows, kContiguousStride>(a_rows, a_stride, c0);
  if (b_rows != nullptr) prefetch_rows_ahead<W, kRows, kContiguousStride>(b_rows, b_stride, c0);
}

/// The first `n` (< 4) floats at p, zeros after: no access past p + n, which may be the end
/// of a tensor.
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE __m128 load_first(const float* p, int n) {
  if (n == 1) return _mm_load_ss(p);
  const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  return n == 2 ? pair : _mm_movelh_ps(pair, _mm_load_ss(p + 2));
}

/// Stores the first `n` (< 4) floats of v at p, and nothing past p + n.
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void store_first(float* p, __m128 v, int n) {
  if (n == 1) return _mm_store_ss(p, v);
  _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(v));
  if (n == 3) _mm_store_ss(p + 2, _mm_movehl_ps(v, v));
}

/// Columns c0 .. c0 + 3 of rows j and 4 + j of an 8-row group, one row per 128-bit half (zeros
/// past `width` columns): the loads do half of the transpose.
template <bool kFullWidth>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE __m256 load_row_pair(const float* const* rows, int j, int64_t c0,
                                                              int width) {
  const __m128 low = kFullWidth ? _mm_loadu_ps(rows[j] + c0) : load_first(rows[j] + c0, width);
  const __m128 high = kFullWidth ? _mm_loadu_ps(rows[4 + j] + c0) : load_first(rows[4 + j] + c0, width);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
}

/// v[r][c] -> v[c][r] in each 128-bit half of four vectors (8 shuffles).
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void transpose_4x4_halves(__m256* v) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  v[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  v[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  v[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  v[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

/// Columns c0 .. c0 + width - 1 (width <= 4) of an 8-row group (minus those of b's rows when b
/// is given) into lanes g .. g + 7 of dst's lane rows c0 .. c0 + width - 1.
template <int W, bool kFullWidth>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void rows_to_lanes_4_columns(const float* const* a_rows,
                                                                      const float* const* b_rows, int64_t c0,
                                                                      int width, float* dst) {
  __m256 v[4];
  for (int j = 0; j < 4; ++j) {
    v[j] = load_row_pair<kFullWidth>(a_rows, j, c0, width);
    if (b_rows != nullptr) v[j] = _mm256_sub_ps(v[j], load_row_pair<kFullWidth>(b_rows, j, c0, width));
  }
  transpose_4x4_halves(v);
  for (int c = 0; c < (kFullWidth ? 4 : width); ++c) _mm256_storeu_ps(dst + (c0 + c) * W, v[c]);
}

/// Columns [c0, end) of an 8-row group (minus those of b's rows when b is given) into lanes
/// g .. g + 7 of dst (dst + g passed), four at a time and the last step partial, the rows
/// prefetched ahead as the columns go (prefetch_columns_ahead).
template <int W, int kContiguousN>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void columns_to_lanes(const float* const* a_rows, int64_t a_stride,
                                                               const float* const* b_rows, int64_t b_stride,
                                                               int64_t c0, int64_t end, float* dst) {
  for (; c0 + 4 <= end; c0 += 4) {
    prefetch_columns_ahead<W, 8, kContiguousN>(a_rows, a_stride, b_rows, b_stride, c0);
    rows_to_lanes_4_columns<W, true>(a_rows, b_rows, c0, 4, dst);
  }
  if (c0 < end) {
    prefetch_columns_ahead<W, 8, kContiguousN>(a_rows, a_stride, b_rows, b_stride, c0);
    rows_to_lanes_4_columns<W, false>(a_rows, b_rows, c0, static_cast<int>(end - c0), dst);
  }
}

/// The body of rows_to_lanes_avx2. kContiguousN > 0: a full block of rows of n = kContiguousN
/// that follow each other (a_stride == b_stride == n), so that every row's address is a fixed
/// offset from a (or b) and needs no register of its own.
template <int W, int kContiguousN, bool kDifference>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void rows_to_lanes_groups(int64_t n, const float* a, int64_t a_stride,
                                                                   const float* b, int64_t b_stride, int count,
                                                                   float* dst) {
  constexpr bool kContiguous = kContiguousN > 0;
  for (int g = 0; g < W; g += 8) {
    const float* a_rows[8];
    const float* b_rows[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t sample = kContiguous ? g + r : std::min(g + r, count - 1);
      a_rows[r] = a + sample * a_stride;
      b_rows[r] = kDifference ? b + sample * b_stride : nullptr;
    }
    columns_to_lanes<W, kContiguousN>(a_rows, a_stride, kDifference ? b_rows : nullptr, b_stride, 0, n, dst + g);
  }
}

/// dst[i * W + l] = a_l[i] (- b_l[i] when b is given) for i < n, with a_l = a + min(l,
/// count - 1) * a_stride (and b_l); lanes past `count` repeat the last sample. n is kN when
/// kN > 0 (see gather_rows), runtime_n otherwise.
template <int W, int kN>
FUSEDGAUSS_AVX2_TARGET void rows_to_lanes_avx2(int64_t runtime_n, const float* a, int64_t a_stride, const float* b,
                                               int64_t b_stride, int count, float* dst) {
  static_assert(W % 8 == 0, "the transposes take whole groups of 8 lanes");
  const int64_t n = kN > 0 ? kN : runtime_n;
  const bool difference = b != nullptr;
  if (kN > 0 && count == W && a_stride == kN && (!difference || b_stride == kN)) {
    return difference ? rows_to_lanes_groups<W, kN, true>(kN, a, kN, b, kN, W, dst)
                      : rows_to_lanes_groups<W, kN, false>(kN, a, kN, nullptr, 0, W, dst);
  }
  return difference ? rows_to_lanes_groups<W, 0, true>(n, a, a_stride, b, b_stride, count, dst)
                    : rows_to_lanes_groups<W, 0, false>(n, a, a_stride, nullptr, 0, count, dst);
}

/// v[r][c] -> v[c][r] for an 8 x 8 block of floats held as eight row vectors (24 shuffles).
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

/// Rows g .. g + rows - 1 of dst from lanes g .. g + rows - 1 of src (see lanes_to_rows_avx2).
/// kAllRows (rows == 8) lets the row loops unroll, which keeps the transposed rows in
/// registers: with a runtime row count GCC spilled them to the stack.
template <int W, bool kAllRows>
FUSEDGAUSS_AVX2_TARGET C10_ALWAYS_INLINE void lanes_to_rows_group(int64_t n, const float* src, int g, int rows,
                                                                  float* dst, int64_t dst_stride) {
  const int row_count = kAllRows ? 8 : rows;
  __m256 v[8];
  int64_t c0 = 0;
  for (; c0 + 8 <= n; c0 += 8) {
    for (int c = 0; c < 8; ++c) v[c] = _mm256_loadu_ps(src + (c0 + c) * W + g);
    transpose_8x8(v);
    for (int r = 0; r < row_count; ++r) _mm256_storeu_ps(dst + (g + r) * dst_stride + c0, v[r]);
  }
  for (; c0 < n; c0 += 4) {
    const int width = static_cast<int>(std::min<int64_t>(4, n - c0));
    for (int c = 0; c < 4; ++c) v[c] = c < width ? _mm256_loadu_ps(src + (c0 + c) * W + g) : _mm256_setzero_ps();
    transpose_4x4_halves(v);
    // v[j] holds columns c0 .. c0 + 3 of rows j (low half) and 4 + j (high half).
    for (int r = 0; r < row_count; ++r) {
      const __m128 row = r < 4 ? _mm256_castps256_ps128(v[r]) : _mm256_extractf128_ps(v[r - 4], 1);
      float* out = dst + (g + r) * dst_stride + c0;
      if (width == 4) {
        _mm_storeu_ps(out, row);
      } else {
        store_first(out, row, width);
      }
    }
  }
}

/// The first `count` lanes of the lane-minor n-vectors in src, as rows of dst (row stride
/// dst_stride >= n). Whole 8-column blocks go through 8 x 8 transposes, whose 256-bit row
/// stores scattered a k=17 gradient (289 columns) 1.3x faster than four columns at a time
/// with 128-bit stores; the last columns go four (or fewer) at a time, as the gathers do.
template <int W>
FUSEDGAUSS_AVX2_TARGET void lanes_to_rows_avx2(int64_t n, const float* src, int count, float* dst,
                                               int64_t dst_stride) {
  static_assert(W % 8 == 0, "the transposes take whole groups of 8 lanes");
  for (int g = 0; g < count; g += 8) {
    if (count - g >= 8) {
      lanes_to_rows_group<W, true>(n, src, g, 8, dst, dst_stride);
    } else {
      lanes_to_rows_group<W, false>(n, src, g, count - g, dst, dst_stride);
    }
  }
}

/// dst[i] = src[i] for i < n, the 32-byte-aligned stretch of dst by non-temporal stores: they
/// write whole cache lines without first reading them into the caches (the ends, shared with
/// the neighbouring rows, take ordinary stores).
FUSEDGAUSS_AVX2_TARGET inline void stream_copy(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  const auto misalignment = reinterpret_cast<uintptr_t>(dst) % 32;
  const int64_t head = std::min<int64_t>(n, misalignment == 0 ? 0 : static_cast<int64_t>((32 - misalignment) / 4));
  for (; i < head; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

/// dst[c * W + l] = a_l[c] for the entries c of the spans [begin[s], end[s]) of the rows, with
/// a_l = a + min(l, count - 1) * stride: rows_to_lanes_avx2 over chosen stretches of the rows.
/// Each span begins at a multiple of 4; one whose length is not ends in a partial step.
template <int W>
FUSEDGAUSS_AVX2_TARGET void spans_to_lanes_avx2(const int64_t* begin, const int64_t* end, int64_t span_count,
                                                const float* a, int64_t stride, int count, float* dst) {
  static_assert(W % 8 == 0, "the transposes take whole groups of 8 lanes");
  for (int g = 0; g < W; g += 8) {
    const float* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = a + std::min(g + r, count - 1) * stride;
    for (int64_t s = 0; s < span_count; ++s) {
      if (begin[s] % 16 != 0) prefetch_rows_ahead<W, 8, 0>(rows, stride, begin[s]);  // the span's first line
      columns_to_lanes<W, 0>(rows, stride, nullptr, 0, begin[s], end[s], dst + g);
    }
  }
}

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
/// that are never stored. kK > 0 says that k == kK (see gather_rows).
template <int W, int kK = 0, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_differences(int64_t k, const src_t* __restrict__ a, int64_t a_stride,
                                          const src_t* __restrict__ b, int64_t b_stride, int count,
                                          acc_t* __restrict__ dst) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, src_t>) {
    if (simd_at_least_avx2()) return detail::rows_to_lanes_avx2<W, kK>(k, a, a_stride, b, b_stride, count, dst);
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
/// kN > 0 says that n == kN: a kernel of compile-time k passes it, and the transposes then
/// unroll; a full block of back-to-back rows also has every row at a fixed offset, and is
/// prefetched a cache line at a time rather than a row at a time. That last step alone took a
/// shared k=6 scale_tril log-prob forward (two threads, 65536 samples) from 0.18 to 0.13 ms.
template <int W, int kN = 0, typename acc_t, typename src_t>
C10_ALWAYS_INLINE void gather_rows(int64_t n, const src_t* __restrict__ a, int64_t stride, int count,
                                   acc_t* __restrict__ dst) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, src_t>) {
    if (simd_at_least_avx2()) return detail::rows_to_lanes_avx2<W, kN>(n, a, stride, nullptr, 0, count, dst);
  }
#endif
  for (int l = 0; l < W; ++l) {
    const src_t* al = a + std::min(l, count - 1) * stride;
    for (int64_t i = 0; i < n; ++i) dst[i * W + l] = static_cast<acc_t>(al[i]);
  }
}

/// The first `count` lanes of the lane-minor n-vectors in src, as rows of dst (row stride
/// dst_stride >= n: n for rows of their own, more for a stretch of wider rows).
template <int W, typename dst_t, typename acc_t>
C10_ALWAYS_INLINE void scatter_rows(int64_t n, const acc_t* __restrict__ src, int count, dst_t* __restrict__ dst,
                                    int64_t dst_stride) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, dst_t>) {
    if (simd_at_least_avx2()) return detail::lanes_to_rows_avx2<W>(n, src, count, dst, dst_stride);
  }
#endif
  for (int l = 0; l < count; ++l) {
    for (int64_t i = 0; i < n; ++i) dst[l * dst_stride + i] = static_cast<dst_t>(src[i * W + l]);
  }
}

template <int W, typename dst_t, typename acc_t>
C10_ALWAYS_INLINE void scatter_rows(int64_t n, const acc_t* __restrict__ src, int count, dst_t* __restrict__ dst) {
  scatter_rows<W>(n, src, count, dst, n);
}

/// Per-sample outputs at least this big are written by stream_rows. Plain stores first read
/// each line of the output into the caches, and an output that does not stay there between
/// steps comes from DRAM every time, on top of the inputs. A per-sample scale_tril backward,
/// two threads: k=6 with 65536 samples (a 9.4 MB gradient) 1.87 -> 1.38 ms (median), k=17
/// 12.3 -> 9.2 ms; with 32768 samples (4.7 MB) the same either way, with 16384 (2.4 MB,
/// which stays in cache) 0.33 -> 0.44 ms.
constexpr int64_t kStreamingOutputBytes = int64_t{8} << 20;

/// scatter_rows into an output too big to stay in the caches: the rows are assembled in
/// `stage` (n * W entries) and written out with non-temporal stores where the transposes
/// apply. Call finish_streaming before another thread reads dst.
template <int W, typename dst_t, typename acc_t>
C10_ALWAYS_INLINE void stream_rows(int64_t n, const acc_t* __restrict__ src, int count, dst_t* __restrict__ dst,
                                   int64_t dst_stride, dst_t* __restrict__ stage) {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  if constexpr (detail::kTransposable<W, acc_t, dst_t>) {
    if (simd_at_least_avx2()) {
      detail::lanes_to_rows_avx2<W>(n, src, count, stage, n);
      if (dst_stride == n) return detail::stream_copy(stage, n * count, dst);
      for (int l = 0; l < count; ++l) detail::stream_copy(stage + l * n, n, dst + l * dst_stride);
      return;
    }
  }
#endif
  scatter_rows<W>(n, src, count, dst, dst_stride);
}

/// Orders a thread's non-temporal stores (stream_rows) before its later stores, so that a
/// thread that sees those sees the streamed rows too.
inline void finish_streaming() {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
  _mm_sfence();
#endif
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

/// Gathers per-sample row-major k x k matrices into lane-minor blocks, dst[(i * k + j) * W + l],
/// for math that reads their lower triangles only (j <= i): entries above the diagonal may
/// come along or not. Through the transposes where they apply: with a compile-time k (kK > 0)
/// the whole matrix, whose unrolled steps cost less than telling them apart; with a runtime k
/// only the spans of the flattened matrix that hold the lower triangle, in four-entry steps,
/// skipping the steps wholly above the diagonal (k=17: 52 of 73 steps, in 12 spans). With
/// the whole matrix gathered, a k=17 scale_tril log-prob (one thread, 4096 samples, fastest
/// of 75) took 315 us forward and 670 us backward, now 304 and 653; k=32 1219 and 3488 us,
/// now 1087 and 2985. Otherwise the lower triangle entry by entry.
template <int W, int kK = 0>
class MatrixGather {
 public:
  explicit MatrixGather(int64_t k) : k_(kK > 0 ? kK : k) {
    if constexpr (kK == 0) {
      const int64_t n = k_ * k_;
      for (int64_t c0 = 0; c0 < n; c0 += 4) {
        const int64_t end = std::min(n, c0 + 4);
        bool on_or_below_diagonal = false;
        for (int64_t e = c0; e < end; ++e) on_or_below_diagonal |= e % k_ <= e / k_;
        if (!on_or_below_diagonal) continue;
        if (!span_end_.empty() && span_end_.back() == c0) {
          span_end_.back() = end;
        } else {
          span_begin_.push_back(c0);
          span_end_.push_back(end);
        }
      }
    }
  }

  /// The matrices of `count` samples `stride` elements apart from src; lanes past `count`
  /// repeat the last matrix.
  template <typename acc_t, typename src_t>
  C10_ALWAYS_INLINE void operator()(const src_t* __restrict__ src, int64_t stride, int count,
                                    acc_t* __restrict__ dst) const {
#if defined(FUSEDGAUSS_X86_TRANSPOSES)
    if constexpr (detail::kTransposable<W, acc_t, src_t>) {
      if (simd_at_least_avx2()) {
        if constexpr (kK > 0) {
          return gather_rows<W, kK * kK>(k_ * k_, src, stride, count, dst);
        } else {
          return detail::spans_to_lanes_avx2<W>(span_begin_.data(), span_end_.data(),
                                                static_cast<int64_t>(span_begin_.size()), src, stride, count, dst);
        }
      }
    }
#endif
    gather_lower<W>(k_, src, stride, count, dst);
  }

 private:
  int64_t k_;
  // Runtime k: the spans [begin, end) of the flattened matrix that the transposes gather.
  std::vector<int64_t> span_begin_, span_end_;
};

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
