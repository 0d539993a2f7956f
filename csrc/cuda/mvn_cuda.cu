// CUDA kernels of the full-covariance Gaussian ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
//   squashed_tril_log_prob(value, loc, scale_tril, value_is_pre_tanh)   and its backward
//   squashed_tril_rsample_log_prob(loc, scale_tril, eps)               and its backward
// One thread per sample, around the per-sample math of csrc/math with one lane (W = 1). A
// per-sample scale_tril is read in place from global memory; a per-sample covariance is
// factorised into the thread's private array and never written out. A matrix shared by the
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
#include "../math/squash_math.h"
#include "launch.cuh"
#include "rsample_upstream.cuh"

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

  explicit MvnOperands(const MvnProblem& p, ValueSquash squash = {})
      : value(p.value.data.const_data_ptr<scalar_t>()),
        value_stride(p.value.batch_stride),
        loc(p.loc.data.const_data_ptr<scalar_t>()),
        loc_stride(p.loc.batch_stride),
        matrix(p.matrix.data.const_data_ptr<scalar_t>()),
        matrix_stride(p.matrix.batch_stride),
        n(p.layout.batch_numel),
        k(p.k),
        squash(squash) {}
};

/// Dynamic shared memory of a block, aligned for any acc_t.
__device__ inline void* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return shared_bytes;
}

/// A matrix shared by the batch, staged in shared memory by the whole block: copied, and
/// factorised by thread 0 when it is a covariance. `ok` is false when that factorisation
/// fails; `log_det` (optional) receives sum_i log L_ii.
template <Param kParam, typename scalar_t, typename acc_t>
__device__ void stage_shared_factor(const scalar_t* matrix, int64_t k, acc_t* staged, bool* ok, acc_t* log_det) {
  for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) staged[e] = static_cast<acc_t>(matrix[e]);
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

/// d = value - loc for sample b; squashed, d = u - loc and the return value is the Jacobian
/// sum_i log(1 - tanh(u_i)^2) (0 otherwise).
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE acc_t load_difference(const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* d) {
  const scalar_t* value = a.value + b * a.value_stride;
  const scalar_t* loc = a.loc + b * a.loc_stride;
  acc_t jacobian = 0;
  for (int64_t i = 0; i < k; ++i) {
    acc_t u = static_cast<acc_t>(value[i]);
    if (a.squash.squashed) {
      u = pre_tanh_of<scalar_t>(a.squash, u);
      jacobian += math::tanh_terms(u).log_det;
    }
    d[i] = u - static_cast<acc_t>(loc[i]);
  }
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

/// The lower triangle of sample b's covariance, factorised in `L`; false if not
/// positive-definite.
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE bool factorise(const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* L) {
  const scalar_t* sigma = a.matrix + b * a.matrix_stride;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j <= i; ++j) L[i * k + j] = static_cast<acc_t>(sigma[i * k + j]);
  }
  bool ok = true;
  math::cholesky_in_place<1>(k, L, &ok);
  return ok;
}

