// CPU kernels of the ops whose event entries are independent (a diagonal base):
//   diag_normal_log_prob(value, loc, scale)                      and its backward
//   squashed_diag_log_prob(value, loc, scale, value_is_pre_tanh) and its backward
//   squashed_diag_rsample_log_prob(loc, scale, eps)              and its backward
//   tanh_log_abs_det_jacobian(u)                                  and its backward
// A chunk of the batch is walked in blocks of rows. In a block every operand is one
// contiguous run of acc_t entries (a per-sample operand read in place, or converted from
// half; a shared one tiled once per chunk), so the entry math of csrc/math/squash_math.h runs
// in flat loops that vectorise (with AVX2 where the CPU has it, csrc/cpu/simd.h); the sums over
// each row's entries follow.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/op_wrappers.h"
#include "../math/gaussian_math.h"
#include "../math/squash_math.h"
#include "chunked.h"
#include "gradient_sink.h"
#include "lanes.h"
#include "simd.h"

namespace fusedgauss {
namespace cpu {
namespace {

using math::Squash;

/// Entries per block: the block's operands and results stay in L1.
constexpr int64_t kBlockEntries = 1024;

int64_t rows_per_block(int64_t k) { return std::max<int64_t>(1, kBlockEntries / std::max<int64_t>(k, 1)); }

/// Rows per block in the chunk [begin, end): no more than the chunk has, so that a shared
/// operand's tile and the block scratch, built per chunk, are only as large as it uses (a
/// small batch has chunks of a few dozen rows).
int64_t block_rows_in(int64_t k, int64_t begin, int64_t end) { return std::min(rows_per_block(k), end - begin); }

/// Multiply-adds per entry, about, for the grain size: the exp and logs of a squashed entry.
constexpr int64_t kWorkPerEntry = 64;

// The loops over a block's entries. Each is a function whose pointer arguments are restrict,
// so that after inlining the compiler knows its arrays do not overlap and vectorises without
// runtime alias checks (too many of which make it give up).

/// For a per-sample scale's sum of logs (BlockRowSums): the entry's mantissa to `mantissa`, and
/// the log of its power of two, which the entry's term subtracts.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t split_log_scale(acc_t s, acc_t& mantissa) {
  int32_t exponent = 0;
  mantissa = math::log_product_factor(s, exponent);
  return static_cast<acc_t>(exponent) * static_cast<acc_t>(math::kLog2);
}

/// kSplitScale: the scale is per-sample, and the loop splits its entries (split_log_scale) for
/// BlockRowSums.
template <Squash kSquash, bool kSplitScale, typename acc_t>
C10_ALWAYS_INLINE void log_prob_entries(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT x, const acc_t* FUSEDGAUSS_RESTRICT m,
                                        const acc_t* FUSEDGAUSS_RESTRICT s, acc_t eps, acc_t* FUSEDGAUSS_RESTRICT out,
                                        acc_t* FUSEDGAUSS_RESTRICT scale_mantissas) {
  for (int64_t e = 0; e < n; ++e) {
    acc_t term = math::diag_log_prob_entry<kSquash>(x[e], m[e], s[e], eps);
    if constexpr (kSplitScale) term -= split_log_scale(s[e], scale_mantissas[e]);
    out[e] = term;
  }
}

/// kValue: whether the value's gradient is wanted. A policy gradient never wants it, and for a
/// squashed value it is the costly one (a tanh per entry), which the compiler drops with the
/// store.
template <Squash kSquash, bool kValue, typename acc_t>
C10_ALWAYS_INLINE void log_prob_gradient_entries(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT g,
                                                 const acc_t* FUSEDGAUSS_RESTRICT x, const acc_t* FUSEDGAUSS_RESTRICT m,
                                                 const acc_t* FUSEDGAUSS_RESTRICT s, acc_t eps,
                                                 acc_t* FUSEDGAUSS_RESTRICT d_value, acc_t* FUSEDGAUSS_RESTRICT d_loc,
                                                 acc_t* FUSEDGAUSS_RESTRICT d_scale) {
  for (int64_t e = 0; e < n; ++e) {
    const auto d = math::diag_log_prob_entry_gradients<kSquash>(x[e], m[e], s[e], eps);
    if constexpr (kValue) d_value[e] = g[e] * d.value;
    d_loc[e] = g[e] * d.loc;
    d_scale[e] = g[e] * d.scale;
  }
}

/// kFactored: each sample's sum of log-dets is taken as the log of a product, the one its
/// scale's sum of logs takes (split_log_scale_entries): each entry's log-prob term less the
/// log of its factor (math::TanhTerms), and the factor to `factors`. (A log1p per entry, with
/// its division, had cost the forward a sixth of its time: 65536 x 6, two threads, 0.335 ->
/// 0.279 ms; 65536 x 17, 1.03-1.15 -> 0.90 ms.)
template <bool kFactored, typename acc_t>
C10_ALWAYS_INLINE void rsample_entries(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT m, const acc_t* FUSEDGAUSS_RESTRICT s,
                                       const acc_t* FUSEDGAUSS_RESTRICT noise, acc_t* FUSEDGAUSS_RESTRICT action, acc_t* FUSEDGAUSS_RESTRICT pre_tanh,
                                       acc_t* FUSEDGAUSS_RESTRICT log_prob, acc_t* FUSEDGAUSS_RESTRICT factors) {
  for (int64_t e = 0; e < n; ++e) {
    const auto sample = math::diag_rsample_entry(m[e], s[e], noise[e]);
    action[e] = sample.action;
    pre_tanh[e] = sample.pre_tanh;
    if constexpr (kFactored) {
      log_prob[e] = sample.log_prob_linear;
      factors[e] = sample.log_det_factor;
    } else {
      log_prob[e] = sample.log_prob;
    }
  }
}

/// kNoise: whether the noise's gradient is wanted (a drawn sample's never is; computed and
/// dropped, it had cost the backward 3-5%: 65536 x 6, two threads, 0.227-0.236 -> 0.217-0.229
/// ms in alternating runs).
template <bool kNoise, typename acc_t>
C10_ALWAYS_INLINE void rsample_gradient_entries(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT g_action, const acc_t* FUSEDGAUSS_RESTRICT g_pre_tanh,
                                                const acc_t* FUSEDGAUSS_RESTRICT g_log_prob, const acc_t* FUSEDGAUSS_RESTRICT m,
                                                const acc_t* FUSEDGAUSS_RESTRICT s, const acc_t* FUSEDGAUSS_RESTRICT noise, acc_t* FUSEDGAUSS_RESTRICT d_loc,
                                                acc_t* FUSEDGAUSS_RESTRICT d_scale, acc_t* FUSEDGAUSS_RESTRICT d_noise) {
  for (int64_t e = 0; e < n; ++e) {
    const auto d = math::diag_rsample_entry_gradients(g_action[e], g_pre_tanh[e], g_log_prob[e], m[e], s[e], noise[e]);
    d_loc[e] = d.loc;
    d_scale[e] = d.scale;
    if constexpr (kNoise) d_noise[e] = d.eps;
  }
}

/// The split of split_log_scale in a loop of its own, of each scale entry times the factor
/// that `mantissas` holds for it on entry: terms[e] -= the log of s[e] mantissas[e]'s power of
/// two, and mantissas[e] = its mantissa.
template <typename acc_t>
C10_ALWAYS_INLINE void split_log_scale_entries(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT s, acc_t* FUSEDGAUSS_RESTRICT terms,
                                               acc_t* FUSEDGAUSS_RESTRICT mantissas) {
  for (int64_t e = 0; e < n; ++e) terms[e] -= split_log_scale(s[e] * mantissas[e], mantissas[e]);
}

template <typename acc_t>
C10_ALWAYS_INLINE void subtract_logs(int64_t n, const acc_t* FUSEDGAUSS_RESTRICT minuends, const acc_t* FUSEDGAUSS_RESTRICT x,
                                     acc_t* FUSEDGAUSS_RESTRICT out) {
  for (int64_t e = 0; e < n; ++e) out[e] = minuends[e] - math::log_(x[e]);
}

/// One (*, k) operand, or upstream gradient, block by block, as contiguous acc_t entries.
template <typename scalar_t>
class BlockRows {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  BlockRows(const BatchedOperand& operand, int64_t k, int64_t block_rows)
      : data_(operand.data.const_data_ptr<scalar_t>()), k_(k), shared_(operand.shared()) {
    if (shared_) {
      tile_.resize(static_cast<size_t>(block_rows * k));
      for (int64_t r = 0; r < block_rows; ++r) {
        for (int64_t i = 0; i < k; ++i) tile_[r * k + i] = static_cast<acc_t>(data_[i]);
      }
    } else if (!std::is_same_v<scalar_t, acc_t>) {
      tile_.resize(static_cast<size_t>(block_rows * k));
    }
  }

