// standard_normal_(self, generator): torch's CPU Tensor.normal_() (mean 0, std 1), bit for bit
// and leaving the generator where torch leaves it, drawn faster (2.5-3x as fast on one
// thread, where torch runs on one anyway; 4.5-5x on two). It is the noise of every
// reparameterised sample, and at a SAC batch it cost torch as much as the squashed log-prob's
// kernels did.
//
// Torch fills a contiguous float32 tensor of 16 or more entries (normal_fill in
// ATen/native/cpu/DistributionTemplates.h) in two passes: one uniform per entry from the
// generator's mt19937, (w & (2^24 - 1)) * 2^-24 of each tempered word w, each through an
// out-of-line call; then a Box-Muller transform of each run of 16 (NormalFill16: entries j
// and j + 8 from the pair u1 = 1 - x_j, u2 = x_{j+8}), with a last, overlapping run of 16 fresh
// uniforms when the size is not a multiple of 16. The transform is AVX2 code (avx_mathfun's
// log256_ps and sincos256_ps) where torch's CPU capability is AVX2 or AVX512, and scalar libm
// otherwise.
//
// Here each thread takes a stretch of the runs of 16. It moves its own copy of the generator's
// state to the stretch's first word (by the state's twists alone: each of the 624 words of a
// state is one draw, so whole states are skipped without tempering a word), then draws its
// words 64 runs at a time into a small buffer and turns each run into its 16 normals
// straight away: tempered, masked and scaled as torch's uniforms, through the very same
// Box-Muller arithmetic (torch's own avx_mathfun.h, or the same libm calls), in cache. The
// thread with the last stretch hands back the state torch would end in. Anything else
// (another dtype, a non-contiguous or small tensor, a CPU capability whose transform is not
// mirrored here) is torch's normal_ itself, so the numbers never depend on which path drew
// them. The AVX2 bits also rest on this build contracting avx_mathfun's multiplies and adds
// into FMAs as torch's did; tests/test_noise.py compares every path bit for bit with torch.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <c10/util/MathConstants.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

#include "standard_normal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDGAUSS_MIRRORS_TORCH_NORMAL 1
#include <immintrin.h>
// torch's avx_mathfun.h compiles only where CPU_CAPABILITY_AVX2 is defined (its AVX2 kernels'
// translation units); its functions are built here for AVX2+FMA, as there.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CPU_CAPABILITY_AVX2
#include <ATen/native/cpu/avx_mathfun.h>
#undef CPU_CAPABILITY_AVX2
#pragma GCC pop_options
#endif

// An AVX2 clone beside the baseline code, chosen when the library loads (an ifunc: GCC, ELF).
#if defined(FUSEDGAUSS_MIRRORS_TORCH_NORMAL) && defined(__ELF__)
#define FUSEDGAUSS_WITH_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define FUSEDGAUSS_WITH_AVX2_CLONE
#endif

namespace fusedgauss {
namespace cpu {
namespace {

/// Entries per Box-Muller run, as torch's NormalFill16.
constexpr int64_t kRun = 16;
/// Runs per parallel task, and per fill of a thread's word buffer.
constexpr int64_t kRunsPerTask = 1024;
constexpr int64_t kBufferedRuns = 64;
/// torch's uniform_real_distribution<float>: the low 24 bits of a tempered word, times 2^-24.
constexpr uint32_t kUniformMask = (uint32_t{1} << 24) - 1;
constexpr float kUniformScale = 1.0f / (1 << 24);

/// mt19937's next_state, as at::mt19937 runs it on its 624 words. Both loops vectorise (the
/// second reads words written 227 steps before); the AVX2 clone, which the loader picks where
/// the CPU has it, twists a state in 0.08 us against the SSE2 build's 0.26 us. It matters
/// because the thread that starts furthest into the output twists past every state before
/// its own.
FUSEDGAUSS_WITH_AVX2_CLONE void next_state(uint32_t* s) {
  constexpr int n = at::MERSENNE_STATE_N, m = at::MERSENNE_STATE_M;
  const auto twist = [](uint32_t u, uint32_t v) {
    return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1) ? at::MATRIX_A : 0);
  };
  for (int i = 0; i < n - m; ++i) s[i] = s[i + m] ^ twist(s[i], s[i + 1]);
  for (int i = n - m; i < n - 1; ++i) s[i] = s[i + m - n] ^ twist(s[i], s[i + 1]);
  s[n - 1] = s[m - 1] ^ twist(s[n - 1], s[0]);
}

/// The raw (untempered) words of an at::mt19937 state, in draw order. Taking or skipping
/// `count` words moves the state as `count` calls of at::mt19937 move it: a call decrements
/// left_ and twists the state when that reaches 0, so a state holds left_ - 1 untaken words
/// from next_ on.
class WordStream {
 public:
  explicit WordStream(const at::mt19937_data_pod& state) : state_(state) {}

