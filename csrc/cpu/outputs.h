#pragma once
// Allocation of large kernel outputs.

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fusedgauss {
namespace cpu {

/// at::empty, asking Linux for transparent huge pages on a large output before it is first
/// written. A per-sample gradient of (B, k, k) is tens of megabytes of fresh memory on every
/// backward; on a machine where THP is "madvise", faulting it in 4 KiB pages costs several
/// times the kernel itself. (PyTorch does the same for all allocations when
/// THP_MEM_ALLOC_ENABLE=1 is set.) Memory that was already touched is unaffected.
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end > aligned_begin) {
    // Advice only: failure (an old kernel, THP "never") leaves ordinary pages.
    (void)madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace cpu
}  // namespace fusedgauss
