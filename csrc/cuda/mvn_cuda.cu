// CUDA kernels of the full-covariance Gaussian log-prob ops:
//   mvn_tril_log_prob(value, loc, scale_tril)   and its backward
//   mvn_cov_log_prob(value, loc, covariance)    and its backward
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
#include "launch.cuh"

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

  explicit MvnOperands(const MvnProblem& p)
      : value(p.value.data.const_data_ptr<scalar_t>()),
        value_stride(p.value.batch_stride),
        loc(p.loc.data.const_data_ptr<scalar_t>()),
        loc_stride(p.loc.batch_stride),
        matrix(p.matrix.data.const_data_ptr<scalar_t>()),
        matrix_stride(p.matrix.batch_stride),
        n(p.layout.batch_numel),
        k(p.k) {}
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

/// d = value - loc for sample b.
template <typename scalar_t, typename acc_t>
__device__ C10_ALWAYS_INLINE void load_difference(const MvnOperands<scalar_t>& a, int64_t b, int64_t k, acc_t* d) {
  const scalar_t* value = a.value + b * a.value_stride;
  const scalar_t* loc = a.loc + b * a.loc_stride;
  for (int64_t i = 0; i < k; ++i) d[i] = static_cast<acc_t>(value[i]) - static_cast<acc_t>(loc[i]);
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
    load_difference(a, b, k, z);
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
    out[b] = ok ? static_cast<scalar_t>(math::gaussian_log_prob(k, squared_norm, log_det)) : quiet_nan<scalar_t>();
  }
}

/// Where the backward kernel writes: per-sample rows (nullptr when that gradient is not
/// asked for or is reduced), and the per-block partial sums of the reduced gradients.
template <typename scalar_t>
struct BackwardOutputs {
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
        if (o.value_rows != nullptr) o.value_rows[b * k + i] = static_cast<scalar_t>(-g * w[i]);
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
      // This thread's terms (zero past the batch): g w, v (z for scale_tril, w for covariance), g.
      for (int64_t i = 0; i < k; ++i) {
        gw_rows[t * k + i] = active ? g * w[i] : acc_t(0);
        v_rows[t * k + i] = active ? (kCovariance ? w[i] : z[i]) : acc_t(0);
      }
      g_row[t] = g;
      __syncthreads();
      // Entry e of the block's partial sums belongs to thread e % threads; samples are added
      // in thread order.
      for (int64_t e = t; e < width; e += threads) {
        acc_t s = 0;
        if (e < k) {
          for (int r = 0; r < threads; ++r) s += gw_rows[r * k + e];
        } else if (e < k + k * k) {
          const int64_t i = (e - k) / k;
          const int64_t j = (e - k) % k;
          if (o.reduce_matrix && j <= i) {
            for (int r = 0; r < threads; ++r) s += gw_rows[r * k + i] * v_rows[r * k + j];
          }
        } else {
          for (int r = 0; r < threads; ++r) s += g_row[r];
        }
        block_partials[e] += s;
      }
      __syncthreads();
    }
  }
}

/// One block: adds the blocks' partial sums in block order, then writes the reduced
/// gradients: value -sum g w, loc sum g w, and the matrix's from sum g w v^T and sum g:
///   scale_tril: tril(sum g w z^T) - (sum g) diag(1/L_ii)
///   covariance: 1/2 (sum g w w^T - (sum g) Sigma^{-1}), symmetric.
/// `scratch` holds partial_width(k) + 2 k^2 entries; a shared covariance's factor and inverse
/// are computed there by thread 0 (O(k^3) once, as the forward kernel's blocks do).
template <Param kParam, typename scalar_t>
__global__ void finish_reduction_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int64_t blocks,
                                        int64_t k, const scalar_t* __restrict__ matrix,
                                        at::opmath_type<scalar_t>* __restrict__ scratch, scalar_t* value_grad,
                                        scalar_t* loc_grad, scalar_t* matrix_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = partial_width(k);
  acc_t* total = scratch;
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    acc_t s = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) s += partials[blk * width + e];
    total[e] = s;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    if (value_grad != nullptr) value_grad[i] = static_cast<scalar_t>(-total[i]);
    if (loc_grad != nullptr) loc_grad[i] = static_cast<scalar_t>(total[i]);
  }
  if (matrix_grad == nullptr) return;
  const acc_t* outer = total + k;
  const acc_t grad_sum = total[k + k * k];
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

