// CUDA kernels of the full-covariance Gaussian ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
//   squashed_tril_log_prob(value, loc, scale_tril, value_is_pre_tanh)   and its backward
//   squashed_tril_rsample_log_prob(loc, scale_tril, eps)               and its backward
//   mvn_packed_log_prob, squashed_packed_log_prob (value, loc, packed scale_tril, ...) and theirs
// One thread per sample, around the per-sample math of csrc/math with one lane (W = 1). A
// per-sample scale_tril is read in place from global memory; a per-sample covariance is
// factorised, and a packed factor unpacked, into the thread's private array and never
// written out. From kWarpMinEventSize (warp.cuh) a per-sample matrix gets a warp per sample
// instead, around the team math of csrc/math/team_math.h. A matrix shared by the
// batch is staged once per block in shared memory (and factorised there, for a covariance).
// Gradients of shared operands are reduced without atomics: each block sums its samples in a
// fixed order into its own row of partial sums, and one more block adds the rows in order,
// so the bits are the same on every run.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>

#include "../common/op_wrappers.h"
#include "../math/gaussian_math.h"
#include "../math/packed_math.h"
#include "../math/squash_math.h"
#include "../math/team_math.h"
#include "launch.cuh"
#include "rsample_upstream.cuh"
#include "warp.cuh"

namespace fusedgauss {
namespace cuda {
namespace {

/// The operands of a log-prob kernel: per-sample rows `stride` apart, or shared (stride 0).
template <typename scalar_t>
struct MvnOperands {
  const scalar_t* value;
  int64_t value_stride;
  const scalar_t* loc;
  int64_t loc_stride;
  const scalar_t* matrix;
  int64_t matrix_stride;
  int64_t n;  // samples
  int64_t k;  // event size
  ValueSquash squash;
  // A packed factor's diagonal: L_ii = diag_transform(x_ii) + min_diag.
  math::DiagTransform diag_transform;
  double min_diag;

  explicit MvnOperands(const MvnProblem& p, ValueSquash squash = {})
      : value(p.value.data.const_data_ptr<scalar_t>()),
        value_stride(p.value.batch_stride),
        loc(p.loc.data.const_data_ptr<scalar_t>()),
        loc_stride(p.loc.batch_stride),
        matrix(p.matrix.data.const_data_ptr<scalar_t>()),
        matrix_stride(p.matrix.batch_stride),
        n(p.layout.batch_numel),
        k(p.k),
        squash(squash),
        diag_transform(p.diag_transform),
        min_diag(p.min_diag) {}
};

/// Entries of one sample's row of the matrix operand: k x k, or packed.
template <Param kParam>
__host__ __device__ inline int64_t matrix_row_width(int64_t k) {
  return kParam == Param::kPacked ? math::packed_size(k) : k * k;
}

/// Entry (i, j), j <= i, of the scale_tril or covariance whose row of the matrix operand is
/// `m`: read in place or, packed, unpacked (the diagonal through its transform).
template <Param kParam, typename scalar_t>
__device__ C10_ALWAYS_INLINE at::opmath_type<scalar_t> lower_entry(const MvnOperands<scalar_t>& a, const scalar_t* m,
                                                                   int64_t k, int64_t i, int64_t j) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kParam == Param::kPacked) {
    const acc_t x = static_cast<acc_t>(m[math::packed_index(i, j)]);
    return i == j ? math::diag_entry(a.diag_transform, x, static_cast<acc_t>(a.min_diag)).value : x;
  } else {
    return static_cast<acc_t>(m[i * k + j]);
  }
}

/// Writes entry (i, j) of a scale_tril gradient, gij, into the matrix operand's gradient row
/// `out` (whose operand row is `m`): k x k, or, packed, at (i, j <= i)'s packed place, a
/// diagonal entry times dL_ii/dx_ii (entries above the diagonal have no packed place).
template <Param kParam, typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE void write_matrix_gradient(const MvnOperands<scalar_t>& a, const scalar_t* m,
                                                        scalar_t* out, int64_t k, int64_t i, int64_t j, acc_t gij) {
  if constexpr (kParam == Param::kPacked) {
    if (j > i) return;
    const int64_t e = math::packed_index(i, j);
    if (i == j) gij *= math::diag_entry(a.diag_transform, static_cast<acc_t>(m[e]), acc_t(0)).derivative;
    out[e] = static_cast<scalar_t>(gij);
  } else {
    out[i * k + j] = static_cast<scalar_t>(gij);
  }
}

/// A matrix shared by the batch, staged in shared memory by the whole block: its lower
/// triangle copied (unpacked, for a packed factor; zero above), and factorised by thread 0
/// when it is a covariance. `ok` is false when that factorisation fails; `log_det`
/// (optional) receives sum_i log L_ii.
template <Param kParam, typename scalar_t, typename acc_t>
__device__ void stage_shared_factor(const MvnOperands<scalar_t>& a, int64_t k, acc_t* staged, bool* ok,
                                    acc_t* log_det) {
  for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
    const int64_t i = e / k;
    const int64_t j = e % k;
    staged[e] = j <= i ? lower_entry<kParam>(a, a.matrix, k, i, j) : acc_t(0);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bool factor_ok = true;
    if constexpr (kParam == Param::kCovariance) {
      math::cholesky_in_place<1>(k, staged, &factor_ok);
    }
    *ok = factor_ok;
    if (log_det != nullptr) {
      math::sum_log_diagonal<1>(k, staged, log_det);
    }
  }
  __syncthreads();
}

/// The pre-tanh value of entry x of a squashed value operand (x itself when given as u).
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE acc_t pre_tanh_of(ValueSquash squash, acc_t x) {
  return squash.from_action
             ? math::atanh_clamped(x, math::action_epsilon<scalar_t, acc_t>())
             : x;
}

/// Entry i of d = value - loc for sample b; squashed, d_i = u_i - loc_i, and the Jacobian term
/// log(1 - tanh(u_i)^2) is added to `jacobian`.
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE acc_t difference_entry(const MvnOperands<scalar_t>& a, int64_t b, int64_t i,
                                                    acc_t& jacobian) {
  acc_t u = static_cast<acc_t>(a.value[b * a.value_stride + i]);
  if (a.squash.squashed) {
    u = pre_tanh_of<scalar_t>(a.squash, u);
    jacobian += math::tanh_terms(u).log_det;
  }
  return u - static_cast<acc_t>(a.loc[b * a.loc_stride + i]);
}

/// d = value - loc for sample b; squashed, d = u - loc and the return value is the Jacobian
/// sum_i log(1 - tanh(u_i)^2) (0 otherwise).
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE acc_t load_difference(const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* d) {
  acc_t jacobian = 0;
  for (int64_t i = 0; i < k; ++i) d[i] = difference_entry(a, b, i, jacobian);
  return jacobian;
}