  /// Per-sample rows (*, k) at `rows_or_null` (an upstream gradient), or, null, zeros (for an
  /// output autograd passed no gradient for): a tile of them, filled once. (The SAC backward
  /// had copied its upstream gradients into scratch, and refilled zeros, every block: 7% of its
  /// time at k=6, 65536 samples, one thread; without, 0.55 -> 0.46 ms.)
  BlockRows(const scalar_t* rows_or_null, int64_t k, int64_t block_rows)
      : data_(rows_or_null), k_(k), shared_(rows_or_null == nullptr) {
    if (shared_ || !std::is_same_v<scalar_t, acc_t>) tile_.assign(static_cast<size_t>(block_rows * k), acc_t(0));
  }

  bool shared() const { return shared_; }

  /// The entries of rows [b0, b0 + rows), row after row; a shared operand's tile.
  const acc_t* rows(int64_t b0, int64_t rows) {
    if (shared_) return tile_.data();
    const scalar_t* src = data_ + b0 * k_;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      for (int64_t e = 0; e < rows * k_; ++e) tile_[e] = static_cast<acc_t>(src[e]);
      return tile_.data();
    }
  }

 private:
  const scalar_t* data_;
  int64_t k_;
  bool shared_;
  std::vector<acc_t> tile_;
};

/// Whether a loop over rows of kK entries, each row reduced, vectorises across rows: GCC 12
/// turns the strided loads of a row's entries into vector loads and shuffles for rows of 3
/// entries and of powers of two; a row of 6 is reduced as three pairs (reduce_rows).
template <int kK>
constexpr bool kRowsVectorise = kK == 1 || kK == 2 || kK == 3 || kK == 4 || kK == 6 || kK == 8;

/// out[g] = init + in[g kG] + ... + in[g kG + kG - 1] for `groups` groups of kG entries, or
/// (kProduct) init times their product.
template <int kG, bool kProduct, typename acc_t>
C10_ALWAYS_INLINE void reduce_groups(int64_t groups, const acc_t* FUSEDGAUSS_RESTRICT in, acc_t init,
                                     acc_t* FUSEDGAUSS_RESTRICT out) {
  for (int64_t g = 0; g < groups; ++g) {
    acc_t v = init;
    for (int i = 0; i < kG; ++i) v = kProduct ? v * in[g * kG + i] : v + in[g * kG + i];
    out[g] = v;
  }
}

/// reduce_groups over rows of kK entries (kRowsVectorise<kK>), a row of 6 through `pairs`
/// (3 entries a row).
template <int kK, bool kProduct, typename acc_t>
C10_ALWAYS_INLINE void reduce_rows(int64_t rows, const acc_t* in, acc_t init, acc_t* pairs, acc_t* out) {
  static_assert(kRowsVectorise<kK>, "rows whose reduction does not vectorise");
  if constexpr (kK == 6) {
    reduce_groups<2, kProduct>(rows * 3, in, kProduct ? acc_t(1) : acc_t(0), pairs);
    reduce_groups<3, kProduct>(rows, pairs, init, out);
  } else {
    reduce_groups<kK, kProduct>(rows, in, init, out);
  }
}

template <typename acc_t>
acc_t log_normalizer(int64_t k) {
  return acc_t(-0.5) * static_cast<acc_t>(k) * static_cast<acc_t>(math::kLog2Pi);
}

/// The log-probs of a block's rows from their entries' terms:
///   -k/2 log(2 pi) + sum_i term_i - sum_i log s_i.
/// A shared scale's sum of logs is taken once per chunk. A per-sample one's takes one log per
/// row instead of k (as math::sum_log_diagonal; the logs were most of a small-k forward's
/// arithmetic): each entry's term less the log of its power of two, and its mantissa, come
/// from split_log_scale, and each row's product of mantissas, renormalised every
/// kLogProductRun factors, has its log taken in a loop over the rows that vectorises.
template <typename scalar_t>
class BlockRowSums {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  /// Log-probs in the accumulation type are written in place; narrower ones through scratch.
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;

