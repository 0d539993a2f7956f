// The moves between sample rows and lane-minor blocks (csrc/cpu/lanes.h): on a CPU with AVX2
// the float ones go through register transposes, four columns at a time (and whole 8 x 8 blocks
// in a scatter), whose edges (rows shorter than 4 or 8, partial blocks, strides, the last row
// of a tensor) are checked here against the plain definitions, element by element.
#include <random>
#include <vector>

#include "check.h"
#include "cpu/lanes.h"

using namespace fusedgauss::cpu;

namespace {

std::mt19937 rng(7);

std::vector<float> random_floats(size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> out(n);
  for (float& x : out) x = normal(rng);
  return out;
}

/// kN > 0: n is also given at compile time, as a kernel of compile-time k gives it.
template <int W, int kN = 0>
void test_gathers(int64_t n, int count, int64_t stride) {
  // Exactly as many floats as the rows need: a read past the last row would leave the
  // allocation (and run under a sanitizer, fail).
  const size_t size = static_cast<size_t>((count - 1) * stride + n);
  const std::vector<float> a = random_floats(size), b = random_floats(size);
  std::vector<float> rows(static_cast<size_t>(n * W)), differences(rows.size());
  gather_rows<W, kN>(n, a.data(), stride, count, rows.data());
  gather_differences<W, kN>(n, a.data(), stride, b.data(), stride, count, differences.data());
  for (int l = 0; l < W; ++l) {
    const int64_t sample = std::min(l, count - 1);  // lanes past count repeat the last sample
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_TRUE(rows[i * W + l] == a[sample * stride + i]);
      EXPECT_TRUE(differences[i * W + l] == a[sample * stride + i] - b[sample * stride + i]);
    }
  }
}

/// scatter_rows into rows `dst_stride` apart: n for rows of their own (the overload without a
/// stride), more for a stretch of wider rows, whose other columns keep what they held.
template <int W>
void test_scatter(int64_t n, int count, int64_t dst_stride) {
  const std::vector<float> lanes = random_floats(static_cast<size_t>(n * W));
  const float sentinel = 12345.f;
  std::vector<float> rows(static_cast<size_t>(dst_stride * W), sentinel);
  if (dst_stride == n) {
    scatter_rows<W>(n, lanes.data(), count, rows.data());
  } else {
    scatter_rows<W>(n, lanes.data(), count, rows.data(), dst_stride);
  }
  for (int l = 0; l < W; ++l) {
    for (int64_t i = 0; i < dst_stride; ++i) {
      // Rows past count are not the kernel's to write: they belong to the next block.
      EXPECT_TRUE(rows[l * dst_stride + i] == (l < count && i < n ? lanes[i * W + l] : sentinel));
    }
  }
}

/// stream_rows writes what scatter_rows writes, wherever the rows start relative to the
/// 32-byte alignment of its non-temporal stores, into rows of their own or wider ones.
template <int W>
void test_stream(int64_t n, int count, int64_t offset, int64_t dst_stride) {
  const std::vector<float> lanes = random_floats(static_cast<size_t>(n * W));
  const float sentinel = 12345.f;
  std::vector<float> expected(static_cast<size_t>(dst_stride * W + offset + 8), sentinel), streamed(expected);
  std::vector<float> stage(static_cast<size_t>(n * W));
  scatter_rows<W>(n, lanes.data(), count, expected.data() + offset, dst_stride);
  stream_rows<W>(n, lanes.data(), count, streamed.data() + offset, dst_stride, stage.data());
  finish_streaming();
  EXPECT_TRUE(streamed == expected);
}