/// d log p / d value for entry i of sample b's value, given the Gaussian part's -g w_i:
/// squashed, (-g w_i + g 2 tanh(u_i)) [* d atanh_clamped / dx for actions].
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE acc_t value_gradient(ValueSquash squash, acc_t x, acc_t minus_gw, acc_t g) {
  if (!squash.squashed) return minus_gw;
  const acc_t d_u = minus_gw + g * acc_t(2) * math::tanh_terms(pre_tanh_of<scalar_t>(squash, x)).tanh;
  const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
  return squash.from_action ? d_u * math::atanh_clamped_derivative(x, eps) : d_u;
}

/// Sample b's factor in the thread's array `L` (lower triangle): a covariance factorised, a
/// packed factor unpacked. Returns false when the covariance is not positive-definite.
template <Param kParam, typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE bool load_factor(const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* L) {
  const scalar_t* m = a.matrix + b * a.matrix_stride;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) L[i * k + j] = lower_entry<kParam>(a, m, k, i, j);
  }
  bool ok = true;
  if constexpr (kParam == Param::kCovariance) math::cholesky_in_place<1>(k, L, &ok);
  return ok;
}

/// Writes each sample's log-prob to `out` and, when `log_det_out` is given (the ops whose factor
/// is given: scale_tril, packed), its sum_i log L_ii.
template <Param kParam, int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    log_prob_forward_kernel(const MvnOperands<scalar_t> a, scalar_t* __restrict__ out,
                            scalar_t* __restrict__ log_det_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : a.k;
  const bool shared_matrix = a.matrix_stride == 0;
  acc_t* staged = static_cast<acc_t*>(dynamic_shared_memory());
  __shared__ bool staged_ok;
  __shared__ acc_t staged_log_det;
  if (shared_matrix) {
    stage_shared_factor<kParam>(a, k, staged, &staged_ok, &staged_log_det);
  }
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < a.n;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t z[kMaxK];
    const acc_t jacobian = load_difference(a, b, k, z);
    acc_t squared_norm;
    acc_t log_det;
    bool ok = true;
    if (shared_matrix) {
      math::whiten<1>(k, staged, z, &squared_norm);
      log_det = staged_log_det;
      ok = staged_ok;
    } else if constexpr (kParam == Param::kScaleTril) {
      const scalar_t* L = a.matrix + b * a.matrix_stride;
      math::whiten<1>(k, L, z, &squared_norm);
      math::sum_log_diagonal<1>(k, L, &log_det);
    } else {
      acc_t L[kMaxK * kMaxK];
      ok = load_factor<kParam>(a, b, k, L);
      math::whiten<1>(k, L, z, &squared_norm);
      math::sum_log_diagonal<1>(k, L, &log_det);
    }
    out[b] = ok ? static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det) - jacobian)
                : quiet_nan<scalar_t>();
    if (log_det_out != nullptr) log_det_out[b] = static_cast<scalar_t>(log_det);
  }
}

/// Where the backward kernel writes: per-sample rows (nullptr when that gradient is not
/// asked for or is reduced), and the per-block partial sums of the reduced gradients.
template <typename scalar_t>
struct BackwardOutputs {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grad;
  scalar_t* value_rows;   // (B, k)
  scalar_t* loc_rows;     // (B, k)
  scalar_t* matrix_rows;  // (B, k, k)
  // (gridDim.x, partial_width(k)) when a gradient is reduced, else nullptr. A row holds
  // sum g w (k), then sum g w v^T (k * k, lower triangle) when the matrix reduces, then sum g.
  acc_t* partials;
  bool reduce_matrix;
  // The upstream gradient h of the scale_tril and packed ops' log_det (nullptr: none), per sample: the
  // diagonal coefficient of a per-sample factor's gradient is g - h. (The wrapper adds it
  // itself for a factor whose gradient reduces.)
  const scalar_t* grad_log_det;
};

__host__ __device__ inline int64_t partial_width(int64_t k) { return k + k * k + 1; }

/// Threads per block of a backward that reduces: each thread's g w and v sit in shared
/// memory for the block's ordered sum, so large events get fewer threads (at least a warp).
template <typename acc_t>
int reducing_threads(int64_t k) {
  constexpr size_t kRowBytes = 32 * 1024;
  int threads = kThreads;
  while (threads > 32 && static_cast<size_t>(threads) * (2 * k + 1) * sizeof(acc_t) > kRowBytes) threads /= 2;
  return threads;
}

/// Adds one term per thread to its block's row of partial sums, threads in order, inactive
/// threads (past the batch) adding zero: the vector g a (k entries), the lower triangle of
/// (g a) v^T (k * k, when reduce_outer) and the number c, the layout of partial_width(k). The
/// rows a_rows, v_rows (threads * k) and c_row (threads) are shared-memory scratch. Every
/// thread of the block must call it.
template <typename acc_t>
__device__ void add_block_terms(int64_t k, bool active, acc_t g, const acc_t* a, const acc_t* v, acc_t c,
                                bool reduce_outer, acc_t* a_rows, acc_t* v_rows, acc_t* c_row, acc_t* block_partials) {
  const int threads = blockDim.x;
  const int t = threadIdx.x;
  for (int64_t i = 0; i < k; ++i) {
    a_rows[t * k + i] = active ? g * a[i] : acc_t(0);
    v_rows[t * k + i] = active ? v[i] : acc_t(0);
  }
  c_row[t] = active ? c : acc_t(0);
  __syncthreads();
  // Entry e of the block's partial sums belongs to thread e % threads.
  for (int64_t e = t; e < partial_width(k); e += threads) {
    acc_t s = 0;
    if (e < k) {
      for (int r = 0; r < threads; ++r) s += a_rows[r * k + e];
    } else if (e < k + k * k) {
      const int64_t i = (e - k) / k;
      const int64_t j = (e - k) % k;
      if (reduce_outer && j <= i) {
        for (int r = 0; r < threads; ++r) s += a_rows[r * k + i] * v_rows[r * k + j];
      }
    } else {
      for (int r = 0; r < threads; ++r) s += c_row[r];
    }
    block_partials[e] += s;
  }
  __syncthreads();
}