  void skip(int64_t count) { advance(count, nullptr); }
  void take(int64_t count, uint32_t* out) { advance(count, out); }
  const at::mt19937_data_pod& state() const { return state_; }

 private:
  void advance(int64_t count, uint32_t* out) {
    while (count > 0) {
      if (state_.left_ == 1) {
        next_state(state_.state_.data());
        state_.left_ = at::MERSENNE_STATE_N + 1;
        state_.next_ = 0;
      }
      const int64_t taken = std::min<int64_t>(count, state_.left_ - 1);
      if (out != nullptr) {
        std::memcpy(out, state_.state_.data() + state_.next_, static_cast<size_t>(taken) * sizeof(uint32_t));
        out += taken;
      }
      state_.next_ += static_cast<uint32_t>(taken);
      state_.left_ -= static_cast<int>(taken);
      count -= taken;
    }
  }

  at::mt19937_data_pod state_;
};

/// Turns `runs` runs of 16 raw words each into their 16 normals each. One call per buffer of
/// runs rather than per run: a run's transform is a long chain (a log, then a square root; a
/// sine and cosine), and in one loop the CPU overlaps the chains of consecutive runs (AVX2:
/// 1.85 -> 1.38 ns a normal, one thread).
using RunsTransform = void (*)(const uint32_t* words, float* out, int64_t runs);

/// NormalFill16<float> of torch's scalar build (mean 0, std 1) of a run's uniforms.
inline void normal_fill_16_scalar(const uint32_t* words, float* out) {
  const float mean = 0, std_dev = 1;
  float data[kRun];
  for (int64_t i = 0; i < kRun; ++i) {
    uint32_t y = words[i];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= (y >> 18);
    data[i] = static_cast<float>(y & kUniformMask) * kUniformScale;
  }
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1 - data[j];
    const float u2 = data[j + 8];
    const float radius = std::sqrt(-2 * std::log(u1));
    const float theta = 2.0f * c10::pi<double> * u2;
    out[j] = std::fma(radius * std::cos(theta), std_dev, mean);
    out[j + 8] = std::fma(radius * std::sin(theta), std_dev, mean);
  }
}

void normals_scalar(const uint32_t* words, float* out, int64_t runs) {
  for (int64_t r = 0; r < runs; ++r) normal_fill_16_scalar(words + r * kRun, out + r * kRun);
}

#ifdef FUSEDGAUSS_MIRRORS_TORCH_NORMAL
/// Eight of torch's uniforms from eight raw words.
__attribute__((target("avx2,fma"))) inline __m256 uniforms_avx2(const uint32_t* words) {
  __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 11));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 7), _mm256_set1_epi32(0x9d2c5680)));
  y = _mm256_xor_si256(y, _mm256_and_si256(_mm256_slli_epi32(y, 15), _mm256_set1_epi32(0xefc60000)));
  y = _mm256_xor_si256(y, _mm256_srli_epi32(y, 18));
  const __m256i low_bits = _mm256_and_si256(y, _mm256_set1_epi32(kUniformMask));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(low_bits), _mm256_set1_ps(kUniformScale));
}