  BlockRowSums(BlockRows<scalar_t>& scale, int64_t k, int64_t block_rows)
      : k_(k), split_(!scale.shared()), constant_(log_normalizer<acc_t>(k)),
        scale_mantissas_(static_cast<size_t>(split_ ? block_rows * k : 0)),
        sums_(static_cast<size_t>(split_ ? block_rows : 0)), products_(sums_.size()),
        narrow_log_probs_(kInPlace ? 0 : sums_.size()),
        pairs_(static_cast<size_t>(k == 6 ? block_rows * 3 : 0)) {
    if (!split_ && block_rows > 0) {  // (a tile of no rows, for no samples, has no entries)
      const acc_t* s = scale.rows(0, 1);
      for (int64_t i = 0; i < k; ++i) constant_ -= math::log_(s[i]);
    }
  }

  /// Whether the entries of the scale are split (it is per-sample).
  bool splits_scale() const { return split_; }

  /// Where the split entries' mantissas go.
  acc_t* scale_mantissas() { return scale_mantissas_.data(); }

  /// The split, for an entry loop that did not: `rows` rows of `terms` and their `scale`, each
  /// scale entry times the factor the entry loop wrote to scale_mantissas() (the factors of
  /// another sum of logs, taken in the same product).
  void split_scale_times_factors(acc_t* terms, const acc_t* scale, int64_t rows) {
    acc_t* FUSEDGAUSS_RESTRICT t = terms;
    const acc_t* FUSEDGAUSS_RESTRICT s = scale;
    acc_t* FUSEDGAUSS_RESTRICT mantissas = scale_mantissas_.data();
    with_best_simd([&]() FUSEDGAUSS_INLINE_BODY { split_log_scale_entries(rows * k_, s, t, mantissas); });
  }