template <Param kParam, int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    log_prob_backward_kernel(const MvnOperands<scalar_t> a, const BackwardOutputs<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kCovariance = kParam == Param::kCovariance;
  // A per-sample factor the thread builds itself, rather than reads in place.
  constexpr bool kOwnFactor = kParam != Param::kScaleTril;
  const int64_t k = kK > 0 ? kK : a.k;
  const bool shared_matrix = a.matrix_stride == 0;
  const bool reduces = o.partials != nullptr;
  const int threads = blockDim.x;
  const int t = threadIdx.x;

  // Shared memory: the staged matrix, then (when reducing) each thread's g w and v rows and g.
  acc_t* staged = static_cast<acc_t*>(dynamic_shared_memory());
  acc_t* gw_rows = staged + (shared_matrix ? k * k : 0);
  acc_t* v_rows = gw_rows + threads * k;
  acc_t* g_row = v_rows + threads * k;
  __shared__ bool staged_ok;
  if (shared_matrix) {
    stage_shared_factor<kParam>(a, k, staged, &staged_ok, static_cast<acc_t*>(nullptr));
  }
  const int64_t width = partial_width(k);
  acc_t* block_partials = reduces ? o.partials + blockIdx.x * width : nullptr;
  if (reduces) {
    for (int64_t e = t; e < width; e += threads) block_partials[e] = 0;
  }

  // The trip count is the same for every thread of a block, so that it can synchronise.
  for (int64_t base = blockIdx.x * static_cast<int64_t>(threads); base < a.n;
       base += static_cast<int64_t>(gridDim.x) * threads) {
    const int64_t b = base + t;
    const bool active = b < a.n;
    acc_t z[kMaxK];
    acc_t w[kMaxK];
    acc_t g = 0;
    if (active) {
      g = static_cast<acc_t>(o.grad[b]);
      load_difference(a, b, k, z);
      // L: the staged factor, a per-sample scale_tril in place, or a per-sample covariance
      // factorised (packed factor unpacked) here.
      acc_t factor[kOwnFactor ? kMaxK * kMaxK : 1];
      const scalar_t* tril = a.matrix + b * a.matrix_stride;
      bool ok = true;
      if (!shared_matrix && kOwnFactor) ok = load_factor<kParam>(a, b, k, factor);
      const auto solve = [&](auto L) {
        math::solve_lower<1>(k, L, z);
        for (int64_t i = 0; i < k; ++i) w[i] = z[i];
        math::solve_lower_transposed<1>(k, L, w);
      };
      if (shared_matrix) {
        solve(static_cast<const acc_t*>(staged));
        ok = staged_ok;
      } else if constexpr (kOwnFactor) {
        solve(static_cast<const acc_t*>(factor));
      } else {
        solve(tril);
      }
      if (!ok) g = quiet_nan<acc_t>();
      const acc_t diag_coefficient = o.grad_log_det != nullptr ? g - static_cast<acc_t>(o.grad_log_det[b]) : g;
      // d log p / d value = -w, d log p / d loc = w.
      for (int64_t i = 0; i < k; ++i) {
        if (o.value_rows != nullptr) {
          const acc_t x = static_cast<acc_t>(a.value[b * a.value_stride + i]);
          o.value_rows[b * k + i] = static_cast<scalar_t>(value_gradient<scalar_t>(a.squash, x, -g * w[i], g));
        }
        if (o.loc_rows != nullptr) o.loc_rows[b * k + i] = static_cast<scalar_t>(g * w[i]);
      }
      if (o.matrix_rows != nullptr) {
        scalar_t* out = o.matrix_rows + b * matrix_row_width<kParam>(k);
        if constexpr (!kCovariance) {
          // d/dL = tril(g w z^T) - c diag(1/L_ii), c = g - h, packed through dL_ii/dx_ii.
          for (int64_t i = 0; i < k; ++i) {
            acc_t L_ii;
            if (shared_matrix) {
              L_ii = staged[i * k + i];
            } else if constexpr (kOwnFactor) {
              L_ii = factor[i * k + i];
            } else {
              L_ii = static_cast<acc_t>(tril[i * k + i]);
            }
            for (int64_t j = 0; j < k; ++j) {
              const acc_t gij =
                  j < i ? g * w[i] * z[j] : j == i ? g * w[i] * z[i] - diag_coefficient / L_ii : acc_t(0);
              write_matrix_gradient<kParam>(a, tril, out, k, i, j, gij);
            }
          }
        } else {
          // d/dSigma = 1/2 (w w^T - Sigma^{-1}); column j of Sigma^{-1} is L^{-T} L^{-1} e_j,
          // solved into z (no longer needed), so no k x k inverse is kept.
          const acc_t* L = shared_matrix ? staged : factor;
          for (int64_t j = 0; j < k; ++j) {
            for (int64_t i = 0; i < k; ++i) z[i] = i == j ? acc_t(1) : acc_t(0);
            math::solve_lower<1>(k, L, z);
            math::solve_lower_transposed<1>(k, L, z);
            for (int64_t i = j; i < k; ++i) {
              const auto gij = static_cast<scalar_t>(acc_t(0.5) * g * (w[i] * w[j] - z[i]));
              out[i * k + j] = gij;
              out[j * k + i] = gij;
            }
          }
        }
      }
    }
    if (reduces) {
      // The terms g w, v (z for scale_tril, w for covariance) and g.
      add_block_terms(k, active, g, w, kCovariance ? w : z, g, o.reduce_matrix, gw_rows, v_rows, g_row,
                      block_partials);
    }
  }
}

// ---------------------------------------------------------------------------------------
// A warp per sample, for per-sample matrices with k >= kWarpMinEventSize: the sample's factor
// sits in the warp's rows of shared memory and its vectors in kSlots slots per lane, with the
// team math of csrc/math/team_math.h. Warps are independent; the samples of a grid stride
// go to the grid's warps in order.

/// Whether a problem runs a warp per sample.
inline bool warp_per_sample(const MvnProblem& p) { return !p.matrix.shared() && p.k >= kWarpMinEventSize; }

/// Stages sample b's matrix in the warp's rows `L` (ld apart): the lower triangle of its
/// scale_tril (packed: unpacked), or of its covariance, factorised there. Returns, in every lane, false when the
/// covariance is not positive-definite.
template <Param kParam, typename scalar_t, typename acc_t>
__device__ bool stage_sample_factor(const Warp& warp, const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* L,
                                    int64_t ld) {
  const scalar_t* m = a.matrix + b * a.matrix_stride;
  stage_lower(warp, k, [&](int64_t i, int64_t j) { return lower_entry<kParam>(a, m, k, i, j); }, L, ld);
  if constexpr (kParam == Param::kCovariance) {
    return math::team_cholesky_in_place(warp, k, L, ld);
  }
  warp.sync();
  return true;
}

/// Runs body(b, ok) for each of this warp's samples b, with the sample's factor staged in the
/// warp's first matrix (stage_sample_factor, whose `ok` it passes on). The warp syncs after
/// each body, so that every lane is done with the factor before the next one is staged.
template <Param kParam, typename scalar_t, typename acc_t, typename Body>
__device__ void for_each_warp_sample(const Warp& warp, const WarpGrid& grid, const MvnOperands<scalar_t>& a,
                                     const WarpMatrices<acc_t>& matrices, const Body& body) {
  for (int64_t b = grid.first; b < a.n; b += grid.stride) {
    body(b, stage_sample_factor<kParam>(warp, a, b, a.k, matrices[0], matrices.ld));
    warp.sync();
  }
}

/// This lane's slots of d = value - loc for sample b (zero past k); the return value is the
/// Jacobian of a squashed value, summed over the warp.
template <int kSlots, typename scalar_t, typename acc_t>
__device__ acc_t load_difference_slots(const Warp& warp, const MvnOperands<scalar_t>& a, int64_t b, int64_t k,
                                       acc_t (&d)[kSlots]) {
  acc_t jacobian = 0;
  for (int t = 0; t < kSlots; ++t) {
    const int64_t i = math::entry_index(warp, t);
    d[t] = i < k ? difference_entry(a, b, i, jacobian) : acc_t(0);
  }
  return a.squash.squashed ? warp.sum(jacobian) : acc_t(0);
}

