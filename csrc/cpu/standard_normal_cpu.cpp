// standard_normal_(self, generator): torch's CPU Tensor.normal_() (mean 0, std 1), bit for bit
// and leaving the generator where torch leaves it, drawn faster (on a Zen 4 core: 2.8x as fast
// on one thread, where torch runs on one anyway, 3.5-3.9x with AVX-512; 5-6x on two). It is
// the noise of every reparameterised sample, and at a SAC batch it cost torch as much as the
// squashed log-prob's kernels did.
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
// Box-Muller arithmetic (torch's own avx_mathfun.h, the same operations on 16 lanes where the
// CPU kernels run AVX-512, or the same libm calls), in cache. The thread with the last stretch
// hands back the state torch would end in. Anything else (another dtype, a non-contiguous or
// small tensor, a CPU capability whose transform is not mirrored here) is torch's normal_
// itself, so the numbers never depend on which path drew them. The AVX2 bits also rest on this
// build contracting avx_mathfun's multiplies and adds into FMAs as torch's did;
// tests/test_noise.py compares every path bit for bit with torch.

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

#include "simd.h"
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

// The same transform with 16 lanes, two runs at once, where the CPU kernels run AVX-512: torch's
// log256_ps and sincos256_ps, operation for operation (each lane's arithmetic, FMA contraction
// included, is the 8-lane code's, so the bits are the same: compared with avx_mathfun over all
// 2^24 uniforms, and with torch's normal_ in tests/test_noise.py). Each run's transform is a
// long chain of dependent steps; one chain of 16-lane instructions for two runs took the
// transform from 1.25 to 0.87 ns a normal on one Zen 4 core (which runs AVX-512 as two
// 256-bit halves). Written with GCC vector extensions rather than _mm512 intrinsics (whose
// comparisons give bit masks, not vectors), so that the code reads as avx_mathfun's, step for step.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace lanes16 {

typedef float Floats __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));
typedef uint32_t Words __attribute__((vector_size(64)));

inline Ints bits(Floats x) { return reinterpret_cast<Ints>(x); }
inline Floats floats(Ints x) { return reinterpret_cast<Floats>(x); }
inline Floats splat(float value) { return Floats{} + value; }
/// Bit 2 of each lane (0 or 4) moved to the sign bit (_mm256_slli_epi32(.., 29)).
inline Floats sign_from_bit_2(Ints bit_2) {
  return floats(reinterpret_cast<Ints>(reinterpret_cast<Words>(bit_2) << 29));
}

/// avx_mathfun's log256_ps (Cephes' logf; NaN for x <= 0).
inline Floats log_ps(Floats x) {
  const Floats one = splat(1.0f);
  const Ints invalid_mask = x <= Floats{};
  const Floats min_norm_pos = floats(Ints{} + 0x00800000);
  x = x > min_norm_pos ? x : min_norm_pos;  // _mm256_max_ps: cut off denormals
  Ints imm0 = reinterpret_cast<Ints>(reinterpret_cast<Words>(bits(x)) >> 23);
  x = floats(bits(x) & ~0x7f800000);  // keep the fractional part
  x = floats(bits(x) | bits(splat(0.5f)));
  imm0 = imm0 - 0x7f;
  Floats e = __builtin_convertvector(imm0, Floats);
  e = e + one;
  const Ints mask = x < splat(0.707106781186547524f);  // cephes_SQRTHF
  Floats tmp = floats(bits(x) & mask);
  x = x - one;
  e = e - floats(bits(one) & mask);
  x = x + tmp;
  const Floats z = x * x;
  Floats y = splat(7.0376836292E-2f);  // cephes_log_p0, then y = y x + p1 .. p8 as there
  for (const float p : {-1.1514610310E-1f, 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                        2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f}) {
    y = y * x;
    y = y + p;
  }
  y = y * x;
  y = y * z;
  tmp = e * -2.12194440e-4f;  // cephes_log_q1
  y = y + tmp;
  tmp = z * 0.5f;
  y = y - tmp;
  tmp = e * 0.693359375f;  // cephes_log_q2
  x = x + y;
  x = x + tmp;
  return floats(bits(x) | invalid_mask);
}