  /// The log-probs of `rows` rows, whose terms are `terms` (split, where the scale is), into out.
  void store(const acc_t* terms, int64_t rows, scalar_t* out) {
    with_static_event_size<scalar_t>(k_, [&](auto static_k) {
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY { sum_rows<decltype(static_k)::value>(terms, rows, out); });
    });
    if (!split_) return;
    acc_t* FUSEDGAUSS_RESTRICT log_probs = kInPlace ? reinterpret_cast<acc_t*>(out) : narrow_log_probs_.data();
    const acc_t* FUSEDGAUSS_RESTRICT sums = sums_.data();
    const acc_t* FUSEDGAUSS_RESTRICT products = products_.data();
    with_best_simd([&]() FUSEDGAUSS_INLINE_BODY { subtract_logs(rows, sums, products, log_probs); });
    if constexpr (!kInPlace) std::copy(log_probs, log_probs + rows, out);
  }

 private:
  /// Each row's log-prob into out (a shared scale), or its sum of terms and product of
  /// mantissas into sums_ and products_ (a split one). kK > 0 says that k == kK: the loop
  /// over a row unrolls (k=6, one thread: the split forward 490 -> 440 us), and for the kK of
  /// kRowsVectorise the loops run over rows and vectorise (k=6, 65536 samples, one thread:
  /// the diag_normal_log_prob forward 0.34 -> 0.27 ms; sum_rows from 19% to 10% of the rsample
  /// forward's time). Splitting the scale in those loops too, instead of in the entry loops or
  /// split_scale_times_factors, cost more than it saved.
  template <int kK>
  C10_ALWAYS_INLINE void sum_rows(const acc_t* terms, int64_t rows, scalar_t* out) {
    if constexpr (kRowsVectorise<kK> && kInPlace) {  // (only float has a compile-time k)
      acc_t* sums = split_ ? sums_.data() : reinterpret_cast<acc_t*>(out);
      reduce_rows<kK, false>(rows, terms, constant_, pairs_.data(), sums);
      if (split_) reduce_rows<kK, true>(rows, scale_mantissas_.data(), acc_t(1), pairs_.data(), products_.data());
      return;
    }
    const int64_t k = kK > 0 ? kK : k_;
    if (!split_) {
      for (int64_t r = 0; r < rows; ++r) {
        acc_t sum = constant_;
        for (int64_t i = 0; i < k; ++i) sum += terms[r * k + i];
        out[r] = static_cast<scalar_t>(sum);
      }
      return;
    }
    const acc_t* mantissas = scale_mantissas_.data();
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* row_terms = terms + r * k;
      const acc_t* row_mantissas = mantissas + r * k;
      // Two sums and products, of the even and the odd entries: half as long chains of
      // dependent operations (k=17, one thread: the forward 1.40 -> 1.09 ms).
      acc_t sum[2] = {constant_, 0};
      acc_t product = 1;
      for (int64_t i0 = 0; i0 < k; i0 += math::kLogProductRun) {
        const int64_t i1 = std::min(k, i0 + math::kLogProductRun);
        acc_t run_product[2] = {1, 1};
        int64_t i = i0;
        for (; i + 1 < i1; i += 2) {
          for (int j = 0; j < 2; ++j) {
            sum[j] += row_terms[i + j];
            run_product[j] *= row_mantissas[i + j];
          }
        }
        if (i < i1) {
          sum[0] += row_terms[i];
          run_product[0] *= row_mantissas[i];
        }
        product *= run_product[0] * run_product[1];
        if (i1 < k) sum[0] -= split_log_scale(product, product);  // renormalised into the sum
      }
      sums_[r] = sum[0] + sum[1];
      products_[r] = product;
    }
  }

  int64_t k_;
  bool split_;
  acc_t constant_;
  std::vector<acc_t> scale_mantissas_;
  std::vector<acc_t> sums_;
  std::vector<acc_t> products_;
  std::vector<acc_t> narrow_log_probs_;
  std::vector<acc_t> pairs_;
};

/// The per-entry gradients of a block, to a GradientSink: written to its rows, or added to a
/// block-shaped accumulator whose rows are summed into the chunk's partials at the end.
template <typename scalar_t>
class BlockGradient {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  BlockGradient(GradientSink<scalar_t>& sink, int64_t k, int64_t block_rows)
      : sink_(sink), k_(k), rows_out_(sink.rows()),
        direct_(!sink.reduces && rows_out_ != nullptr && std::is_same_v<scalar_t, acc_t>),
        // Computed even when not requested: the entry loops stay branch-free.
        values_(static_cast<size_t>(direct_ ? 0 : block_rows * k)),
        accumulator_(static_cast<size_t>(sink.reduces ? block_rows * k : 0), acc_t(0)) {}

  /// Where the entry loops write the gradient of the block at row b0: the per-sample rows
  /// themselves when they are in the accumulation type, scratch otherwise. (The copy through
  /// scratch had cost the diag_normal_log_prob backward, 65536 samples, one thread, k=6
  /// 370 -> 270 us, k=17 0.97 -> 0.67 ms.)
  acc_t* values(int64_t b0) { return direct_ ? reinterpret_cast<acc_t*>(rows_out_ + b0 * k_) : values_.data(); }