/// The gradient terms a warp sums for a shared value or loc (the matrix is per sample on
/// this path): a k-vector in slots and a number, added over the warp's samples in order.
/// write_block_partials then adds the block's warps in order into its row of partial sums, in
/// the layout of partial_width (the vector, the matrix part zero, the number), for
/// finish_reduction_kernel.
template <int kSlots, typename acc_t>
struct WarpSums {
  acc_t vector[kSlots] = {};
  acc_t number = 0;

  __device__ void add(const acc_t (&v)[kSlots], acc_t c) {
    for (int t = 0; t < kSlots; ++t) vector[t] += v[t];
    number += c;
  }

  /// Every thread of the block calls this once, after its samples. `rows` is shared-memory
  /// scratch of (k + 1) entries per warp.
  __device__ void write_block_partials(const Warp& warp, const WarpGrid& grid, int64_t k, acc_t* rows,
                                       acc_t* partials) const {
    acc_t* mine = rows + grid.index * (k + 1);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = math::entry_index(warp, t);
      if (i < k) mine[i] = vector[t];
    }
    if (warp.lane() == 0) mine[k] = number;
    __syncthreads();
    const int64_t width = partial_width(k);
    acc_t* block_partials = partials + blockIdx.x * width;
    for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
      const int64_t column = e < k ? e : e == width - 1 ? k : -1;
      acc_t s = 0;
      if (column >= 0) {
        for (int r = 0; r < grid.warps; ++r) s += rows[r * (k + 1) + column];
      }
      block_partials[e] = s;
    }
  }
};

/// This lane's slots of a sample's noise (the "value" operand of an rsample) and loc, zero
/// past k.
template <int kSlots, typename scalar_t, typename acc_t>
__device__ void load_noise_and_loc(const Warp& warp, const MvnOperands<scalar_t>& a, int64_t b, int64_t k,
                                   acc_t (&eps)[kSlots], acc_t (&loc)[kSlots]) {
  for (int t = 0; t < kSlots; ++t) {
    const int64_t i = math::entry_index(warp, t);
    eps[t] = i < k ? static_cast<acc_t>(a.value[b * a.value_stride + i]) : acc_t(0);
    loc[t] = i < k ? static_cast<acc_t>(a.loc[b * a.loc_stride + i]) : acc_t(0);
  }
}

template <Param kParam, int kSlots, typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_log_prob_forward_kernel(const MvnOperands<scalar_t> a, scalar_t* __restrict__ out,
                                 scalar_t* __restrict__ log_det_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Warp warp;
  const WarpGrid grid;
  const int64_t k = a.k;
  const WarpMatrices<acc_t> matrices(grid, k, 1);
  const int64_t ld = matrices.ld;
  acc_t* L = matrices[0];
  for_each_warp_sample<kParam>(warp, grid, a, matrices, [&](int64_t b, bool ok) {
    acc_t z[kSlots];
    const acc_t jacobian = load_difference_slots(warp, a, b, k, z);
    math::team_solve_lower(warp, k, L, ld, z);
    const acc_t squared_norm = math::team_dot(warp, k, z, z);
    const acc_t log_det = math::team_sum_log_diagonal(warp, k, L, ld);
    if (warp.lane() == 0) {
      out[b] = ok ? static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det) - jacobian)
                  : quiet_nan<scalar_t>();
      if (log_det_out != nullptr) log_det_out[b] = static_cast<scalar_t>(log_det);
    }
  });
}

/// The backward of warp_log_prob_forward_kernel, with the gradients of log_prob_backward_kernel.
/// A covariance's gradient 1/2 g (w w^T - Sigma^{-1}) takes Sigma^{-1} from L^{-1}, kept in a
/// second matrix of the warp's shared memory. A shared value or loc gets the sums of g w and
/// g (WarpSums).
template <Param kParam, int kSlots, typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_log_prob_backward_kernel(const MvnOperands<scalar_t> a, const BackwardOutputs<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kCovariance = kParam == Param::kCovariance;
  const Warp warp;
  const WarpGrid grid;
  const int64_t k = a.k;
  // Shared memory: each warp's matrices (L, then L^{-1} for a covariance), then each warp's
  // sums of g w (k) and g.
  const WarpMatrices<acc_t> matrices(grid, k, kCovariance ? 2 : 1);
  const int64_t ld = matrices.ld;
  acc_t* L = matrices[0];
  acc_t* L_inv = kCovariance ? matrices[1] : nullptr;
  WarpSums<kSlots, acc_t> sums;
  for_each_warp_sample<kParam>(warp, grid, a, matrices, [&](int64_t b, bool ok) {
    acc_t z[kSlots];
    load_difference_slots(warp, a, b, k, z);
    math::team_solve_lower(warp, k, L, ld, z);
    acc_t w[kSlots];
    for (int t = 0; t < kSlots; ++t) w[t] = z[t];
    math::team_solve_lower_transposed(warp, k, L, ld, w);
    const acc_t g = ok ? static_cast<acc_t>(o.grad[b]) : quiet_nan<acc_t>();
    const acc_t diag_coefficient = o.grad_log_det != nullptr ? g - static_cast<acc_t>(o.grad_log_det[b]) : g;
    acc_t gw[kSlots];
    for (int t = 0; t < kSlots; ++t) gw[t] = g * w[t];
    sums.add(gw, g);
    // d log p / d value = -w, d log p / d loc = w.
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = math::entry_index(warp, t);
      if (i >= k) continue;
      if (o.value_rows != nullptr) {
        const acc_t x = static_cast<acc_t>(a.value[b * a.value_stride + i]);
        o.value_rows[b * k + i] = static_cast<scalar_t>(value_gradient<scalar_t>(a.squash, x, -gw[t], g));
      }
      if (o.loc_rows != nullptr) o.loc_rows[b * k + i] = static_cast<scalar_t>(gw[t]);
    }
    if (o.matrix_rows != nullptr) {
      // Row by row, the lanes across the columns: lane j % 32 holds z_j and w_j.
      const scalar_t* m = a.matrix + b * a.matrix_stride;
      scalar_t* out = o.matrix_rows + b * matrix_row_width<kParam>(k);
      if constexpr (kCovariance) math::team_invert_lower(warp, k, L, ld, L_inv, ld);
      for (int64_t i = 0; i < k; ++i) {
        const acc_t w_i = math::team_entry(warp, w, i);
        for (int t = 0; t < kSlots; ++t) {
          const int64_t j = math::entry_index(warp, t);
          if (j >= k) continue;
          acc_t gij;
          if constexpr (kCovariance) {
            // d/dSigma = 1/2 g (w w^T - Sigma^{-1}), symmetric to the bit: w_i w_j commutes, and
            // inverse_product_entry sums the same products in the same order for (j, i).
            gij = acc_t(0.5) * g * (w_i * w[t] - math::inverse_product_entry(k, L_inv, ld, i, j));
          } else {
            // d/dL = tril(g w z^T) - c diag(1/L_ii), c = g - h, packed through dL_ii/dx_ii.
            const acc_t gw_i = g * w_i;
            gij = j < i ? gw_i * z[t] : j == i ? gw_i * z[t] - diag_coefficient / L[i * ld + i] : acc_t(0);
          }
          write_matrix_gradient<kParam>(a, m, out, k, i, j, gij);
        }
      }
    }
  });
  if (o.partials != nullptr) sums.write_block_partials(warp, grid, k, matrices.past_matrices, o.partials);
}