/// avx_mathfun's sincos256_ps (Cephes' sinf and cosf).
inline void sincos_ps(Floats x, Floats* s, Floats* c) {
  Floats sign_bit_sin = x;
  x = floats(bits(x) & ~int32_t(0x80000000));  // the absolute value
  sign_bit_sin = floats(bits(sign_bit_sin) & int32_t(0x80000000));
  Floats y = x * 1.27323954473516f;  // 4 / pi
  Ints imm2 = __builtin_convertvector(y, Ints);  // truncated, as _mm256_cvttps_epi32
  imm2 = imm2 + 1;
  imm2 = imm2 & ~1;
  y = __builtin_convertvector(imm2, Floats);
  Ints imm4 = imm2;
  const Floats swap_sign_bit_sin = sign_from_bit_2(imm2 & 4);
  const Ints poly_mask = (imm2 & 2) == 0;
  // Extended precision modular arithmetic: x = ((x - y DP1) - y DP2) - y DP3.
  const Floats xmm1 = y * -0.78515625f, xmm2 = y * -2.4187564849853515625e-4f, xmm3 = y * -3.77489497744594108e-8f;
  x = x + xmm1;
  x = x + xmm2;
  x = x + xmm3;
  imm4 = imm4 - 2;
  imm4 = ~imm4 & 4;
  const Floats sign_bit_cos = sign_from_bit_2(imm4);
  sign_bit_sin = floats(bits(sign_bit_sin) ^ bits(swap_sign_bit_sin));
  const Floats z = x * x;
  y = splat(2.443315711809948E-005f);  // the cosine's polynomial, 0 <= x <= pi/4
  y = y * z;
  y = y + -1.388731625493765E-003f;
  y = y * z;
  y = y + 4.166664568298827E-002f;
  y = y * z;
  y = y * z;
  const Floats tmp = z * 0.5f;
  y = y - tmp;
  y = y + 1.0f;
  Floats y2 = splat(-1.9515295891E-4f);  // the sine's
  y2 = y2 * z;
  y2 = y2 + 8.3321608736E-3f;
  y2 = y2 * z;
  y2 = y2 + -1.6666654611E-1f;
  y2 = y2 * z;
  y2 = y2 * x;
  y2 = y2 + x;
  const Floats ysin2 = floats(poly_mask & bits(y2));
  const Floats ysin1 = floats(~poly_mask & bits(y));
  y2 = y2 - ysin2;
  y = y - ysin1;
  *s = floats(bits(ysin1 + ysin2) ^ bits(sign_bit_sin));
  *c = floats(bits(y + y2) ^ bits(sign_bit_cos));
}

/// Torch's uniforms from 16 raw words, as uniforms_avx2.
inline Floats uniforms(const uint32_t* words) {
  Words y;
  std::memcpy(&y, words, sizeof(y));
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return __builtin_convertvector(reinterpret_cast<Ints>(y & kUniformMask), Floats) * kUniformScale;
}

/// normal_fill_16_avx2 of two consecutive runs: lanes 0-7 are the first run's, 8-15 the second's.
__attribute__((always_inline)) inline void normal_fill_32(const uint32_t* words, float* out) {
  const Floats first = uniforms(words), second = uniforms(words + kRun);
  // u1 of a run is its uniforms 0-7, u2 its uniforms 8-15.
  const Ints low_halves = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const Ints high_halves = low_halves + 8;
  const Floats u1 = 1.0f - __builtin_shuffle(first, second, low_halves);
  const Floats u2 = __builtin_shuffle(first, second, high_halves);
  // (maskz with every lane: _mm512_sqrt_ps's undefined pass-through trips GCC 12's -Wmaybe-uninitialized)
  const Floats radius =
      reinterpret_cast<Floats>(_mm512_maskz_sqrt_ps(__mmask16(0xffff), reinterpret_cast<__m512>(-2.0f * log_ps(u1))));
  const Floats theta = static_cast<float>(2.0f * c10::pi<double>) * u2;
  Floats sin_theta, cos_theta;
  sincos_ps(theta, &sin_theta, &cos_theta);
  // + 0 as torch's fmadd(.., std 1, mean 0), which turns -0 into +0.
  const Floats cosines = radius * cos_theta + 0.0f, sines = radius * sin_theta + 0.0f;
  const Floats first_out = __builtin_shuffle(cosines, sines, low_halves);
  const Floats second_out = __builtin_shuffle(cosines, sines, high_halves);
  std::memcpy(out, &first_out, sizeof(first_out));
  std::memcpy(out + kRun, &second_out, sizeof(second_out));
}

}  // namespace lanes16

void normals_avx512(const uint32_t* words, float* out, int64_t runs) {
  int64_t r = 0;
  for (; r + 2 <= runs; r += 2) lanes16::normal_fill_32(words + r * kRun, out + r * kRun);
  if (r < runs) normal_fill_16_avx2(words + r * kRun, out + r * kRun);
}
#pragma GCC pop_options
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

/// The transform that draws here: torch's, with 16 lanes where the CPU kernels run AVX-512.
RunsTransform drawing_transform() {
  const RunsTransform torchs = torch_transform().transform;
#ifdef FUSEDGAUSS_MIRRORS_TORCH_NORMAL
  if (torchs == &normals_avx2 && simd_level() == SimdLevel::kAvx512) return &normals_avx512;
#endif
  return torchs;
}

void standard_normal_(at::Tensor& self, const std::optional<at::Generator>& generator) {
  const RunsTransform transform = drawing_transform();
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