  /// Stores values(b0) of rows [b0, b0 + rows).
  void store(int64_t b0, int64_t rows) {
    const int64_t entries = rows * k_;
    if (sink_.reduces) {
      for (int64_t e = 0; e < entries; ++e) accumulator_[e] += values_[e];
    } else if (rows_out_ != nullptr && !direct_) {
      scalar_t* out = rows_out_ + b0 * k_;
      for (int64_t e = 0; e < entries; ++e) out[e] = static_cast<scalar_t>(values_[e]);
    }
  }

  /// Adds the accumulated rows, in row order, to chunk `chunk`'s partial sums.
  void finish(int64_t chunk) {
    if (!sink_.reduces) return;
    acc_t* partial = sink_.partials.chunk(chunk);
    for (size_t row = 0; row < accumulator_.size(); row += static_cast<size_t>(k_)) {
      for (int64_t i = 0; i < k_; ++i) partial[i] += accumulator_[row + i];
    }
  }

 private:
  GradientSink<scalar_t>& sink_;
  int64_t k_;
  scalar_t* rows_out_;
  bool direct_;
  std::vector<acc_t> values_;
  std::vector<acc_t> accumulator_;
};

/// The three gradients of a backward op as its wrapper takes them: a reduced one as the event
/// in the input dtype, per-sample rows otherwise.
template <typename scalar_t>
std::array<at::Tensor, 3> finished_gradients(std::array<GradientSink<scalar_t>, 3>& sinks,
                                             const at::TensorOptions& options) {
  std::array<at::Tensor, 3> grads;
  for (size_t i = 0; i < 3; ++i) {
    grads[i] = sinks[i].reduces ? sinks[i].reduced(options).first.to(options.dtype()) : sinks[i].per_sample;
  }
  return grads;
}

template <typename scalar_t>
std::array<GradientSink<scalar_t>, 3> gradient_sinks(const RowsProblem& p, const Chunks& chunks,
                                                     std::array<bool, 3> mask) {
  const int64_t n = p.layout.batch_numel;
  return {GradientSink<scalar_t>(mask[0], p.operands[0], {p.k}, chunks, n),
          GradientSink<scalar_t>(mask[1], p.operands[1], {p.k}, chunks, n),
          GradientSink<scalar_t>(mask[2], p.operands[2], {p.k}, chunks, n)};
}

/// Each of `rows` per-row values repeated over its row's k entries, as acc_t, into `entries`;
/// zeros for an upstream gradient autograd did not pass (null). A compile-time k unrolls the
/// fill of a row (k=6, 65536 samples, one thread: the diag_normal_log_prob backward 270 ->
/// 220 us).
template <typename scalar_t, typename acc_t>
void expand_rows(const scalar_t* per_row, int64_t rows, int64_t k, acc_t* entries) {
  with_static_event_size<scalar_t>(k, [&](auto static_k) {
    constexpr int kK = decltype(static_k)::value;
    const int64_t n = kK > 0 ? kK : k;
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t value = per_row != nullptr ? static_cast<acc_t>(per_row[r]) : acc_t(0);
      for (int64_t i = 0; i < n; ++i) entries[r * n + i] = value;
    }
  });
}

// --- diag_normal_log_prob and squashed_diag_log_prob -------------------------------------

template <Squash kSquash, typename scalar_t>
void diag_log_prob_kernel(const RowsProblem& p, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
  const Chunks chunks(p.layout.batch_numel, grain_size(k * kWorkPerEntry));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    const int64_t block_rows = block_rows_in(k, begin, end);
    BlockRows<scalar_t> value(p.operands[0], k, block_rows), loc(p.operands[1], k, block_rows),
        scale(p.operands[2], k, block_rows);
    BlockRowSums<scalar_t> row_sums(scale, k, block_rows);
    std::vector<acc_t> terms(static_cast<size_t>(block_rows * k));
    for (int64_t b0 = begin; b0 < end; b0 += block_rows) {
      const int64_t rows = std::min(block_rows, end - b0);
      const int64_t entries = rows * k;
      const acc_t* FUSEDGAUSS_RESTRICT x = value.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT m = loc.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT s = scale.rows(b0, rows);
      acc_t* FUSEDGAUSS_RESTRICT t = terms.data();
      acc_t* FUSEDGAUSS_RESTRICT mantissas = row_sums.scale_mantissas();
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
        if (row_sums.splits_scale()) {
          log_prob_entries<kSquash, true>(entries, x, m, s, eps, t, mantissas);
        } else {
          log_prob_entries<kSquash, false>(entries, x, m, s, eps, t, mantissas);
        }
      });
      row_sums.store(t, rows, out + b0);
    }
  });
}