/// One block: adds the blocks' partial sums in block order, then writes the reduced
/// gradients: value -sum g w (squashed: through value_gradient, with the value shared by every
/// sample), loc sum g w, and the matrix's from sum g w v^T and sum g:
///   scale_tril: tril(sum g w z^T) - (sum g) diag(1/L_ii)
///   packed:     the same, in packed order, the diagonal times dL_ii/dx_ii
///   covariance: 1/2 (sum g w w^T - (sum g) Sigma^{-1}), symmetric.
/// The operands of `a` are the shared ones. `scratch` holds partial_width(k) + 2 k^2 entries;
/// a shared covariance's factor and inverse are computed there by thread 0 (O(k^3) once, as
/// the forward kernel's blocks do).
template <Param kParam, typename scalar_t>
__global__ void finish_reduction_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int64_t blocks,
                                        const MvnOperands<scalar_t> a,
                                        at::opmath_type<scalar_t>* __restrict__ scratch, scalar_t* value_grad,
                                        scalar_t* loc_grad, scalar_t* matrix_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = a.k;
  const scalar_t* matrix = a.matrix;
  const int64_t width = partial_width(k);
  acc_t* total = scratch;
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    acc_t s = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) s += partials[blk * width + e];
    total[e] = s;
  }
  __syncthreads();
  const acc_t grad_sum = total[k + k * k];
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    if (value_grad != nullptr) {
      const acc_t x = static_cast<acc_t>(a.value[i]);
      value_grad[i] = static_cast<scalar_t>(value_gradient<scalar_t>(a.squash, x, -total[i], grad_sum));
    }
    if (loc_grad != nullptr) loc_grad[i] = static_cast<scalar_t>(total[i]);
  }
  if (matrix_grad == nullptr) return;
  const acc_t* outer = total + k;
  if constexpr (kParam != Param::kCovariance) {
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
      const int64_t i = e / k;
      const int64_t j = e % k;
      const acc_t L_ii = lower_entry<kParam>(a, matrix, k, i, i);
      const acc_t gij = j < i ? outer[e] : j == i ? outer[e] - grad_sum / L_ii : acc_t(0);
      write_matrix_gradient<kParam>(a, matrix, matrix_grad, k, i, j, gij);
    }
  } else {
    acc_t* L = scratch + width;
    acc_t* column = L + k * k;
    if (threadIdx.x == 0) {
      for (int64_t e = 0; e < k * k; ++e) L[e] = static_cast<acc_t>(matrix[e]);
      bool ok = true;
      math::cholesky_in_place<1>(k, L, &ok);
      for (int64_t j = 0; j < k; ++j) {
        acc_t* x = column + j * k;  // column j of Sigma^{-1}
        for (int64_t i = 0; i < k; ++i) x[i] = i == j ? acc_t(1) : acc_t(0);
        math::solve_lower<1>(k, L, x);
        math::solve_lower_transposed<1>(k, L, x);
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
      const int64_t i = e / k;
      const int64_t j = e % k;
      const int64_t lower = i >= j ? e : j * k + i;
      matrix_grad[e] = static_cast<scalar_t>(acc_t(0.5) * (outer[lower] - grad_sum * column[j * k + i]));
    }
  }
}

/// A reparameterised squashed sample per thread, with no solve: u = loc + L eps, the action
/// tanh(u), and the log-prob -1/2 ||eps||^2 - sum_i log L_ii - (k/2) log 2 pi
/// - sum_i log(1 - tanh(u_i)^2). The "value" operand of `a` is eps.
template <int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    rsample_forward_kernel(const MvnOperands<scalar_t> a, scalar_t* __restrict__ action,
                           scalar_t* __restrict__ pre_tanh, scalar_t* __restrict__ log_prob) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : a.k;
  const bool shared_matrix = a.matrix_stride == 0;
  acc_t* staged = static_cast<acc_t*>(dynamic_shared_memory());
  __shared__ bool staged_ok;
  __shared__ acc_t staged_log_det;
  if (shared_matrix) {
    stage_shared_factor<Param::kScaleTril>(a, k, staged, &staged_ok, &staged_log_det);
  }
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < a.n;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t eps[kMaxK];
    acc_t u[kMaxK];
    acc_t squared_norm = 0;
    for (int64_t i = 0; i < k; ++i) {
      eps[i] = static_cast<acc_t>(a.value[b * a.value_stride + i]);
      u[i] = static_cast<acc_t>(a.loc[b * a.loc_stride + i]);
      squared_norm += eps[i] * eps[i];
    }
    acc_t log_det;
    if (shared_matrix) {
      math::add_lower_times<1>(k, staged, eps, u);
      log_det = staged_log_det;
    } else {
      const scalar_t* L = a.matrix + b * a.matrix_stride;
      math::add_lower_times<1>(k, L, eps, u);
      math::sum_log_diagonal<1>(k, L, &log_det);
    }
    acc_t jacobian = 0;
    for (int64_t i = 0; i < k; ++i) {
      const math::TanhTerms<acc_t> tt = math::tanh_terms(u[i]);
      action[b * k + i] = static_cast<scalar_t>(tt.tanh);
      pre_tanh[b * k + i] = static_cast<scalar_t>(u[i]);
      jacobian += tt.log_det;
    }
    log_prob[b] = static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det) - jacobian);
  }
}

