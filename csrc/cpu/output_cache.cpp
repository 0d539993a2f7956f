// The CPU output cache: large op outputs reuse blocks that earlier outputs freed.
//
// A training loop asks for the same large outputs every step: the (B, k, k) gradient of a
// per-sample scale_tril is 9 MB at B = 65536, k = 6, and 75 MB at k = 17. glibc serves such a
// request from its heap when a free piece of that size happens to be there, and otherwise from
// fresh pages, which the kernel zeroes as the op first writes them. That fault-and-zero pass
// costs about as much as the backward kernel, and whether it happens depends on every other
// allocation in the process: a k = 6 log-prob forward+backward took 3.0 ms in a loop of its
// own and 4.8 ms with torch.distributions' step interleaved (86 page faults per step against
// 15). Handing back a freed block of the same size skips the pass, whatever else allocates.
//
// The cache keeps at most a limit of freed bytes (FUSEDGAUSS_CPU_OUTPUT_CACHE_MB, read at the
// first large output, default 256), dropping the oldest blocks first, and never holds a block
// a tensor still uses. A limit of 0 turns it off: outputs then come from at::empty, with the
// huge-page advice alone. Blocks are sized in whole huge pages, so a batch a few samples
// smaller usually finds the same block.

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <vector>

#include "../common/outputs.h"

namespace fusedgauss {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
/// Smaller outputs take at::empty: glibc reuses small blocks well, and faulting in a few
/// pages costs little next to the kernel.
constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr int64_t kDefaultLimitMegabytes = 256;
constexpr const char* kLimitVariable = "FUSEDGAUSS_CPU_OUTPUT_CACHE_MB";

int64_t limit_from_environment() {
  const char* text = std::getenv(kLimitVariable);
  if (text == nullptr || *text == '\0') return kDefaultLimitMegabytes << 20;
  char* end = nullptr;
  errno = 0;
  const long long megabytes = std::strtoll(text, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && megabytes >= 0 && megabytes <= (int64_t{1} << 30), kLimitVariable,
              " must be a whole number of megabytes, 0 or more; got '", text, "'");
  return static_cast<int64_t>(megabytes) << 20;
}

/// Asks for transparent huge pages on the whole 2 MB pages inside [data, data + bytes), before
/// they are first written. Advice only: an old kernel, or THP "never", leaves ordinary pages.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = (begin + bytes) & ~(kHugePage - 1);
  if (aligned_end > aligned_begin) {
    (void)madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

struct Block {
  void* data;
  size_t bytes;
};

class OutputCache final : public c10::Allocator {
 public:
  explicit OutputCache(int64_t limit_bytes) : limit_bytes_(limit_bytes) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (std::max(nbytes, size_t{1}) + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take(bytes);
    if (data == nullptr) data = fresh(bytes);
    return {data, new Block{data, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() const { return limit_bytes_.load(std::memory_order_relaxed) > 0; }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, static_cast<int64_t>(kept_.size()), limit_bytes_.load(std::memory_order_relaxed), hits_,
            misses_};
  }

  void set_limit(int64_t bytes) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_.store(bytes, std::memory_order_relaxed);
      evict_beyond_limit(evicted);
    }
    release(evicted);
  }

 private:
  /// A kept block of exactly `bytes`, the most recently freed first (its lines are likelier
  /// to be in cache), or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        cached_bytes_ -= static_cast<int64_t>(bytes);
        kept_.erase(std::next(it).base());
        ++hits_;
        return data;
      }
    }
    ++misses_;
    return nullptr;
  }

  static void* fresh(size_t bytes) {
    void* data = std::aligned_alloc(kHugePage, bytes);
    TORCH_CHECK(data != nullptr, "fusedgauss: not enough memory: tried to allocate ", bytes, " bytes for an output");
    advise_huge_pages(data, bytes);
    return data;
  }

  static void give_back(void* context);

  void keep(const Block& block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(block.bytes) > limit_bytes_) {
        evicted.push_back(block);  // too big to keep: it must not push out the blocks that fit
      } else {
        kept_.push_back(block);
        cached_bytes_ += static_cast<int64_t>(block.bytes);
        evict_beyond_limit(evicted);
      }
    }
    release(evicted);
  }

  void evict_beyond_limit(std::vector<Block>& evicted) {
    while (cached_bytes_ > limit_bytes_) {
      evicted.push_back(kept_.front());
      cached_bytes_ -= static_cast<int64_t>(kept_.front().bytes);
      kept_.pop_front();
    }
  }

  static void release(const std::vector<Block>& blocks) {
    for (const Block& block : blocks) std::free(block.data);
  }

  std::mutex mutex_;
  std::deque<Block> kept_;  // oldest first
  int64_t cached_bytes_ = 0;
  std::atomic<int64_t> limit_bytes_;  // written under the lock; enabled() reads it without
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

/// Never destroyed: tensors may be freed during static destruction, after any cache object
/// would be gone.
OutputCache& output_cache() {
  static OutputCache* cache = new OutputCache(limit_from_environment());
  return *cache;
}

void OutputCache::give_back(void* context) {
  const Block block = *static_cast<Block*>(context);
  delete static_cast<Block*>(context);
  output_cache().keep(block);
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU || options.pinned_memory()) return at::empty(shape, options);
  int64_t nbytes = static_cast<int64_t>(options.dtype().itemsize());
  for (int64_t size : shape) nbytes *= size;
  if (nbytes < static_cast<int64_t>(kMinCachedBytes)) return at::empty(shape, options);
  OutputCache& cache = output_cache();
  if (!cache.enabled()) {
    at::Tensor out = at::empty(shape, options);
    advise_huge_pages(out.data_ptr(), static_cast<size_t>(nbytes));
    return out;
  }
  return at::detail::empty_generic(shape, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), options.memory_format_opt());
}

OutputCacheStats cpu_output_cache_stats() { return output_cache().stats(); }

void set_cpu_output_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_output_cache_limit: the limit must be 0 or more bytes, got ", bytes);
  output_cache().set_limit(bytes);
}

}  // namespace fusedgauss