template <Param kParam>
at::Tensor log_prob_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& matrix) {
  return log_prob_forward_op<kParam>(value, loc, matrix, [](const MvnProblem& p, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(out.device());
    if (p.layout.batch_numel == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), forward_op_name(kParam), [&] {
      using acc_t = at::opmath_type<scalar_t>;
      with_event_size<scalar_t>(forward_op_name(kParam), p.k, [&](auto K, auto kMaxK) {
        const size_t shared_bytes = p.matrix.shared() ? p.k * p.k * sizeof(acc_t) : 0;
        launch(log_prob_forward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>,
               blocks_for(p.layout.batch_numel, kThreads), kThreads, shared_bytes, MvnOperands<scalar_t>(p),
               out.data_ptr<scalar_t>());
      });
    });
  });
}

template <Param kParam>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_backward(const at::Tensor& grad,
                                                                 const at::Tensor& value,
                                                                 const at::Tensor& loc,
                                                                 const at::Tensor& matrix,
                                                                 std::array<bool, 3> mask) {
  const auto run = [](const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
    const c10::cuda::CUDAGuard guard(grad.device());
    const auto options = grad.options();
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
    const auto rows = [&](size_t i) -> void* {
      return mask[i] && !operands[i]->reduces_gradient ? grads[i].data_ptr() : nullptr;
    };
    const auto reduced_output = [&](size_t i) -> void* {
      return mask[i] && operands[i]->reduces_gradient ? grads[i].data_ptr() : nullptr;
    };
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), backward_op_name(kParam), [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
      const int threads = reduces ? reducing_threads<acc_t>(k) : kThreads;
      const int blocks = blocks_for(n, threads);
      at::Tensor partials;
      if (reduces) partials = at::empty({blocks, partial_width(k)}, acc_options);
      BackwardOutputs<scalar_t> o{grad.const_data_ptr<scalar_t>(),
                                  static_cast<scalar_t*>(rows(0)),
                                  static_cast<scalar_t*>(rows(1)),
                                  static_cast<scalar_t*>(rows(2)),
                                  reduces ? partials.data_ptr<acc_t>() : nullptr,
                                  mask[2] && p.matrix.reduces_gradient};
      size_t shared_elements = p.matrix.shared() ? k * k : 0;
      if (reduces) shared_elements += static_cast<size_t>(threads) * (2 * k + 1);
      if (n > 0) {
        with_event_size<scalar_t>(backward_op_name(kParam), k, [&](auto K, auto kMaxK) {
          launch(log_prob_backward_kernel<kParam, decltype(K)::value, decltype(kMaxK)::value, scalar_t>, blocks,
                 threads, shared_elements * sizeof(acc_t), MvnOperands<scalar_t>(p), o);
        });
      } else if (reduces) {
        partials.zero_();
      }
      if (reduces) {
        at::Tensor scratch = at::empty({partial_width(k) + 2 * k * k}, acc_options);
        launch(finish_reduction_kernel<kParam, scalar_t>, 1, kThreads, 0, partials.const_data_ptr<acc_t>(),
               static_cast<int64_t>(partials.size(0)), k, p.matrix.data.const_data_ptr<scalar_t>(),
               scratch.data_ptr<acc_t>(), static_cast<scalar_t*>(reduced_output(0)),
               static_cast<scalar_t*>(reduced_output(1)), static_cast<scalar_t*>(reduced_output(2)));
      }
    });
    return grads;
  };
  return log_prob_backward_op<kParam>(grad, value, loc, matrix, mask, run);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("mvn_tril_log_prob", &log_prob_forward<Param::kScaleTril>);
  m.impl("mvn_tril_log_prob_backward", &log_prob_backward<Param::kScaleTril>);
  m.impl("mvn_cov_log_prob", &log_prob_forward<Param::kCovariance>);
  m.impl("mvn_cov_log_prob_backward", &log_prob_backward<Param::kCovariance>);
}

}  // namespace cuda
}  // namespace fusedgauss