/// Gradients of loc, scale_tril and eps (the "value" rows of `o`) from those of the action,
/// u and the log-prob, with g_u = pre_tanh_gradient per entry (csrc/math/squash_math.h):
///   d/dloc = g_u,  d/dL = tril(g_u eps^T) - g_log_prob diag(1/L_ii),
///   d/deps = L^T g_u - g_log_prob eps.
/// A shared loc or scale_tril is reduced like the log-prob's (g_u, eps and g_log_prob take the
/// places of g w, z and g), and finished by finish_reduction_kernel<kScaleTril>; the "value"
/// rows of `o` are eps's.
template <int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads) rsample_backward_kernel(const MvnOperands<scalar_t> a,
                                                                    const RsampleUpstream<scalar_t> up,
                                                                    const BackwardOutputs<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : a.k;
  const bool shared_matrix = a.matrix_stride == 0;
  const bool reduces = o.partials != nullptr;
  const int threads = blockDim.x;
  acc_t* staged = static_cast<acc_t*>(dynamic_shared_memory());
  acc_t* a_rows = staged + (shared_matrix ? k * k : 0);
  acc_t* v_rows = a_rows + threads * k;
  acc_t* c_row = v_rows + threads * k;
  __shared__ bool staged_ok;
  if (shared_matrix) {
    stage_shared_factor<Param::kScaleTril>(a, k, staged, &staged_ok, static_cast<acc_t*>(nullptr));
  }
  acc_t* block_partials = reduces ? o.partials + blockIdx.x * partial_width(k) : nullptr;
  if (reduces) {
    for (int64_t e = threadIdx.x; e < partial_width(k); e += threads) block_partials[e] = 0;
  }

  for (int64_t base = blockIdx.x * static_cast<int64_t>(threads); base < a.n;
       base += static_cast<int64_t>(gridDim.x) * threads) {
    const int64_t b = base + threadIdx.x;
    const bool active = b < a.n;
    acc_t eps[kMaxK];
    acc_t g_u[kMaxK];  // u first, then its gradient
    acc_t g_log_prob = 0;
    if (active) {
      const scalar_t* tril = shared_matrix ? nullptr : a.matrix + b * a.matrix_stride;
      const auto L = [&](int64_t i, int64_t j) {
        return shared_matrix ? staged[i * k + j] : static_cast<acc_t>(tril[i * k + j]);
      };
      for (int64_t i = 0; i < k; ++i) {
        eps[i] = static_cast<acc_t>(a.value[b * a.value_stride + i]);
        g_u[i] = static_cast<acc_t>(a.loc[b * a.loc_stride + i]);
      }
      if (shared_matrix) {
        math::add_lower_times<1>(k, staged, eps, g_u);
      } else {
        math::add_lower_times<1>(k, tril, eps, g_u);
      }
      g_log_prob = up.at(up.log_prob, b);
      for (int64_t i = 0; i < k; ++i) {
        g_u[i] = math::pre_tanh_gradient(math::tanh_terms(g_u[i]), up.at(up.action, b * k + i),
                                         up.at(up.pre_tanh, b * k + i), g_log_prob);
        if (o.loc_rows != nullptr) o.loc_rows[b * k + i] = static_cast<scalar_t>(g_u[i]);
      }
      if (o.value_rows != nullptr) {
        for (int64_t j = 0; j < k; ++j) {
          acc_t s = -g_log_prob * eps[j];
          for (int64_t i = j; i < k; ++i) s += L(i, j) * g_u[i];
          o.value_rows[b * k + j] = static_cast<scalar_t>(s);
        }
      }
      if (o.matrix_rows != nullptr) {
        scalar_t* out = o.matrix_rows + b * k * k;
        for (int64_t i = 0; i < k; ++i) {
          for (int64_t j = 0; j < k; ++j) {
            const acc_t gij = j < i ? g_u[i] * eps[j] : j == i ? g_u[i] * eps[i] - g_log_prob / L(i, i) : acc_t(0);
            out[i * k + j] = static_cast<scalar_t>(gij);
          }
        }
      }
    }
    if (reduces) {
      add_block_terms(k, active, acc_t(1), g_u, eps, g_log_prob, o.reduce_matrix, a_rows, v_rows, c_row,
                      block_partials);
    }
  }
}

/// rsample_forward_kernel with a warp per sample (a per-sample scale_tril, k >=
/// kWarpMinEventSize): u = loc + L eps with L in the warp's shared rows and eps, u in slots.
template <int kSlots, typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_rsample_forward_kernel(const MvnOperands<scalar_t> a, scalar_t* __restrict__ action,
                                scalar_t* __restrict__ pre_tanh, scalar_t* __restrict__ log_prob) {
  using acc_t = at::opmath_type<scalar_t>;
  const Warp warp;
  const WarpGrid grid;
  const int64_t k = a.k;
  const WarpMatrices<acc_t> matrices(grid, k, 1);
  const int64_t ld = matrices.ld;
  acc_t* L = matrices[0];
  for_each_warp_sample<Param::kScaleTril>(warp, grid, a, matrices, [&](int64_t b, bool) {
    acc_t eps[kSlots];
    acc_t u[kSlots];
    load_noise_and_loc(warp, a, b, k, eps, u);
    math::team_add_lower_times(warp, k, L, ld, eps, u);
    const acc_t squared_norm = math::team_dot(warp, k, eps, eps);
    const acc_t log_det = math::team_sum_log_diagonal(warp, k, L, ld);
    acc_t jacobian = 0;
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = math::entry_index(warp, t);
      if (i >= k) continue;
      const math::TanhTerms<acc_t> tt = math::tanh_terms(u[t]);
      action[b * k + i] = static_cast<scalar_t>(tt.tanh);
      pre_tanh[b * k + i] = static_cast<scalar_t>(u[t]);
      jacobian += tt.log_det;
    }
    jacobian = warp.sum(jacobian);
    if (warp.lane() == 0) {
      log_prob[b] = static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det) - jacobian);
    }
  });
}

/// rsample_backward_kernel with a warp per sample: the same gradients, L^T g_u by rows of L
/// across the lanes, the scale_tril gradient row by row with the lanes across the columns; a
/// shared loc gets the sums of g_u and g_log_prob (WarpSums).
template <int kSlots, typename scalar_t>
__global__ void __launch_bounds__(kWarpKernelThreads)
    warp_rsample_backward_kernel(const MvnOperands<scalar_t> a, const RsampleUpstream<scalar_t> up,
                                 const BackwardOutputs<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  const Warp warp;
  const WarpGrid grid;
  const int64_t k = a.k;
  const WarpMatrices<acc_t> matrices(grid, k, 1);
  const int64_t ld = matrices.ld;
  acc_t* L = matrices[0];
  WarpSums<kSlots, acc_t> sums;
  for_each_warp_sample<Param::kScaleTril>(warp, grid, a, matrices, [&](int64_t b, bool) {
    acc_t eps[kSlots];
    acc_t g_u[kSlots];  // u first, then its gradient
    load_noise_and_loc(warp, a, b, k, eps, g_u);
    math::team_add_lower_times(warp, k, L, ld, eps, g_u);
    const acc_t g_log_prob = up.at(up.log_prob, b);
    for (int t = 0; t < kSlots; ++t) {
      const int64_t i = math::entry_index(warp, t);
      g_u[t] = i < k ? math::pre_tanh_gradient(math::tanh_terms(g_u[t]), up.at(up.action, b * k + i),
                                               up.at(up.pre_tanh, b * k + i), g_log_prob)
                     : acc_t(0);
      if (i < k && o.loc_rows != nullptr) o.loc_rows[b * k + i] = static_cast<scalar_t>(g_u[t]);
    }
    sums.add(g_u, g_log_prob);
    if (o.value_rows != nullptr) {
      // d/deps = L^T g_u - g_log_prob eps
      acc_t d_eps[kSlots];
      math::team_lower_transposed_times(warp, k, L, ld, g_u, d_eps);
      for (int t = 0; t < kSlots; ++t) {
        const int64_t i = math::entry_index(warp, t);
        if (i < k) o.value_rows[b * k + i] = static_cast<scalar_t>(d_eps[t] - g_log_prob * eps[t]);
      }
    }
    if (o.matrix_rows != nullptr) {
      // d/dL = tril(g_u eps^T) - g_log_prob diag(1/L_ii), row by row.
      scalar_t* out = o.matrix_rows + b * k * k;
      for (int64_t i = 0; i < k; ++i) {
        const acc_t g_u_i = math::team_entry(warp, g_u, i);
        for (int t = 0; t < kSlots; ++t) {
          const int64_t j = math::entry_index(warp, t);
          if (j >= k) continue;
          const acc_t gij = j < i ? g_u_i * eps[t] : j == i ? g_u_i * eps[t] - g_log_prob / L[i * ld + i] : acc_t(0);
          out[i * k + j] = static_cast<scalar_t>(gij);
        }
      }
    }
  });
  if (o.partials != nullptr) sums.write_block_partials(warp, grid, k, matrices.past_matrices, o.partials);
}

