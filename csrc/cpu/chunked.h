#pragma once
// Parallel loops over the batch whose reductions are bitwise reproducible.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace fusedgauss {
namespace cpu {

/// Samples per task when each sample costs about `work_per_sample` multiply-adds: enough
/// work (about 32k) to amortise scheduling.
inline int64_t grain_size(int64_t work_per_sample) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, work_per_sample));
}

/// Splits [0, n) into a number of chunks that depends on n and the grain alone, never on the
/// thread count, and runs fn(chunk, begin, end) for each, in parallel. Per-chunk partial
/// sums added in chunk order therefore give the same bits on any machine.
class Chunks {
 public:
  static constexpr int64_t kMaxChunks = 64;

  Chunks(int64_t n, int64_t grain)
      : n_(n), count_(std::clamp<int64_t>((n + grain - 1) / grain, 1, kMaxChunks)) {}

  int64_t count() const { return count_; }

  template <typename F>
  void run(const F& fn) const {
    at::parallel_for(0, count_, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        fn(c, n_ * c / count_, n_ * (c + 1) / count_);
      }
    });
  }

  /// run(fn) with each chunk in with_best_simd<kWidest> (simd.h); fn must be a lambda marked
  /// FUSEDGAUSS_INLINE_BODY.
  template <SimdLevel kWidest = SimdLevel::kAvx512, typename F>
  void run_vectorised(const F& fn) const {
    run([&](int64_t chunk, int64_t begin, int64_t end) {
      with_best_simd<kWidest>([&]() FUSEDGAUSS_INLINE_BODY { fn(chunk, begin, end); });
    });
  }

 private:
  int64_t n_;
  int64_t count_;
};

/// Per-chunk partial sums of a gradient of `width` entries, reduced in chunk order.
template <typename acc_t>
class ChunkPartials {
 public:
  ChunkPartials() = default;
  ChunkPartials(const Chunks& chunks, int64_t width)
      : width_(width), sums_(static_cast<size_t>(chunks.count() * width), acc_t(0)) {}

  acc_t* chunk(int64_t c) { return sums_.data() + c * width_; }

  std::vector<acc_t> total() const {
    std::vector<acc_t> out(static_cast<size_t>(width_), acc_t(0));
    for (size_t base = 0; base < sums_.size(); base += static_cast<size_t>(width_)) {
      for (int64_t i = 0; i < width_; ++i) {
        out[i] += sums_[base + i];
      }
    }
    return out;
  }

 private:
  int64_t width_ = 0;
  std::vector<acc_t> sums_;
};

}  // namespace cpu
}  // namespace fusedgauss