template <Squash kSquash, typename scalar_t>
std::array<at::Tensor, 3> diag_log_prob_backward_kernel(const RowsProblem& p, const scalar_t* grad,
                                                        std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
  const Chunks chunks(p.layout.batch_numel, grain_size(k * kWorkPerEntry));
  std::array<GradientSink<scalar_t>, 3> sinks = gradient_sinks<scalar_t>(p, chunks, mask);
  chunks.run([&](int64_t chunk, int64_t begin, int64_t end) {
    const int64_t block_rows = block_rows_in(k, begin, end);
    BlockRows<scalar_t> value(p.operands[0], k, block_rows), loc(p.operands[1], k, block_rows),
        scale(p.operands[2], k, block_rows);
    BlockGradient<scalar_t> d_value(sinks[0], k, block_rows), d_loc(sinks[1], k, block_rows),
        d_scale(sinks[2], k, block_rows);
    std::vector<acc_t> upstream(static_cast<size_t>(block_rows * k));
    for (int64_t b0 = begin; b0 < end; b0 += block_rows) {
      const int64_t rows = std::min(block_rows, end - b0);
      const int64_t entries = rows * k;
      expand_rows(grad + b0, rows, k, upstream.data());
      const acc_t* FUSEDGAUSS_RESTRICT g = upstream.data();
      const acc_t* FUSEDGAUSS_RESTRICT x = value.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT m = loc.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT s = scale.rows(b0, rows);
      acc_t* FUSEDGAUSS_RESTRICT dv = d_value.values(b0);
      acc_t* FUSEDGAUSS_RESTRICT dm = d_loc.values(b0);
      acc_t* FUSEDGAUSS_RESTRICT ds = d_scale.values(b0);
      const bool want_value = mask[0];
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
        if (want_value) {
          log_prob_gradient_entries<kSquash, true>(entries, g, x, m, s, eps, dv, dm, ds);
        } else {
          log_prob_gradient_entries<kSquash, false>(entries, g, x, m, s, eps, dv, dm, ds);
        }
      });
      d_value.store(b0, rows);
      d_loc.store(b0, rows);
      d_scale.store(b0, rows);
    }
    d_value.finish(chunk);
    d_loc.finish(chunk);
    d_scale.finish(chunk);
  });
  return finished_gradients(sinks, p.operands[0].data.options());
}

template <Squash kSquash>
at::Tensor diag_log_prob(const char* op, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale) {
  return rows_log_prob_forward_op(op, value, loc, scale, [&](const RowsProblem& p, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diag_log_prob", [&] {
      diag_log_prob_kernel<kSquash, scalar_t>(p, out.data_ptr<scalar_t>());
    });
  });
}

template <Squash kSquash>
std::tuple<at::Tensor, at::Tensor, at::Tensor> diag_log_prob_backward(const char* op, const at::Tensor& grad,
                                                                      const at::Tensor& value, const at::Tensor& loc,
                                                                      const at::Tensor& scale,
                                                                      std::array<bool, 3> mask) {
  const auto run = [&](const RowsProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
    std::array<at::Tensor, 3> grads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "diag_log_prob_backward", [&] {
      grads = diag_log_prob_backward_kernel<kSquash, scalar_t>(p, grad.const_data_ptr<scalar_t>(), mask);
    });
    return grads;
  };
  return rows_log_prob_backward_op(op, grad, value, loc, scale, mask, run);
}

