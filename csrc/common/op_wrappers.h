#pragma once
// The device-independent half of every op: argument checks, output shapes, and the mapping
// of a kernel's gradients back to the inputs' shapes. The CPU and CUDA implementations
// differ only in the kernels they run inside these wrappers.

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "checks.h"

namespace fusedgauss {

/// Which matrix parameterises the Gaussian: the Cholesky factor itself, or the covariance
/// (factorised inside the kernel, never written out).
enum class Param { kScaleTril, kCovariance };

constexpr const char* matrix_name(Param param) {
  return param == Param::kScaleTril ? "scale_tril" : "covariance";
}

constexpr const char* forward_op_name(Param param) {
  return param == Param::kScaleTril ? "mvn_tril_log_prob" : "mvn_cov_log_prob";
}

constexpr const char* backward_op_name(Param param) {
  return param == Param::kScaleTril ? "mvn_tril_log_prob_backward" : "mvn_cov_log_prob_backward";
}

/// The forward op: `run(problem, out)` fills the log-probs `out` (batch shape, the inputs'
/// dtype).
template <Param kParam, typename Run>
at::Tensor log_prob_forward_op(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& matrix,
                               const Run& run) {
  const MvnProblem p = prepare_mvn_problem(forward_op_name(kParam), matrix_name(kParam), value, loc, matrix);
  at::Tensor out = at::empty(p.layout.batch_shape, value.options());
  run(p, out);
  return out;
}

/// The backward op: `run(problem, contiguous grad, mask)` returns the gradients of value, loc
/// and the matrix as the kernel lays them out (the event alone for an operand that reduces
/// its gradient, (B, *event) otherwise; undefined where the mask is false). Gradients that
/// were not asked for are empty tensors: the schema has no optional outputs.
template <Param kParam, typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_backward_op(const at::Tensor& grad,
                                                                    const at::Tensor& value,
                                                                    const at::Tensor& loc,
                                                                    const at::Tensor& matrix,
                                                                    std::array<bool, 3> mask,
                                                                    const Run& run) {
  constexpr const char* op = backward_op_name(kParam);
  const MvnProblem p = prepare_mvn_problem(op, matrix_name(kParam), value, loc, matrix);
  check_same_dtype_and_device(op, "grad", grad, value);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(p.layout.batch_shape), op, ": grad has shape ",
              grad.sizes(), " but the log-prob has shape ", c10::IntArrayRef(p.layout.batch_shape));
  const std::array<at::Tensor, 3> grads = run(p, grad.contiguous(), mask);
  const std::array<const at::Tensor*, 3> inputs{&value, &loc, &matrix};
  const std::array<const BatchedOperand*, 3> operands{&p.value, &p.loc, &p.matrix};
  std::array<at::Tensor, 3> out;
  for (size_t i = 0; i < 3; ++i) {
    out[i] = mask[i] ? gradient_for(grads[i], *inputs[i], *operands[i], p.layout)
                     : at::empty({0}, value.options());
  }
  return {out[0], out[1], out[2]};
}

/// Checks of the cholesky ops, shared by every device.
inline void check_cholesky_input(const at::Tensor& A) {
  check_floating("cholesky", "A", A);
  check_square("cholesky", "A", A);
}

inline void check_cholesky_backward_inputs(const at::Tensor& grad, const at::Tensor& L) {
  check_floating("cholesky_backward", "L", L);
  check_square("cholesky_backward", "L", L);
  check_same_dtype_and_device("cholesky_backward", "grad", grad, L);
  TORCH_CHECK(grad.sizes() == L.sizes(), "cholesky_backward: grad has shape ", grad.sizes(),
              " but L has shape ", L.sizes());
}

/// Matrices in a (*, k, k) tensor.
inline int64_t matrix_count(const at::Tensor& t) {
  const int64_t k = t.size(-1);
  return k == 0 ? 0 : t.numel() / (k * k);
}

}  // namespace fusedgauss
