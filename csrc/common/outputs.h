#pragma once
// Allocation of kernel outputs, and the CPU output cache behind it (csrc/cpu/output_cache.cpp).

#include <ATen/ATen.h>

#include <cstdint>

namespace fusedgauss {

/// at::empty for an op's output. On the CPU, an output of a megabyte or more takes a block of
/// the same size freed by an earlier output, when the output cache holds one; otherwise a
/// fresh block. Either way its whole 2 MB pages are advised to be transparent huge pages.
/// Other devices: at::empty (CUDA has its own caching allocator).
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

/// What the CPU output cache holds, and how often it served a request.
struct OutputCacheStats {
  int64_t cached_bytes;  // in freed blocks kept for reuse
  int64_t cached_blocks;
  int64_t limit_bytes;   // cached_bytes never exceeds it
  int64_t hits;          // requests served from a kept block
  int64_t misses;        // requests that took a fresh block (of cacheable size, cache on)
};

/// The cache's state. Throws if FUSEDGAUSS_CPU_OUTPUT_CACHE_MB is malformed.
OutputCacheStats cpu_output_cache_stats();

/// Keeps at most `bytes` of freed blocks from now on, releasing the oldest kept blocks beyond
/// it. 0 turns the cache off: outputs come from at::empty, and blocks it handed out go back to
/// the system when freed.
void set_cpu_output_cache_limit(int64_t bytes);

}  // namespace fusedgauss
