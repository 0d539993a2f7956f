// CUDA kernels of the ops whose event entries are independent (a diagonal base):
//   diag_normal_log_prob, squashed_diag_log_prob, squashed_diag_rsample_log_prob (and their
//   backward ops), tanh_log_abs_det_jacobian and its backward.
// One thread per sample walks its k entries through the entry math of csrc/math (the same
// functions as the CPU kernels). Backward kernels write per-sample gradient rows; an operand
// shared by the batch gets the sum of its rows (at::sum, deterministic), which for a (B, k)
// gradient costs no more than the gradient of loc.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "../common/op_wrappers.h"
#include "../math/squash_math.h"
#include "launch.cuh"
#include "rsample_upstream.cuh"

namespace fusedgauss {
namespace cuda {
namespace {

using math::Squash;

/// Three (*, k) operands: per-sample rows k apart, or shared (stride 0).
template <typename scalar_t>
struct RowsOperands {
  const scalar_t* data[3];
  int64_t stride[3];
  int64_t n;
  int64_t k;

  explicit RowsOperands(const RowsProblem& p) : n(p.layout.batch_numel), k(p.k) {
    for (int i = 0; i < 3; ++i) {
      data[i] = p.operands[i].data.const_data_ptr<scalar_t>();
      stride[i] = p.operands[i].batch_stride;
    }
  }

