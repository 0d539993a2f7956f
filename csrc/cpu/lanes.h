#pragma once
// Moving samples between the tensors' layout (one sample after another) and the lane-minor
// blocks of W samples that csrc/math computes on.

#include <algorithm>
#include <cstdint>

namespace fusedgauss {
namespace cpu {

/// Samples the CPU kernels compute in lock-step: enough independent dependency chains to
/// fill the SIMD units.
constexpr int kLanes = 16;
/// Lanes for kernels that mostly stream large per-sample matrices through a gather (a
/// per-sample scale_tril with k > 16): a block of 16 32 x 32 factors would not fit in L1, and
/// with little arithmetic per element there is nothing for more lanes to hide.
constexpr int kStreamingLanes = 4;

/// dst[i * W + l] = a_l[i] - b_l[i] for the k-vectors a_l = a + l * a_stride (and b_l) of
/// `count` samples; lanes past `count` repeat the last sample, so they compute finite values
/// that are never stored.
template <int W, typename acc_t, typename src_t>
inline void gather_differences(int64_t k, const src_t* __restrict__ a, int64_t a_stride,
                               const src_t* __restrict__ b, int64_t b_stride, int count,
                               acc_t* __restrict__ dst) {
  for (int l = 0; l < W; ++l) {
    const src_t* al = a + std::min(l, count - 1) * a_stride;
    const src_t* bl = b + std::min(l, count - 1) * b_stride;
    for (int64_t i = 0; i < k; ++i) dst[i * W + l] = static_cast<acc_t>(al[i]) - static_cast<acc_t>(bl[i]);
  }
}

/// dst[i * W + l] = a_l[i] for the k-vectors a_l = a + l * stride of `count` samples; lanes
/// past `count` repeat the last sample.
template <int W, typename acc_t, typename src_t>
inline void gather_rows(int64_t k, const src_t* __restrict__ a, int64_t stride, int count, acc_t* __restrict__ dst) {
  for (int l = 0; l < W; ++l) {
    const src_t* al = a + std::min(l, count - 1) * stride;
    for (int64_t i = 0; i < k; ++i) dst[i * W + l] = static_cast<acc_t>(al[i]);
  }
}

/// The first `count` lanes of the lane-minor k-vectors in src, as rows of dst (row stride k).
template <int W, typename dst_t, typename acc_t>
inline void scatter_rows(int64_t k, const acc_t* __restrict__ src, int count, dst_t* __restrict__ dst) {
  for (int l = 0; l < count; ++l) {
    for (int64_t i = 0; i < k; ++i) dst[l * k + i] = static_cast<dst_t>(src[i * W + l]);
  }
}

/// dst[(i * k + j) * W + l] for j <= i: the lower triangles of `count` row-major k x k
/// matrices, lane-minor; lanes past `count` repeat the last matrix.
template <int W, typename acc_t, typename src_t>
inline void gather_lower(int64_t k, const src_t* __restrict__ src, int64_t stride, int count,
                         acc_t* __restrict__ dst) {
  for (int l = 0; l < W; ++l) {
    const src_t* s = src + std::min(l, count - 1) * stride;
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) dst[(i * k + j) * W + l] = static_cast<acc_t>(s[i * k + j]);
    }
  }
}

/// out[e] += sum over lanes of acc[e * W + l], lanes in order (reproducible sums).
template <int W, typename acc_t>
inline void add_lane_sums(int64_t width, const acc_t* acc, acc_t* out) {
  for (int64_t e = 0; e < width; ++e) {
    acc_t s = 0;
    for (int l = 0; l < W; ++l) s += acc[e * W + l];
    out[e] += s;
  }
}

}  // namespace cpu
}  // namespace fusedgauss