template <Param kParam, int kK, int kMaxK, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    log_prob_forward_kernel(const MvnOperands<scalar_t> a, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = kK > 0 ? kK : a.k;
  const bool shared_matrix = a.matrix_stride == 0;
  acc_t* staged = static_cast<acc_t*>(dynamic_shared_memory());
  __shared__ bool staged_ok;
  __shared__ acc_t staged_log_det;
  if (shared_matrix) {
    stage_shared_factor<kParam>(a.matrix, k, staged, &staged_ok, &staged_log_det);
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
      ok = factorise(a, b, k, L);
      math::whiten<1>(k, L, z, &squared_norm);
      math::sum_log_diagonal<1>(k, L, &log_det);
    }
    out[b] = ok ? static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det) - jacobian)
                : quiet_nan<scalar_t>();
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
    stage_shared_factor<kParam>(a.matrix, k, staged, &staged_ok, static_cast<acc_t*>(nullptr));
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
      // factorised here.
      acc_t factor[kCovariance ? kMaxK * kMaxK : 1];
      const scalar_t* tril = a.matrix + b * a.matrix_stride;
      bool ok = true;
      if (!shared_matrix && kCovariance) ok = factorise(a, b, k, factor);
      const auto solve = [&](auto L) {
        math::solve_lower<1>(k, L, z);
        for (int64_t i = 0; i < k; ++i) w[i] = z[i];
        math::solve_lower_transposed<1>(k, L, w);
      };
      if (shared_matrix) {
        solve(static_cast<const acc_t*>(staged));
        ok = staged_ok;
      } else if constexpr (kCovariance) {
        solve(static_cast<const acc_t*>(factor));
      } else {
        solve(tril);
      }
      if (!ok) g = quiet_nan<acc_t>();
      // d log p / d value = -w, d log p / d loc = w.
      for (int64_t i = 0; i < k; ++i) {
        if (o.value_rows != nullptr) {
          const acc_t x = static_cast<acc_t>(a.value[b * a.value_stride + i]);
          o.value_rows[b * k + i] = static_cast<scalar_t>(value_gradient<scalar_t>(a.squash, x, -g * w[i], g));
        }
        if (o.loc_rows != nullptr) o.loc_rows[b * k + i] = static_cast<scalar_t>(g * w[i]);
      }
      if (o.matrix_rows != nullptr) {
        scalar_t* out = o.matrix_rows + b * k * k;
        if constexpr (!kCovariance) {
          // d/dL = tril(w z^T) - diag(1/L_ii)
          const scalar_t* L = shared_matrix ? nullptr : tril;
          for (int64_t i = 0; i < k; ++i) {
            const acc_t L_ii = shared_matrix ? staged[i * k + i] : static_cast<acc_t>(L[i * k + i]);
            for (int64_t j = 0; j < k; ++j) {
              const acc_t gij = j < i ? g * w[i] * z[j] : j == i ? g * w[i] * z[i] - g / L_ii : acc_t(0);
              out[i * k + j] = static_cast<scalar_t>(gij);
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

/// One block: adds the blocks' partial sums in block order, then writes the reduced
/// gradients: value -sum g w (squashed: through value_gradient, with the value shared by every
/// sample), loc sum g w, and the matrix's from sum g w v^T and sum g:
///   scale_tril: tril(sum g w z^T) - (sum g) diag(1/L_ii)
///   covariance: 1/2 (sum g w w^T - (sum g) Sigma^{-1}), symmetric.
/// `scratch` holds partial_width(k) + 2 k^2 entries; a shared covariance's factor and inverse
/// are computed there by thread 0 (O(k^3) once, as the forward kernel's blocks do).
template <Param kParam, typename scalar_t>
__global__ void finish_reduction_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int64_t blocks,
                                        int64_t k, const scalar_t* __restrict__ matrix,
                                        at::opmath_type<scalar_t>* __restrict__ scratch, scalar_t* value_grad,
                                        scalar_t* loc_grad, scalar_t* matrix_grad, const scalar_t* shared_value,
                                        ValueSquash squash) {
  using acc_t = at::opmath_type<scalar_t>;
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
      const acc_t x = static_cast<acc_t>(shared_value[i]);
      value_grad[i] = static_cast<scalar_t>(value_gradient<scalar_t>(squash, x, -total[i], grad_sum));
    }
    if (loc_grad != nullptr) loc_grad[i] = static_cast<scalar_t>(total[i]);
  }
  if (matrix_grad == nullptr) return;
  const acc_t* outer = total + k;
  if constexpr (kParam == Param::kScaleTril) {
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
      const int64_t i = e / k;
      const int64_t j = e % k;
      const acc_t gij = j < i ? outer[e] : j == i ? outer[e] - grad_sum / static_cast<acc_t>(matrix[e]) : acc_t(0);
      matrix_grad[e] = static_cast<scalar_t>(gij);
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
    stage_shared_factor<Param::kScaleTril>(a.matrix, k, staged, &staged_ok, &staged_log_det);
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
    stage_shared_factor<Param::kScaleTril>(a.matrix, k, staged, &staged_ok, static_cast<acc_t*>(nullptr));
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

template <Param kParam>
void run_log_prob_forward(const MvnProblem& p, at::Tensor& out, ValueSquash squash) {
  const c10::cuda::CUDAGuard guard(out.device());
  if (p.layout.batch_numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), forward_op_name(kParam), [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_event_size<scalar_t>(forward_op_name(kParam), p.k, [&](auto K, auto kMaxK) {
      const size_t shared_bytes = p.matrix.shared() ? p.k * p.k * sizeof(acc_t) : 0;
      launch(log_prob_forward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>,
             blocks_for(p.layout.batch_numel, kThreads), kThreads, shared_bytes, MvnOperands<scalar_t>(p, squash),
             out.data_ptr<scalar_t>());
    });
  });
}

/// Runs a backward kernel of an (value-like vector, loc, matrix) problem, in the kernel's
/// order of its operands: gradients that are per sample come out as rows, those of operands
/// that reduce come from the blocks' partial sums and finish_reduction_kernel<kParam>.
/// `launch_kernel(K, kMaxK, blocks, threads, shared_bytes, outputs)` launches the kernel;
/// `grad` is the upstream gradient of a log-prob (or nullptr: the kernel reads its own).
template <Param kParam, typename LaunchKernel>
std::array<at::Tensor, 3> run_backward(const char* op, const MvnProblem& p, const at::Tensor& like, const void* grad,
                                       std::array<bool, 3> mask, ValueSquash squash,
                                       const LaunchKernel& launch_kernel) {
  const c10::cuda::CUDAGuard guard(like.device());
  const auto options = like.options();
  const int64_t n = p.layout.batch_numel;
  const int64_t k = p.k;
  const std::array<const BatchedOperand*, 3> operands{&p.value, &p.loc, &p.matrix};
  const std::array<std::vector<int64_t>, 3> events{{{k}, {k}, {k, k}}};
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
    const int threads = reduces ? reducing_threads<acc_t>(k) : kThreads;
    const int blocks = blocks_for(n, threads);
    at::Tensor partials;
    if (reduces) partials = at::empty({blocks, partial_width(k)}, acc_options);
    const BackwardOutputs<scalar_t> o{static_cast<const scalar_t*>(grad),
                                      static_cast<scalar_t*>(output(0, false)),
                                      static_cast<scalar_t*>(output(1, false)),
                                      static_cast<scalar_t*>(output(2, false)),
                                      reduces ? partials.data_ptr<acc_t>() : nullptr,
                                      mask[2] && p.matrix.reduces_gradient};
    size_t shared_elements = p.matrix.shared() ? k * k : 0;
    if (reduces) shared_elements += static_cast<size_t>(threads) * (2 * k + 1);
    if (n > 0) {
      with_event_size<scalar_t>(op, k, [&](auto K, auto kMaxK) {
        launch_kernel(K, kMaxK, blocks, threads, shared_elements * sizeof(acc_t), o);
      });
    } else if (reduces) {
      partials.zero_();
    }
    if (reduces) {
      at::Tensor scratch = at::empty({partial_width(k) + 2 * k * k}, acc_options);
      launch(finish_reduction_kernel<kParam, scalar_t>, 1, kThreads, 0, partials.const_data_ptr<acc_t>(),
             static_cast<int64_t>(partials.size(0)), k, p.matrix.data.const_data_ptr<scalar_t>(),
             scratch.data_ptr<acc_t>(), static_cast<scalar_t*>(output(0, true)),
             static_cast<scalar_t*>(output(1, true)), static_cast<scalar_t*>(output(2, true)),
             p.value.data.const_data_ptr<scalar_t>(), squash);
    }
  });
  return grads;
}