/// MatrixGather: the lower triangle of each sample's k x k matrix (row-major, `stride` apart),
/// lane-minor, through the transposes (of the whole matrix, or with a runtime k of the spans
/// that hold the lower triangle, the last of which may end in a partial step) or one entry at
/// a time. Exactly as many floats as the matrices need, as in test_gathers.
template <int W, int kK = 0>
void test_matrix_gather(int64_t k, int count, int64_t stride) {
  const std::vector<float> a = random_floats(static_cast<size_t>((count - 1) * stride + k * k));
  std::vector<float> lanes(static_cast<size_t>(k * k * W));
  const MatrixGather<W, kK> gather(k);
  gather(a.data(), stride, count, lanes.data());
  for (int l = 0; l < W; ++l) {
    const int64_t sample = std::min(l, count - 1);
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t j = 0; j <= i; ++j) EXPECT_TRUE(lanes[(i * k + j) * W + l] == a[sample * stride + i * k + j]);
    }
  }
}

/// The gathers with a compile-time size: full blocks of back-to-back rows take the unrolled
/// path with fixed row offsets; partial blocks, padded rows and shared operands the general one.
template <int kN>
void test_static_gathers() {
  for (int count : {1, 7, 8, 16, 32}) {
    for (int64_t stride : {int64_t{kN}, int64_t{kN + 1}, int64_t{0}}) {
      if (count <= 16) test_gathers<16, kN>(kN, count, stride);
      test_gathers<32, kN>(kN, count, stride);
      if (count <= 8) test_gathers<8, kN>(kN, count, stride);
    }
  }
}

template <int kK>
void test_static_matrix_gathers() {
  for (int count : {1, 5, 16}) {
    test_matrix_gather<16, kK>(kK, count, kK * kK);
    test_matrix_gather<16, kK>(kK, count, kK * kK + 5);
  }
  test_matrix_gather<32, kK>(kK, 32, kK * kK);
}

}  // namespace

int main() {
  // Every level this CPU runs: the transposes at avx2 and above, the plain loops at baseline.
  for (int level = 0; level <= static_cast<int>(best_supported_simd()); ++level) {
    set_simd_level(static_cast<SimdLevel>(level));
    for (int64_t n : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 36, 289}) {
      for (int count : {1, 3, 7, 8, 9, 16}) {
        test_gathers<16>(n, count, n);
        test_gathers<16>(n, count, n + 3);
        test_gathers<16>(n, count, 0);  // an operand shared by the batch
        test_scatter<16>(n, count, n);
        test_scatter<16>(n, count, n + 5);  // a stretch of wider rows (a policy head's gradient)
        for (int64_t offset : {0, 1, 3, 7}) {
          test_stream<16>(n, count, offset, n);
          test_stream<16>(n, count, offset, n + 3);
        }
        test_gathers<32>(n, count, n + 1);
        test_scatter<32>(n, count + 16, n);
        test_stream<32>(n, count + 16, 5, n);
        if (count <= 8) {
          test_gathers<8>(n, count, n);
          test_scatter<8>(n, count, n);
          test_scatter<8>(n, count, 2 * n + 1);
        }
      }
    }
    for (int64_t k : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 32}) {
      for (int count : {1, 5, 8}) {
        test_matrix_gather<8>(k, count, k * k);
        test_matrix_gather<16>(k, count, k * k);
        test_matrix_gather<16>(k, count, k * k + 5);
        test_matrix_gather<16>(k, count, 0);  // a matrix shared by the batch
      }
    }
    test_static_gathers<1>(), test_static_gathers<2>(), test_static_gathers<3>(), test_static_gathers<4>();
    test_static_gathers<5>(), test_static_gathers<6>(), test_static_gathers<7>(), test_static_gathers<8>();
    test_static_gathers<21>(), test_static_gathers<36>();
    test_static_matrix_gathers<1>(), test_static_matrix_gathers<3>(), test_static_matrix_gathers<6>();
    test_static_matrix_gathers<8>();
    std::printf("lanes at SIMD level %s: %s (%s)\n", simd_level_name(simd_level()), failures() == 0 ? "ok" : "FAILED",
                level == 0 ? "plain loops" : "AVX2 register transposes");
  }
  return failures();
}