  __device__ C10_ALWAYS_INLINE at::opmath_type<scalar_t> at(int operand, int64_t b, int64_t i) const {
    return static_cast<at::opmath_type<scalar_t>>(data[operand][b * stride[operand] + i]);
  }
};

template <Squash kSquash, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    diag_log_prob_kernel(const RowsOperands<scalar_t> a, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
  FUSEDGAUSS_GRID_STRIDE_LOOP(b, a.n) {
    acc_t sum = acc_t(-0.5) * static_cast<acc_t>(a.k) * static_cast<acc_t>(math::kLog2Pi);
    for (int64_t i = 0; i < a.k; ++i) {
      const acc_t s = a.at(2, b, i);
      sum += math::diag_log_prob_entry<kSquash>(a.at(0, b, i), a.at(1, b, i), s, eps) - math::log_(s);
    }
    out[b] = static_cast<scalar_t>(sum);
  }
}

/// Per-sample gradient rows (nullptr: not asked for).
template <typename scalar_t>
struct GradientRows {
  scalar_t* rows[3];
};

template <Squash kSquash, typename scalar_t>
__global__ void __launch_bounds__(kThreads) diag_log_prob_backward_kernel(const RowsOperands<scalar_t> a,
                                                                          const scalar_t* __restrict__ grad,
                                                                          const GradientRows<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = math::action_epsilon<scalar_t, acc_t>();
  FUSEDGAUSS_GRID_STRIDE_LOOP(b, a.n) {
    const acc_t g = static_cast<acc_t>(grad[b]);
    for (int64_t i = 0; i < a.k; ++i) {
      const auto d = math::diag_log_prob_entry_gradients<kSquash>(a.at(0, b, i), a.at(1, b, i), a.at(2, b, i), eps);
      if (o.rows[0] != nullptr) o.rows[0][b * a.k + i] = static_cast<scalar_t>(g * d.value);
      if (o.rows[1] != nullptr) o.rows[1][b * a.k + i] = static_cast<scalar_t>(g * d.loc);
      if (o.rows[2] != nullptr) o.rows[2][b * a.k + i] = static_cast<scalar_t>(g * d.scale);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    diag_rsample_kernel(const RowsOperands<scalar_t> a, scalar_t* __restrict__ action, scalar_t* __restrict__ pre_tanh,
                        scalar_t* __restrict__ log_prob) {
  using acc_t = at::opmath_type<scalar_t>;
  FUSEDGAUSS_GRID_STRIDE_LOOP(b, a.n) {
    acc_t sum = acc_t(-0.5) * static_cast<acc_t>(a.k) * static_cast<acc_t>(math::kLog2Pi);
    for (int64_t i = 0; i < a.k; ++i) {
      const acc_t s = a.at(1, b, i);
      const auto sample = math::diag_rsample_entry(a.at(0, b, i), s, a.at(2, b, i));
      action[b * a.k + i] = static_cast<scalar_t>(sample.action);
      pre_tanh[b * a.k + i] = static_cast<scalar_t>(sample.pre_tanh);
      sum += sample.log_prob - math::log_(s);
    }
    log_prob[b] = static_cast<scalar_t>(sum);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) diag_rsample_backward_kernel(const RowsOperands<scalar_t> a,
                                                                         const RsampleUpstream<scalar_t> up,
                                                                         const GradientRows<scalar_t> o) {
  using acc_t = at::opmath_type<scalar_t>;
  FUSEDGAUSS_GRID_STRIDE_LOOP(b, a.n) {
    const acc_t g_log_prob = up.at(up.log_prob, b);
    for (int64_t i = 0; i < a.k; ++i) {
      const int64_t e = b * a.k + i;
      const auto d = math::diag_rsample_entry_gradients(up.at(up.action, e), up.at(up.pre_tanh, e), g_log_prob,
                                                        a.at(0, b, i), a.at(1, b, i), a.at(2, b, i));
      if (o.rows[0] != nullptr) o.rows[0][e] = static_cast<scalar_t>(d.loc);
      if (o.rows[1] != nullptr) o.rows[1][e] = static_cast<scalar_t>(d.scale);
      if (o.rows[2] != nullptr) o.rows[2][e] = static_cast<scalar_t>(d.eps);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tanh_log_abs_det_jacobian_kernel(int64_t n, const scalar_t* __restrict__ u, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FUSEDGAUSS_GRID_STRIDE_LOOP(i, n) { out[i] = static_cast<scalar_t>(math::tanh_terms(static_cast<acc_t>(u[i])).log_det); }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) tanh_log_abs_det_jacobian_backward_kernel(
    int64_t n, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ u, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  FUSEDGAUSS_GRID_STRIDE_LOOP(i, n) {
    out[i] = static_cast<scalar_t>(acc_t(-2) * static_cast<acc_t>(grad[i]) *
                                   math::tanh_terms(static_cast<acc_t>(u[i])).tanh);
  }
}

/// Per-sample gradient rows for the requested operands, and after `run_kernel(rows)` the
/// gradients as the op wrappers take them: an operand that reduces gets the sum of its rows.
template <typename scalar_t, typename RunKernel>
std::array<at::Tensor, 3> gradients_from_rows(const RowsProblem& p, std::array<bool, 3> mask,
                                              const at::TensorOptions& options, const RunKernel& run_kernel) {
  std::array<at::Tensor, 3> rows;
  GradientRows<scalar_t> o{};
  for (size_t i = 0; i < 3; ++i) {
    if (!mask[i]) continue;
    rows[i] = at::empty({p.layout.batch_numel, p.k}, options);
    o.rows[i] = rows[i].data_ptr<scalar_t>();
  }
  if (p.layout.batch_numel > 0) run_kernel(o);
  for (size_t i = 0; i < 3; ++i) {
    if (mask[i] && p.operands[i].reduces_gradient) rows[i] = rows[i].sum(0);
  }
  return rows;
}

template <Squash kSquash>
at::Tensor diag_log_prob(const char* op, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale) {
  return rows_log_prob_forward_op(op, value, loc, scale, [&](const RowsProblem& p, at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(out.device());
    if (p.layout.batch_numel == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "diag_log_prob", [&] {
      launch(diag_log_prob_kernel<kSquash, scalar_t>, blocks_for(p.layout.batch_numel, kThreads), kThreads, 0,
             RowsOperands<scalar_t>(p), out.data_ptr<scalar_t>());
    });
  });
}

template <Squash kSquash>
std::tuple<at::Tensor, at::Tensor, at::Tensor> diag_log_prob_backward(const char* op, const at::Tensor& grad,
                                                                      const at::Tensor& value, const at::Tensor& loc,
                                                                      const at::Tensor& scale,
                                                                      std::array<bool, 3> mask) {
  const auto run = [&](const RowsProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
    const c10::cuda::CUDAGuard guard(grad.device());
    std::array<at::Tensor, 3> grads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "diag_log_prob_backward", [&] {
      grads = gradients_from_rows<scalar_t>(p, mask, grad.options(), [&](GradientRows<scalar_t> o) {
        launch(diag_log_prob_backward_kernel<kSquash, scalar_t>, blocks_for(p.layout.batch_numel, kThreads), kThreads,
               0, RowsOperands<scalar_t>(p), grad.const_data_ptr<scalar_t>(), o);
      });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> squashed_diag_rsample_log_prob(const at::Tensor& loc,
                                                                              const at::Tensor& scale,
                                                                              const at::Tensor& eps) {
  const RowsProblem p = prepare_rows_problem("squashed_diag_rsample_log_prob", {"loc", "scale", "eps"},
                                             {&loc, &scale, &eps});
  RsampleOutputs out = empty_rsample_outputs(p.layout, p.k, loc.options());
  const c10::cuda::CUDAGuard guard(loc.device());
  if (p.layout.batch_numel > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), "squashed_diag_rsample_log_prob", [&] {
      launch(diag_rsample_kernel<scalar_t>, blocks_for(p.layout.batch_numel, kThreads), kThreads, 0,
             RowsOperands<scalar_t>(p), out.action.data_ptr<scalar_t>(), out.pre_tanh.data_ptr<scalar_t>(),
             out.log_prob.data_ptr<scalar_t>());
    });
  }
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
  const c10::cuda::CUDAGuard guard(loc.device());
  std::array<at::Tensor, 3> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loc.scalar_type(), op, [&] {
    grads = gradients_from_rows<scalar_t>(p, mask, loc.options(), [&](GradientRows<scalar_t> o) {
      launch(diag_rsample_backward_kernel<scalar_t>, blocks_for(p.layout.batch_numel, kThreads), kThreads, 0,
             RowsOperands<scalar_t>(p), RsampleUpstream<scalar_t>(upstream), o);
    });
  });
  return gradients_for_inputs(grads, {&loc, &scale, &eps}, {&p.operands[0], &p.operands[1], &p.operands[2]},
                              p.layout, mask);
}

at::Tensor tanh_log_abs_det_jacobian(const at::Tensor& u) {
  check_floating("tanh_log_abs_det_jacobian", "u", u);
  const at::Tensor input = u.contiguous();
  at::Tensor out = at::empty_like(input);
  const c10::cuda::CUDAGuard guard(u.device());
  if (input.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "tanh_log_abs_det_jacobian", [&] {
    launch(tanh_log_abs_det_jacobian_kernel<scalar_t>, blocks_for(input.numel(), kThreads), kThreads, 0,
           input.numel(), input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor tanh_log_abs_det_jacobian_backward(const at::Tensor& grad, const at::Tensor& u) {
  constexpr const char* op = "tanh_log_abs_det_jacobian_backward";
  check_floating(op, "u", u);
  check_same_dtype_and_device(op, "grad", grad, u);
  TORCH_CHECK(grad.sizes() == u.sizes(), op, ": grad has shape ", grad.sizes(), " but u has shape ", u.sizes());
  const at::Tensor input = u.contiguous();
  const at::Tensor upstream = grad.contiguous();
  at::Tensor out = at::empty_like(input);
  const c10::cuda::CUDAGuard guard(u.device());
  if (input.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), op, [&] {
    launch(tanh_log_abs_det_jacobian_backward_kernel<scalar_t>, blocks_for(input.numel(), kThreads), kThreads, 0,
           input.numel(), upstream.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
           out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, CUDA, m) {
  m.impl("diag_normal_log_prob", &diag_normal_log_prob);
  m.impl("diag_normal_log_prob_backward", &diag_normal_log_prob_backward);
  m.impl("squashed_diag_log_prob", &squashed_diag_log_prob);
  m.impl("squashed_diag_log_prob_backward", &squashed_diag_log_prob_backward);
  m.impl("squashed_diag_rsample_log_prob", &squashed_diag_rsample_log_prob);
  m.impl("squashed_diag_rsample_log_prob_backward", &squashed_diag_rsample_log_prob_backward);
  m.impl("tanh_log_abs_det_jacobian", &tanh_log_abs_det_jacobian);
  m.impl("tanh_log_abs_det_jacobian_backward", &tanh_log_abs_det_jacobian_backward);
}

}  // namespace cuda
}  // namespace fusedgauss