/// NormalFill16<float> of torch's AVX2 build (mean 0, std 1) of a run's uniforms.
__attribute__((target("avx2,fma"), always_inline)) inline void normal_fill_16_avx2(const uint32_t* words, float* out) {
  const __m256 two_pi = _mm256_set1_ps(2.0f * c10::pi<double>);
  const __m256 one = _mm256_set1_ps(1.0f), minus_two = _mm256_set1_ps(-2.0f);
  const __m256 mean = _mm256_set1_ps(0.0f), std_dev = _mm256_set1_ps(1.0f);
  const __m256 u1 = _mm256_sub_ps(one, uniforms_avx2(words));
  const __m256 u2 = uniforms_avx2(words + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(two_pi, u2);
  __m256 sin_theta, cos_theta;
  sincos256_ps(theta, &sin_theta, &cos_theta);
  _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_mul_ps(radius, cos_theta), std_dev, mean));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sin_theta), std_dev, mean));
}

__attribute__((target("avx2,fma"))) void normals_avx2(const uint32_t* words, float* out, int64_t runs) {
  for (int64_t r = 0; r < runs; ++r) normal_fill_16_avx2(words + r * kRun, out + r * kRun);
}
#endif

struct MirroredTransform {
  RunsTransform transform;
  const char* name;
};

/// The transform torch's normal_fill runs at this CPU capability, or none where this file
/// does not mirror it. At the AVX512 capability torch runs its AVX2 normal_ kernel: normal_stub
/// is registered with REGISTER_DISPATCH, which leaves a stub's AVX512 slot empty (only
/// ALSO_REGISTER_AVX512_DISPATCH fills it), so the dispatcher falls back to the AVX2 one. On an
/// AVX-512 machine (torch 2.14) normal_ at AVX512 and at AVX2 gave the same bits over 8M draws,
/// and at DEFAULT other ones; tests/test_noise.py compares them where the CPU has it.
const MirroredTransform& torch_transform() {
  static const MirroredTransform chosen = []() -> MirroredTransform {
#ifdef FUSEDGAUSS_MIRRORS_TORCH_NORMAL
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX2" || capability == "AVX512") return {&normals_avx2, "avx2"};
    if (capability == "DEFAULT" || capability == "NO AVX") return {&normals_scalar, "scalar"};
#endif
    return {nullptr, nullptr};
  }();
  return chosen;
}

void standard_normal_(at::Tensor& self, const std::optional<at::Generator>& generator) {
  const RunsTransform transform = torch_transform().transform;
  if (transform == nullptr || self.scalar_type() != at::kFloat || !self.is_contiguous() || self.numel() < kRun) {
    self.normal_(0, 1, generator);
    return;
  }
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  float* data = self.data_ptr<float>();
  const int64_t size = self.numel(), runs = size / kRun;
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  const at::mt19937_data_pod start = engine.data();
  at::mt19937_data_pod end = start;
  at::parallel_for(0, runs, kRunsPerTask, [&](int64_t begin, int64_t stop) {
    WordStream words(start);
    words.skip(begin * kRun);
    uint32_t buffer[kBufferedRuns * kRun];
    for (int64_t run = begin; run < stop; run += kBufferedRuns) {
      const int64_t count = std::min(kBufferedRuns, stop - run);
      words.take(count * kRun, buffer);
      transform(buffer, data + run * kRun, count);
    }
    if (stop == runs) end = words.state();
  });
  // Torch draws a uniform for every entry, the last size % 16 too, and then redraws the last
  // 16 entries when the size is not a multiple of 16.
  if (size % kRun != 0) {
    WordStream words(end);
    uint32_t buffer[kRun];
    words.skip(size % kRun);
    words.take(kRun, buffer);
    transform(buffer, data + size - kRun, 1);
    end = words.state();
  }
  engine.set_data(end);
  gen->set_engine(engine);
}

}  // namespace

const char* mirrored_normal_transform() { return torch_transform().name; }

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) { m.impl("standard_normal_", &standard_normal_); }

}  // namespace cpu
}  // namespace fusedgauss