at::Tensor diag_normal_log_prob(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale) {
  return diag_log_prob<Squash::kNone>("diag_normal_log_prob", value, loc, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diag_normal_log_prob_backward(const at::Tensor& grad,
                                                                             const at::Tensor& value,
                                                                             const at::Tensor& loc,
                                                                             const at::Tensor& scale,
                                                                             std::array<bool, 3> mask) {
  return diag_log_prob_backward<Squash::kNone>("diag_normal_log_prob_backward", grad, value, loc, scale, mask);
}

at::Tensor squashed_diag_log_prob(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale,
                                  bool value_is_pre_tanh) {
  constexpr const char* op = "squashed_diag_log_prob";
  return value_is_pre_tanh ? diag_log_prob<Squash::kFromPreTanh>(op, value, loc, scale)
                           : diag_log_prob<Squash::kFromAction>(op, value, loc, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_diag_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale,
    bool value_is_pre_tanh, std::array<bool, 3> mask) {
  constexpr const char* op = "squashed_diag_log_prob_backward";
  return value_is_pre_tanh ? diag_log_prob_backward<Squash::kFromPreTanh>(op, grad, value, loc, scale, mask)
                           : diag_log_prob_backward<Squash::kFromAction>(op, grad, value, loc, scale, mask);
}

// --- squashed_diag_rsample_log_prob ------------------------------------------------------

template <typename scalar_t>
void diag_rsample_kernel(const RowsProblem& p, RsampleOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  scalar_t* action_out = out.action.data_ptr<scalar_t>();
  scalar_t* pre_tanh_out = out.pre_tanh.data_ptr<scalar_t>();
  scalar_t* log_prob_out = out.log_prob.data_ptr<scalar_t>();
  const Chunks chunks(p.layout.batch_numel, grain_size(k * kWorkPerEntry));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    const int64_t block_rows = block_rows_in(k, begin, end);
    BlockRows<scalar_t> loc(p.operands[0], k, block_rows), scale(p.operands[1], k, block_rows),
        noise(p.operands[2], k, block_rows);
    BlockRowSums<scalar_t> row_sums(scale, k, block_rows);
    // Outputs in the accumulation type are written in place; narrower ones through scratch.
    constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> actions(static_cast<size_t>(kInPlace ? 0 : block_rows * k)), pre_tanh(actions.size()),
        terms(static_cast<size_t>(block_rows * k));
    for (int64_t b0 = begin; b0 < end; b0 += block_rows) {
      const int64_t rows = std::min(block_rows, end - b0);
      const int64_t entries = rows * k;
      const acc_t* FUSEDGAUSS_RESTRICT m = loc.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT s = scale.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT e = noise.rows(b0, rows);
      acc_t* FUSEDGAUSS_RESTRICT a = kInPlace ? reinterpret_cast<acc_t*>(action_out + b0 * k) : actions.data();
      acc_t* FUSEDGAUSS_RESTRICT u = kInPlace ? reinterpret_cast<acc_t*>(pre_tanh_out + b0 * k) : pre_tanh.data();
      acc_t* FUSEDGAUSS_RESTRICT t = terms.data();
      acc_t* FUSEDGAUSS_RESTRICT factors = row_sums.scale_mantissas();
      // With a per-sample scale the log-det's factors join the scale's in one product per
      // sample; a shared scale's log is taken once, so the log-det is summed per entry.
      const bool factored = row_sums.splits_scale();
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
        if (factored) {
          rsample_entries<true>(entries, m, s, e, a, u, t, factors);
        } else {
          rsample_entries<false>(entries, m, s, e, a, u, t, factors);
        }
      });
      // Split apart: in the loop above, which holds many constants, the split cost more than
      // its own loop (k=6, one thread, the forward 1.25 -> 1.40 ms).
      if (factored) row_sums.split_scale_times_factors(t, s, rows);
      if constexpr (!kInPlace) {
        std::copy(a, a + entries, action_out + b0 * k);
        std::copy(u, u + entries, pre_tanh_out + b0 * k);
      }
      row_sums.store(t, rows, log_prob_out + b0);
    }
  });
}