template <Param kParam>
std::array<at::Tensor, 3> run_log_prob_backward(const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask,
                                                ValueSquash squash) {
  return run_backward<kParam>(
      backward_op_name(kParam), p, grad, grad.const_data_ptr(), mask, squash,
      [&](auto K, auto kMaxK, int blocks, int threads, size_t shared_bytes, const auto& o) {
        using scalar_t = typename std::decay_t<decltype(o)>::scalar_type;
        launch(log_prob_backward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>, blocks, threads,
               shared_bytes, MvnOperands<scalar_t>(p, squash), o);
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
  const std::array<at::Tensor, 3> kernel_grads = run_backward<Param::kScaleTril>(
      op, p, loc, nullptr, {mask[2], mask[0], mask[1]}, ValueSquash{},
      [&](auto K, auto kMaxK, int blocks, int threads, size_t shared_bytes, const auto& o) {
        using scalar_t = typename std::decay_t<decltype(o)>::scalar_type;
        launch(rsample_backward_kernel<decltype(K)::value, decltype(kMaxK)::value, scalar_t>, blocks, threads,
               shared_bytes, MvnOperands<scalar_t>(p), RsampleUpstream<scalar_t>(upstream), o);
      });
  const std::array<at::Tensor, 3> grads{kernel_grads[1], kernel_grads[2], kernel_grads[0]};
  return gradients_for_inputs(grads, {&loc, &scale_tril, &eps}, {&p.loc, &p.matrix, &p.value}, p.layout, mask);
}

template <Param kParam>
at::Tensor log_prob_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& matrix) {
  return log_prob_forward_op<kParam>(value, loc, matrix, [](const MvnProblem& p, at::Tensor& out) {
    run_log_prob_forward<kParam>(p, out, ValueSquash{});
  });
}

template <Param kParam>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_backward(const at::Tensor& grad,
                                                                 const at::Tensor& value,
                                                                 const at::Tensor& loc,
                                                                 const at::Tensor& matrix,
                                                                 std::array<bool, 3> mask) {
  return log_prob_backward_op<kParam>(grad, value, loc, matrix, mask,
                                      [](const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
                                        return run_log_prob_backward<kParam>(p, grad, mask, ValueSquash{});
                                      });
}

at::Tensor squashed_tril_log_prob(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
                                  bool value_is_pre_tanh) {
  return squashed_tril_log_prob_op(value, loc, scale_tril, value_is_pre_tanh, run_log_prob_forward<Param::kScaleTril>);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_tril_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
    bool value_is_pre_tanh, std::array<bool, 3> mask) {
  return squashed_tril_log_prob_backward_op(grad, value, loc, scale_tril, value_is_pre_tanh, mask,
                                            run_log_prob_backward<Param::kScaleTril>);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("mvn_tril_log_prob", &log_prob_forward<Param::kScaleTril>);
  m.impl("mvn_tril_log_prob_backward", &log_prob_backward<Param::kScaleTril>);
  m.impl("mvn_cov_log_prob", &log_prob_forward<Param::kCovariance>);
  m.impl("mvn_cov_log_prob_backward", &log_prob_backward<Param::kCovariance>);
  m.impl("squashed_tril_log_prob", &squashed_tril_log_prob);
  m.impl("squashed_tril_log_prob_backward", &squashed_tril_log_prob_backward);
  m.impl("squashed_tril_rsample_log_prob", &squashed_tril_rsample_log_prob);
  m.impl("squashed_tril_rsample_log_prob_backward", &squashed_tril_rsample_log_prob_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