/// The kernels behind this device's log-prob ops (LogProbOps, csrc/common/op_wrappers.h).
struct LogProbKernels {
  template <Param kParam>
  static void forward(const MvnProblem& p, at::Tensor& out, ValueSquash squash, const at::Tensor& log_det);
  template <Param kParam>
  static std::array<at::Tensor, 3> backward(const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask,
                                            ValueSquash squash, const at::Tensor& grad_log_det,
                                            const at::Tensor& head_rows = at::Tensor());
};

template <Param kParam>
void LogProbKernels::forward(const MvnProblem& p, at::Tensor& out, ValueSquash squash, const at::Tensor& log_det) {
  const c10::cuda::CUDAGuard guard(out.device());
  if (p.layout.batch_numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), forward_op_name(kParam), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* log_det_out = log_det.defined() ? log_det.data_ptr<scalar_t>() : nullptr;
    if (warp_per_sample(p)) {
      check_event_size(forward_op_name(kParam), p.k);
      const LaunchShape shape = warp_launch_shape<acc_t>(p.layout.batch_numel, p.k, 1);
      with_warp_slots(p.k, [&](auto kSlots) {
        launch(warp_log_prob_forward_kernel<kParam, decltype(kSlots)::value, scalar_t>, shape.blocks, shape.threads,
               shape.shared_bytes, MvnOperands<scalar_t>(p, squash), out.data_ptr<scalar_t>(), log_det_out);
      });
      return;
    }
    with_event_size<scalar_t>(forward_op_name(kParam), p.k, [&](auto K, auto kMaxK) {
      const size_t shared_bytes = p.matrix.shared() ? p.k * p.k * sizeof(acc_t) : 0;
      launch(log_prob_forward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>,
             blocks_for(p.layout.batch_numel, kThreads), kThreads, shared_bytes, MvnOperands<scalar_t>(p, squash),
             out.data_ptr<scalar_t>(), log_det_out);
    });
  });
}

/// The launch of a thread-per-sample backward kernel: a reducing one keeps each thread's terms
/// in shared memory (reducing_threads), beside a staged shared matrix.
template <typename acc_t>
LaunchShape thread_backward_launch_shape(const MvnProblem& p, bool reduces) {
  const int64_t k = p.k;
  const int threads = reduces ? reducing_threads<acc_t>(k) : kThreads;
  size_t shared_elements = p.matrix.shared() ? k * k : 0;
  if (reduces) shared_elements += static_cast<size_t>(threads) * (2 * k + 1);
  return {blocks_for(p.layout.batch_numel, threads), threads, shared_elements * sizeof(acc_t)};
}

/// Runs a backward kernel of an (value-like vector, loc, matrix) problem, in the kernel's
/// order of its operands: gradients that are per sample come out as rows, those of operands
/// that reduce come from the blocks' partial sums and finish_reduction_kernel<kParam>.
/// `launch_kernel(shape, outputs)` launches the kernel, a warp per sample when `warps` (with
/// `warp_matrices` matrices per warp), a thread per sample otherwise; `grad` is the upstream
/// gradient of a log-prob (or nullptr: the kernel reads its own), `grad_log_det` that of a
/// scale_tril or packed op's log_det (or nullptr).
template <Param kParam, typename LaunchKernel>
std::array<at::Tensor, 3> run_backward(const char* op, const MvnProblem& p, const at::Tensor& like, const void* grad,
                                       const void* grad_log_det, std::array<bool, 3> mask, ValueSquash squash,
                                       bool warps, int warp_matrices, const LaunchKernel& launch_kernel) {
  const c10::cuda::CUDAGuard guard(like.device());
  const auto options = like.options();
  const int64_t n = p.layout.batch_numel;
  const int64_t k = p.k;
  const std::array<const BatchedOperand*, 3> operands{&p.value, &p.loc, &p.matrix};
  const std::array<std::vector<int64_t>, 3> events{
      {{k}, {k}, kParam == Param::kPacked ? std::vector<int64_t>{math::packed_size(k)} : std::vector<int64_t>{k, k}}};
  std::array<at::Tensor, 3> grads;
  bool reduces = false;
  for (size_t i = 0; i < 3; ++i) {
    if (!mask[i]) continue;
    const bool reduced = operands[i]->reduces_gradient;
    reduces = reduces || reduced;
    std::vector<int64_t> shape = events[i];
    if (!reduced) shape.insert(shape.begin(), n);
    grads[i] = at::empty(shape, options);
  }
  const auto output = [&](size_t i, bool reduced) -> void* {
    return mask[i] && operands[i]->reduces_gradient == reduced ? grads[i].data_ptr() : nullptr;
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "fusedgauss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
    check_event_size(op, k);
    // A reducing warp kernel keeps each warp's sums of g w and g (k + 1) beside its matrices.
    const LaunchShape shape = warps ? warp_launch_shape<acc_t>(n, k, warp_matrices, reduces ? k + 1 : 0)
                                    : thread_backward_launch_shape<acc_t>(p, reduces);
    at::Tensor partials;
    if (reduces) partials = at::empty({shape.blocks, partial_width(k)}, acc_options);
    const BackwardOutputs<scalar_t> o{static_cast<const scalar_t*>(grad),
                                      static_cast<scalar_t*>(output(0, false)),
                                      static_cast<scalar_t*>(output(1, false)),
                                      static_cast<scalar_t*>(output(2, false)),
                                      reduces ? partials.data_ptr<acc_t>() : nullptr,
                                      mask[2] && p.matrix.reduces_gradient,
                                      static_cast<const scalar_t*>(grad_log_det)};
    if (n > 0) {
      launch_kernel(shape, o);
    } else if (reduces) {
      partials.zero_();
    }
    if (reduces) {
      at::Tensor scratch = at::empty({partial_width(k) + 2 * k * k}, acc_options);
      launch(finish_reduction_kernel<kParam, scalar_t>, 1, kThreads, 0, partials.const_data_ptr<acc_t>(),
             static_cast<int64_t>(partials.size(0)), MvnOperands<scalar_t>(p, squash), scratch.data_ptr<acc_t>(),
             static_cast<scalar_t*>(output(0, true)), static_cast<scalar_t*>(output(1, true)),
             static_cast<scalar_t*>(output(2, true)));
    }
  });
  return grads;
}