template <typename scalar_t>
std::array<at::Tensor, 3> diag_rsample_backward_kernel(const RowsProblem& p, const RsampleGradients& upstream,
                                                       std::array<bool, 3> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.k;
  const Chunks chunks(p.layout.batch_numel, grain_size(k * kWorkPerEntry));
  std::array<GradientSink<scalar_t>, 3> sinks = gradient_sinks<scalar_t>(p, chunks, mask);
  const auto data = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  const scalar_t* grad_action = data(upstream.action);
  const scalar_t* grad_pre_tanh = data(upstream.pre_tanh);
  const scalar_t* grad_log_prob = data(upstream.log_prob);
  chunks.run([&](int64_t chunk, int64_t begin, int64_t end) {
    const int64_t block_rows = block_rows_in(k, begin, end);
    BlockRows<scalar_t> loc(p.operands[0], k, block_rows), scale(p.operands[1], k, block_rows),
        noise(p.operands[2], k, block_rows);
    BlockGradient<scalar_t> d_loc(sinks[0], k, block_rows), d_scale(sinks[1], k, block_rows),
        d_noise(sinks[2], k, block_rows);
    // An output autograd passed no gradient for contributes zeros.
    BlockRows<scalar_t> ga(grad_action, k, block_rows), gu(grad_pre_tanh, k, block_rows);
    std::vector<acc_t> glp(static_cast<size_t>(block_rows * k));
    for (int64_t b0 = begin; b0 < end; b0 += block_rows) {
      const int64_t rows = std::min(block_rows, end - b0);
      const int64_t entries = rows * k;
      expand_rows(grad_log_prob != nullptr ? grad_log_prob + b0 : nullptr, rows, k, glp.data());
      const acc_t* FUSEDGAUSS_RESTRICT m = loc.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT s = scale.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT e = noise.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT g_a = ga.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT g_u = gu.rows(b0, rows);
      const acc_t* FUSEDGAUSS_RESTRICT g_lp = glp.data();
      acc_t* FUSEDGAUSS_RESTRICT dm = d_loc.values(b0);
      acc_t* FUSEDGAUSS_RESTRICT ds = d_scale.values(b0);
      acc_t* FUSEDGAUSS_RESTRICT de = d_noise.values(b0);
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
        if (mask[2]) {
          rsample_gradient_entries<true>(entries, g_a, g_u, g_lp, m, s, e, dm, ds, de);
        } else {
          rsample_gradient_entries<false>(entries, g_a, g_u, g_lp, m, s, e, dm, ds, de);
        }
      });
      d_loc.store(b0, rows);
      d_scale.store(b0, rows);
      d_noise.store(b0, rows);
    }
    d_loc.finish(chunk);
    d_scale.finish(chunk);
    d_noise.finish(chunk);
  });
  return finished_gradients(sinks, p.operands[0].data.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_diag_rsample_log_prob(const at::Tensor& loc,
                                                                              const at::Tensor& scale,
                                                                              const at::Tensor& eps) {
  constexpr const char* op = "squashed_diag_rsample_log_prob";
  const RowsProblem p = prepare_rows_problem(op, {"loc", "scale", "eps"}, {&loc, &scale, &eps});
  RsampleOutputs out = empty_rsample_outputs(p.layout, p.k, loc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "squashed_diag_rsample_log_prob", [&] {
    diag_rsample_kernel<scalar_t>(p, out);
  });
  return {out.action, out.pre_tanh, out.log_prob};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_diag_rsample_log_prob_backward(
    const c10::optional<at::Tensor>& grad_action, const c10::optional<at::Tensor>& grad_pre_tanh,
    const c10::optional<at::Tensor>& grad_log_prob, const at::Tensor& loc, const at::Tensor& scale,
    const at::Tensor& eps, std::array<bool, 3> mask) {
  constexpr const char* op = "squashed_diag_rsample_log_prob_backward";
  const RowsProblem p = prepare_rows_problem(op, {"loc", "scale", "eps"}, {&loc, &scale, &eps});
  const RsampleGradients upstream =
      check_rsample_gradients(op, grad_action, grad_pre_tanh, grad_log_prob, loc, p.layout, p.k);
  std::array<at::Tensor, 3> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "squashed_diag_rsample_log_prob_backward", [&] {
    grads = diag_rsample_backward_kernel<scalar_t>(p, upstream, mask);
  });
  return gradients_for_inputs(grads, {&loc, &scale, &eps}, {&p.operands[0], &p.operands[1], &p.operands[2]},
                              p.layout, mask);
}

// --- tanh_log_abs_det_jacobian ------------------------------------------------------------

/// out[i] = f(i) over n entries in parallel, f computed in acc_t with the best SIMD.
template <typename scalar_t, typename F>
void elementwise(int64_t n, scalar_t* out, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const Chunks chunks(n, grain_size(kWorkPerEntry));
  chunks.run([&](int64_t, int64_t begin, int64_t end) {
    std::vector<acc_t> block(static_cast<size_t>(kBlockEntries));
    for (int64_t b0 = begin; b0 < end; b0 += kBlockEntries) {
      const int64_t count = std::min(kBlockEntries, end - b0);
      acc_t* FUSEDGAUSS_RESTRICT values = block.data();
      with_best_simd([&]() FUSEDGAUSS_INLINE_BODY {
        for (int64_t i = 0; i < count; ++i) values[i] = f(b0 + i);
      });
      std::copy(values, values + count, out + b0);
    }
  });
}

at::Tensor tanh_log_abs_det_jacobian(const at::Tensor& u) {
  check_floating("tanh_log_abs_det_jacobian", "u", u);
  const at::Tensor input = u.contiguous();
  at::Tensor out = empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "tanh_log_abs_det_jacobian", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    elementwise(input.numel(), out.data_ptr<scalar_t>(), [x](int64_t i) FUSEDGAUSS_INLINE_BODY {
      return math::tanh_terms(static_cast<acc_t>(x[i])).log_det;
    });
  });
  return out;
}

/// d/du log(1 - tanh(u)^2) = -2 tanh(u).
at::Tensor tanh_log_abs_det_jacobian_backward(const at::Tensor& grad, const at::Tensor& u) {
  constexpr const char* op = "tanh_log_abs_det_jacobian_backward";
  check_floating(op, "u", u);
  check_same_dtype_and_device(op, "grad", grad, u);
  TORCH_CHECK(grad.sizes() == u.sizes(), op, ": grad has shape ", grad.sizes(), " but u has shape ", u.sizes());
  const at::Tensor input = u.contiguous();
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "tanh_log_abs_det_jacobian_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* g = upstream.const_data_ptr<scalar_t>();
    elementwise(input.numel(), out.data_ptr<scalar_t>(), [x, g](int64_t i) FUSEDGAUSS_INLINE_BODY {
      return acc_t(-2) * static_cast<acc_t>(g[i]) * math::tanh_terms(static_cast<acc_t>(x[i])).tanh;
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CPU, m) {
  m.impl("diag_normal_log_prob", &diag_normal_log_prob);
  m.impl("diag_normal_log_prob_backward", &diag_normal_log_prob_backward);
  m.impl("squashed_diag_log_prob", &squashed_diag_log_prob);
  m.impl("squashed_diag_log_prob_backward", &squashed_diag_log_prob_backward);
  m.impl("squashed_diag_rsample_log_prob", &squashed_diag_rsample_log_prob);
  m.impl("squashed_diag_rsample_log_prob_backward", &squashed_diag_rsample_log_prob_backward);
  m.impl("tanh_log_abs_det_jacobian", &tanh_log_abs_det_jacobian);
  m.impl("tanh_log_abs_det_jacobian_backward", &tanh_log_abs_det_jacobian_backward);
}

}  // namespace cpu
}  // namespace fusedgauss