template <Param kParam>
std::array<at::Tensor, 3> LogProbKernels::backward(const MvnProblem& p, const at::Tensor& grad,
                                                   std::array<bool, 3> mask, ValueSquash squash,
                                                   const at::Tensor& grad_log_det, const at::Tensor& head_rows) {
  const char* op = backward_op_name(kParam);
  const bool warps = warp_per_sample(p);
  // The kernels write rows of their own; head rows (packed_head_log_prob_backward) take
  // copies of them, for now.
  if (head_rows.defined()) {
    std::array<at::Tensor, 3> grads = backward<kParam>(p, grad, mask, squash, grad_log_det);
    head_rows.narrow(1, 0, p.k).copy_(grads[1]);
    head_rows.narrow(1, p.k, head_rows.size(1) - p.k).copy_(grads[2]);
    return grads;
  }
  return run_backward<kParam>(
      op, p, grad, grad.const_data_ptr(), grad_log_det.defined() ? grad_log_det.const_data_ptr() : nullptr, mask,
      squash, warps, kParam == Param::kCovariance ? 2 : 1,
      [&](const LaunchShape& shape, const auto& o) {
        using scalar_t = typename std::decay_t<decltype(o)>::scalar_type;
        if (warps) {
          with_warp_slots(p.k, [&](auto kSlots) {
            launch(warp_log_prob_backward_kernel<kParam, decltype(kSlots)::value, scalar_t>, shape.blocks,
                   shape.threads, shape.shared_bytes, MvnOperands<scalar_t>(p, squash), o);
          });
          return;
        }
        with_event_size<scalar_t>(op, p.k, [&](auto K, auto kMaxK) {
          launch(log_prob_backward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>, shape.blocks,
                 shape.threads, shape.shared_bytes, MvnOperands<scalar_t>(p, squash), o);
        });
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_tril_rsample_log_prob(const at::Tensor& loc,
                                                                              const at::Tensor& scale_tril,
                                                                              const at::Tensor& eps) {
  constexpr const char* op = "squashed_tril_rsample_log_prob";
  const MvnProblem p = prepare_mvn_problem(op, "scale_tril", eps, loc, scale_tril, "eps");
  RsampleOutputs out = empty_rsample_outputs(p.layout, p.k, loc.options());
  const c10::cuda::CUDAGuard guard(loc.device());
  if (p.layout.batch_numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (warp_per_sample(p)) {
        check_event_size(op, p.k);
        const LaunchShape shape = warp_launch_shape<acc_t>(p.layout.batch_numel, p.k, 1);
        with_warp_slots(p.k, [&](auto kSlots) {
          launch(warp_rsample_forward_kernel<decltype(kSlots)::value, scalar_t>, shape.blocks, shape.threads,
                 shape.shared_bytes, MvnOperands<scalar_t>(p), out.action.data_ptr<scalar_t>(),
                 out.pre_tanh.data_ptr<scalar_t>(), out.log_prob.data_ptr<scalar_t>());
        });
        return;
      }
      with_event_size<scalar_t>(op, p.k, [&](auto K, auto kMaxK) {
        const size_t shared_bytes = p.matrix.shared() ? p.k * p.k * sizeof(acc_t) : 0;
        launch(rsample_forward_kernel<decltype(K)::value, decltype(kMaxK)::value, scalar_t>,
               blocks_for(p.layout.batch_numel, kThreads), kThreads, shared_bytes, MvnOperands<scalar_t>(p),
               out.action.data_ptr<scalar_t>(), out.pre_tanh.data_ptr<scalar_t>(), out.log_prob.data_ptr<scalar_t>());
      });
    });
  }
  return {out.action, out.pre_tanh, out.log_prob};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_tril_rsample_log_prob_backward(
    const c10::optional<at::Tensor>& grad_action, const c10::optional<at::Tensor>& grad_pre_tanh,
    const c10::optional<at::Tensor>& grad_log_prob, const at::Tensor& loc, const at::Tensor& scale_tril,
    const at::Tensor& eps, std::array<bool, 3> mask) {
  constexpr const char* op = "squashed_tril_rsample_log_prob_backward";
  MvnProblem p = prepare_mvn_problem(op, "scale_tril", eps, loc, scale_tril, "eps");
  // Noise shared by the batch (an odd input, but a valid one) is read per sample, so that its
  // gradient comes out in rows that the wrapper sums; the reductions carry loc and L.
  at::Tensor eps_rows = eps;
  if (mask[2] && p.value.shared()) {
    std::vector<int64_t> rows(p.layout.batch_shape);
    rows.push_back(p.k);
    eps_rows = eps.expand(rows).contiguous();
    p = prepare_mvn_problem(op, "scale_tril", eps_rows, loc, scale_tril, "eps");
  }
  const RsampleGradients upstream =
      check_rsample_gradients(op, grad_action, grad_pre_tanh, grad_log_prob, loc, p.layout, p.k);
  // The kernel's operand order is (eps, loc, scale_tril); the op's is (loc, scale_tril, eps).
  const bool warps = warp_per_sample(p);
  const std::array<at::Tensor, 3> kernel_grads = run_backward<Param::kScaleTril>(
      op, p, loc, nullptr, nullptr, {mask[2], mask[0], mask[1]}, ValueSquash{}, warps, 1,
      [&](const LaunchShape& shape, const auto& o) {
        using scalar_t = typename std::decay_t<decltype(o)>::scalar_type;
        if (warps) {
          with_warp_slots(p.k, [&](auto kSlots) {
            launch(warp_rsample_backward_kernel<decltype(kSlots)::value, scalar_t>, shape.blocks, shape.threads,
                   shape.shared_bytes, MvnOperands<scalar_t>(p), RsampleUpstream<scalar_t>(upstream), o);
          });
          return;
        }
        with_event_size<scalar_t>(op, p.k, [&](auto K, auto kMaxK) {
          launch(rsample_backward_kernel<decltype(K)::value, decltype(kMaxK)::value, scalar_t>, shape.blocks,
                 shape.threads, shape.shared_bytes, MvnOperands<scalar_t>(p), RsampleUpstream<scalar_t>(upstream), o);
        });
      });
  const std::array<at::Tensor, 3> grads{kernel_grads[1], kernel_grads[2], kernel_grads[0]};
  return gradients_for_inputs(grads, {&loc, &scale_tril, &eps}, {&p.loc, &p.matrix, &p.value}, p.layout, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  LogProbOps<LogProbKernels>::register_kernels(m);
  m.impl("squashed_tril_rsample_log_prob", &squashed_tril_rsample_log_prob);
  m.impl("squashed_tril_rsample_log_prob_backward", &squashed_tril_rsample_log_prob_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
