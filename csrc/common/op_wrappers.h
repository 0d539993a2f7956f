#pragma once
// The device-independent half of every op: argument checks, output shapes, and the mapping
// of a kernel's gradients back to the inputs' shapes. The CPU and CUDA implementations
// differ only in the kernels they run inside these wrappers.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "outputs.h"

namespace fusedgauss {

/// Which matrix parameterises the Gaussian: the Cholesky factor itself, the covariance
/// (factorised inside the kernel, never written out), or the Cholesky factor packed as a
/// policy head outputs it (unpacked inside the kernel, its diagonal through a transform).
enum class Param { kScaleTril, kCovariance, kPacked };

constexpr const char* matrix_name(Param param) {
  return param == Param::kScaleTril ? "scale_tril" : param == Param::kCovariance ? "covariance" : "packed";
}

constexpr const char* forward_op_name(Param param) {
  return param == Param::kScaleTril ? "mvn_tril_log_prob"
         : param == Param::kCovariance ? "mvn_cov_log_prob"
                                       : "mvn_packed_log_prob";
}

constexpr const char* backward_op_name(Param param) {
  return param == Param::kScaleTril ? "mvn_tril_log_prob_backward"
         : param == Param::kCovariance ? "mvn_cov_log_prob_backward"
                                       : "mvn_packed_log_prob_backward";
}

/// A log-prob kernel's value operand: the values themselves (value - loc), or, squashed, the
/// pre-tanh values of the Gaussian (u - loc, and the Jacobian term), given directly or as
/// actions (u = atanh of the clamped action).
struct ValueSquash {
  bool squashed = false;
  bool from_action = false;
};

/// The gradients of three inputs, from what a kernel wrote for their operands (see
/// gradient_for). Gradients that were not asked for are empty tensors: the schemas have no
/// optional outputs.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gradients_for_inputs(
    const std::array<at::Tensor, 3>& grads, std::array<const at::Tensor*, 3> inputs,
    std::array<const BatchedOperand*, 3> operands, const BatchLayout& layout, std::array<bool, 3> mask) {
  std::array<at::Tensor, 3> out;
  for (size_t i = 0; i < 3; ++i) {
    out[i] = mask[i] ? gradient_for(grads[i], *inputs[i], *operands[i], layout) : at::empty({0}, inputs[0]->options());
  }
  return {out[0], out[1], out[2]};
}

/// A forward op over value (*, k), loc (*, k) and a matrix (*, k, k): `run(problem, out)` fills
/// `out` (batch shape, the inputs' dtype).
template <typename Run>
at::Tensor mvn_forward_op(const char* op, const char* matrix_name, const at::Tensor& value, const at::Tensor& loc,
                          const at::Tensor& matrix, const Run& run) {
  const MvnProblem p = prepare_mvn_problem(op, matrix_name, value, loc, matrix);
  at::Tensor out = empty_output(p.layout.batch_shape, value.options());
  run(p, out);
  return out;
}

/// Checks the upstream gradient of a batch-shaped output and makes it contiguous.
inline at::Tensor batch_gradient(const char* op, const at::Tensor& grad, const at::Tensor& like,
                                 const BatchLayout& layout, const char* name = "grad",
                                 const char* output = "the log-prob") {
  check_same_dtype_and_device(op, name, grad, like);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(layout.batch_shape), op, ": ", name, " has shape ", grad.sizes(),
              " but ", output, " has shape ", c10::IntArrayRef(layout.batch_shape));
  return grad.contiguous();
}

/// The backward op of an mvn_forward_op: `run(problem, contiguous grad, mask)` returns the
/// gradients of value, loc and the matrix as the kernel lays them out (the event alone for an
/// operand that reduces its gradient, (B, *event) otherwise; undefined where the mask is
/// false).
template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mvn_backward_op(const char* op, const char* matrix_name,
                                                               const at::Tensor& grad, const at::Tensor& value,
                                                               const at::Tensor& loc, const at::Tensor& matrix,
                                                               std::array<bool, 3> mask, const Run& run) {
  const MvnProblem p = prepare_mvn_problem(op, matrix_name, value, loc, matrix);
  const std::array<at::Tensor, 3> grads = run(p, batch_gradient(op, grad, value, p.layout), mask);
  return gradients_for_inputs(grads, {&value, &loc, &matrix}, {&p.value, &p.loc, &p.matrix}, p.layout, mask);
}

/// The log-prob ops of one device around its kernels: mvn_tril_log_prob, mvn_cov_log_prob,
/// squashed_tril_log_prob, mvn_packed_log_prob, squashed_packed_log_prob, packed_head_log_prob
/// and their backward ops. `Kernels` runs a checked problem:
///   template <Param kParam> static void forward(const MvnProblem&, at::Tensor& out, ValueSquash,
///       const at::Tensor& log_det);
///   template <Param kParam> static std::array<at::Tensor, 3> backward(
///       const MvnProblem&, const at::Tensor& contiguous_grad, std::array<bool, 3> mask, ValueSquash,
///       const at::Tensor& contiguous_grad_log_det, const at::Tensor& head_rows = {});
/// backward returns the gradients of value, loc and the matrix operand as the kernel lays
/// them out (see mvn_backward_op), or, given head_rows (a packed factor; B x (k + k(k+1)/2)),
/// writes the per-sample gradients of loc and packed side by side into those rows. A squashed
/// op maps the value to its pre-tanh value first (ValueSquash); a packed one reads the factor
/// as a policy head's packed output. The ops whose factor is given (scale_tril, packed) also
/// return each sample's sum_i log L_ii (log_det, batch-shaped; undefined for the covariance
/// op), whose upstream gradient their backward takes (grad_log_det; undefined: none).
template <class Kernels>
struct LogProbOps {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  using Grads2 = std::tuple<at::Tensor, at::Tensor>;
  using LogProbAndLogDet = std::tuple<at::Tensor, at::Tensor>;

  static at::Tensor mvn_cov(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& covariance) {
    constexpr Param kParam = Param::kCovariance;
    return mvn_forward_op(forward_op_name(kParam), matrix_name(kParam), value, loc, covariance,
                          [](const MvnProblem& p, at::Tensor& out) {
                            Kernels::template forward<kParam>(p, out, {}, {});
                          });
  }

  static Grads mvn_cov_backward(const at::Tensor& grad, const at::Tensor& value, const at::Tensor& loc,
                                const at::Tensor& covariance, std::array<bool, 3> mask) {
    constexpr Param kParam = Param::kCovariance;
    return mvn_backward_op(backward_op_name(kParam), matrix_name(kParam), grad, value, loc, covariance, mask,
                           [](const MvnProblem& p, const at::Tensor& grad, std::array<bool, 3> mask) {
                             return Kernels::template backward<kParam>(p, grad, mask, {}, {});
                           });
  }

  static LogProbAndLogDet mvn_tril(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril) {
    return tril_forward("mvn_tril_log_prob", value, loc, scale_tril, {});
  }

  static Grads mvn_tril_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                                 const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
                                 std::array<bool, 3> mask) {
    return tril_backward("mvn_tril_log_prob_backward", grad, grad_log_det, value, loc, scale_tril, {}, mask);
  }

  static LogProbAndLogDet squashed_tril(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
                                        bool value_is_pre_tanh) {
    return tril_forward("squashed_tril_log_prob", value, loc, scale_tril, {true, !value_is_pre_tanh});
  }

  static Grads squashed_tril_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                                      const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
                                      bool value_is_pre_tanh, std::array<bool, 3> mask) {
    return tril_backward("squashed_tril_log_prob_backward", grad, grad_log_det, value, loc, scale_tril,
                         {true, !value_is_pre_tanh}, mask);
  }

  static LogProbAndLogDet mvn_packed(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& packed,
                                     c10::string_view diag_transform, double min_diag) {
    return packed_forward("mvn_packed_log_prob", value, loc, packed, diag_transform, min_diag, {});
  }

  static Grads mvn_packed_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                                   const at::Tensor& value, const at::Tensor& loc, const at::Tensor& packed,
                                   c10::string_view diag_transform, double min_diag, std::array<bool, 3> mask) {
    return packed_backward("mvn_packed_log_prob_backward", grad, grad_log_det, value, loc, packed, diag_transform,
                           min_diag, {}, mask);
  }

  static LogProbAndLogDet squashed_packed(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& packed,
                                          c10::string_view diag_transform, double min_diag,
                                          bool value_is_pre_tanh) {
    return packed_forward("squashed_packed_log_prob", value, loc, packed, diag_transform, min_diag,
                          {true, !value_is_pre_tanh});
  }

  static Grads squashed_packed_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                                        const at::Tensor& value, const at::Tensor& loc, const at::Tensor& packed,
                                        c10::string_view diag_transform, double min_diag, bool value_is_pre_tanh,
                                        std::array<bool, 3> mask) {
    return packed_backward("squashed_packed_log_prob_backward", grad, grad_log_det, value, loc, packed,
                           diag_transform, min_diag, {true, !value_is_pre_tanh}, mask);
  }

  /// packed_head_log_prob: mvn_packed_log_prob (squashed: squashed_packed_log_prob) of a
  /// policy head's whole output, head (*, k + k(k+1)/2) = [loc | packed] in each row.
  static LogProbAndLogDet packed_head(const at::Tensor& value, const at::Tensor& head, c10::string_view diag_transform,
                                      double min_diag, bool squashed, bool value_is_pre_tanh) {
    const HeadProblem h = head_problem("packed_head_log_prob", value, head, diag_transform, min_diag);
    return forward_with_log_det<Param::kPacked>(h.p, value, {squashed, squashed && !value_is_pre_tanh});
  }

  /// The gradients of value and of the whole head: loc's and packed's side by side in one
  /// tensor, which the head's layer takes as it is (a split's backward would copy the two
  /// gradients into one).
  static Grads2 packed_head_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                                     const at::Tensor& value, const at::Tensor& head, c10::string_view diag_transform,
                                     double min_diag, bool squashed, bool value_is_pre_tanh,
                                     std::array<bool, 2> mask) {
    constexpr const char* op = "packed_head_log_prob_backward";
    const HeadProblem h = head_problem(op, value, head, diag_transform, min_diag);
    const ValueSquash squash{squashed, squashed && !value_is_pre_tanh};
    const std::array<bool, 3> kernel_mask{mask[0], mask[1], mask[1]};
    std::vector<int64_t> shape(h.p.layout.batch_shape);
    shape.push_back(h.width);
    at::Tensor head_grad = mask[1] ? empty_output(shape, value.options()) : at::empty({0}, value.options());
    if (!mask[1] || h.p.loc.reduces_gradient || h.p.matrix.reduces_gradient) {
      // Nothing to write in rows, or a batch of one sample, whose operands are read as shared,
      // their gradients reduced (over that sample): the packed op's backward, copied in.
      const auto [value_grad, loc_grad, packed_grad] = packed_backward(
          op, grad, grad_log_det, value, h.loc, h.packed, diag_transform, min_diag, squash, kernel_mask);
      if (mask[1]) {
        head_grad.narrow(-1, 0, h.p.k).copy_(loc_grad);
        head_grad.narrow(-1, h.p.k, h.width - h.p.k).copy_(packed_grad);
      }
      return {value_grad, head_grad};
    }
    at::Tensor upstream_log_det;
    if (grad_log_det.has_value() && grad_log_det->defined()) {
      upstream_log_det = batch_gradient(op, *grad_log_det, value, h.p.layout, "grad_log_det", "log_det");
    }
    const std::array<at::Tensor, 3> grads = Kernels::template backward<Param::kPacked>(
        h.p, batch_gradient(op, grad, value, h.p.layout), kernel_mask, squash, upstream_log_det,
        head_grad.view({h.p.layout.batch_numel, h.width}));
    return {mask[0] ? gradient_for(grads[0], value, h.p.value, h.p.layout) : at::empty({0}, value.options()),
            head_grad};
  }

  static void register_kernels(torch::Library& m) {
    m.impl("mvn_tril_log_prob", &mvn_tril);
    m.impl("mvn_tril_log_prob_backward", &mvn_tril_backward);
    m.impl("mvn_cov_log_prob", &mvn_cov);
    m.impl("mvn_cov_log_prob_backward", &mvn_cov_backward);
    m.impl("squashed_tril_log_prob", &squashed_tril);
    m.impl("squashed_tril_log_prob_backward", &squashed_tril_backward);
    m.impl("mvn_packed_log_prob", &mvn_packed);
    m.impl("mvn_packed_log_prob_backward", &mvn_packed_backward);
    m.impl("squashed_packed_log_prob", &squashed_packed);
    m.impl("squashed_packed_log_prob_backward", &squashed_packed_backward);
    m.impl("packed_head_log_prob", &packed_head);
    m.impl("packed_head_log_prob_backward", &packed_head_backward);
  }

 private:
  static LogProbAndLogDet tril_forward(const char* op, const at::Tensor& value, const at::Tensor& loc,
                                       const at::Tensor& scale_tril, ValueSquash squash) {
    return forward_with_log_det<Param::kScaleTril>(prepare_mvn_problem(op, "scale_tril", value, loc, scale_tril),
                                                   value, squash);
  }

  static Grads tril_backward(const char* op, const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                             const at::Tensor& value, const at::Tensor& loc, const at::Tensor& scale_tril,
                             ValueSquash squash, std::array<bool, 3> mask) {
    const MvnProblem p = prepare_mvn_problem(op, "scale_tril", value, loc, scale_tril);
    // A shared factor's log-det term: (sum h) diag(1 / L_ii).
    const auto shared_log_det_gradient = [&](const at::Tensor& grad_sum) {
      const int64_t k = scale_tril.size(-1);
      return at::diag(grad_sum / scale_tril.reshape({k, k}).diagonal());
    };
    return backward_with_log_det<Param::kScaleTril>(op, p, grad, grad_log_det, value, loc, scale_tril, squash, mask,
                                                    shared_log_det_gradient);
  }

  static LogProbAndLogDet packed_forward(const char* op, const at::Tensor& value, const at::Tensor& loc,
                                         const at::Tensor& packed, c10::string_view diag_transform, double min_diag,
                                         ValueSquash squash) {
    return forward_with_log_det<Param::kPacked>(
        prepare_packed_mvn_problem(op, value, loc, packed, diag_transform, min_diag), value, squash);
  }

  static Grads packed_backward(const char* op, const at::Tensor& grad, const c10::optional<at::Tensor>& grad_log_det,
                               const at::Tensor& value, const at::Tensor& loc, const at::Tensor& packed,
                               c10::string_view diag_transform, double min_diag, ValueSquash squash,
                               std::array<bool, 3> mask) {
    const MvnProblem p = prepare_packed_mvn_problem(op, value, loc, packed, diag_transform, min_diag);
    // A shared factor's log-det term: (sum h) d/dx sum_i log L_ii, through the diagonal's
    // transform (one k(k+1)/2 vector).
    const auto shared_log_det_gradient = [&](const at::Tensor& grad_sum) {
      static const auto log_det_backward =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fusedgauss::packed_scale_tril_log_det_backward", "")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double)>();
      return log_det_backward.call(grad_sum, packed.reshape({packed.size(-1)}), diag_transform, min_diag);
    };
    return backward_with_log_det<Param::kPacked>(op, p, grad, grad_log_det, value, loc, packed, squash, mask,
                                                 shared_log_det_gradient);
  }

  /// A head's problem: loc and packed, its two parts (views), as the packed ops take them.
  /// The head has the batch shape (value may broadcast against it, not it against value), so
  /// that its gradient is one per sample.
  struct HeadProblem {
    at::Tensor loc, packed;
    int64_t width;
    MvnProblem p;
  };

  static HeadProblem head_problem(const char* op, const at::Tensor& value, const at::Tensor& head,
                                  c10::string_view diag_transform, double min_diag) {
    TORCH_CHECK(value.dim() >= 1 && head.dim() >= 1, op, ": value and head must have an event dimension, got shapes ",
                value.sizes(), " and ", head.sizes());
    const int64_t k = value.size(-1);
    const int64_t width = k + k * (k + 1) / 2;
    TORCH_CHECK(head.size(-1) == width, op, ": head must hold k + k(k+1)/2 = ", width,
                " values per sample for value's event size k = ", k, ", got ", head.size(-1));
    at::Tensor loc = head.narrow(-1, 0, k), packed = head.narrow(-1, k, width - k);
    MvnProblem p = prepare_packed_mvn_problem(op, value, loc, packed, diag_transform, min_diag);
    const c10::IntArrayRef head_batch = head.sizes().slice(0, head.dim() - 1);
    TORCH_CHECK(head_batch == c10::IntArrayRef(p.layout.batch_shape), op, ": head has batch shape ", head_batch,
                " but the log-prob has batch shape ", c10::IntArrayRef(p.layout.batch_shape),
                "; for a head shared by the batch, split it (mvn_packed_log_prob)");
    return {std::move(loc), std::move(packed), width, std::move(p)};
  }

  template <Param kParam>
  static LogProbAndLogDet forward_with_log_det(const MvnProblem& p, const at::Tensor& value, ValueSquash squash) {
    at::Tensor out = empty_output(p.layout.batch_shape, value.options());
    at::Tensor log_det = empty_output(p.layout.batch_shape, value.options());
    Kernels::template forward<kParam>(p, out, squash, log_det);
    return {out, log_det};
  }

  /// `shared_log_det_gradient(sum h)`: the matrix operand's gradient from the log_det of a
  /// factor shared by the batch. Such a factor has its gradient reduced inside the kernel, from
  /// sums of g that other gradients share, so its log_det part is added here instead.
  template <Param kParam, typename SharedLogDetGradient>
  static Grads backward_with_log_det(const char* op, const MvnProblem& p, const at::Tensor& grad,
                                     const c10::optional<at::Tensor>& grad_log_det, const at::Tensor& value,
                                     const at::Tensor& loc, const at::Tensor& matrix, ValueSquash squash,
                                     std::array<bool, 3> mask, const SharedLogDetGradient& shared_log_det_gradient) {
    at::Tensor upstream_log_det;
    if (grad_log_det.has_value() && grad_log_det->defined()) {
      upstream_log_det = batch_gradient(op, *grad_log_det, value, p.layout, "grad_log_det", "log_det");
    }
    const bool reduced_factor = p.matrix.reduces_gradient;
    std::array<at::Tensor, 3> grads = Kernels::template backward<kParam>(
        p, batch_gradient(op, grad, value, p.layout), mask, squash,
        reduced_factor ? at::Tensor() : upstream_log_det);
    if (reduced_factor && mask[2] && upstream_log_det.defined()) {
      grads[2] = grads[2] + shared_log_det_gradient(upstream_log_det.sum());
    }
    return gradients_for_inputs(grads, {&value, &loc, &matrix}, {&p.value, &p.loc, &p.matrix}, p.layout, mask);
  }
};

/// A log-prob over three (*, k) operands (value, loc, scale): `run(problem, out)` fills `out`.
template <typename Run>
at::Tensor rows_log_prob_forward_op(const char* op, const at::Tensor& value, const at::Tensor& loc,
                                    const at::Tensor& scale, const Run& run) {
  const RowsProblem p = prepare_rows_problem(op, {"value", "loc", "scale"}, {&value, &loc, &scale});
  at::Tensor out = empty_output(p.layout.batch_shape, value.options());
  run(p, out);
  return out;
}

template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_log_prob_backward_op(const char* op, const at::Tensor& grad,
                                                                         const at::Tensor& value,
                                                                         const at::Tensor& loc,
                                                                         const at::Tensor& scale,
                                                                         std::array<bool, 3> mask, const Run& run) {
  const RowsProblem p = prepare_rows_problem(op, {"value", "loc", "scale"}, {&value, &loc, &scale});
  const std::array<at::Tensor, 3> grads = run(p, batch_gradient(op, grad, value, p.layout), mask);
  return gradients_for_inputs(grads, {&value, &loc, &scale}, {&p.operands[0], &p.operands[1], &p.operands[2]},
                              p.layout, mask);
}

/// The outputs of a squashed rsample op: action and pre-tanh value (batch shape + (k,)), and
/// the log-prob (batch shape).
struct RsampleOutputs {
  at::Tensor action;
  at::Tensor pre_tanh;
  at::Tensor log_prob;
};

/// The upstream gradients of a squashed rsample op, contiguous; undefined where autograd
/// passed none (that output was not used).
struct RsampleGradients {
  at::Tensor action;
  at::Tensor pre_tanh;
  at::Tensor log_prob;
};

inline RsampleOutputs empty_rsample_outputs(const BatchLayout& layout, int64_t k, const at::TensorOptions& options) {
  std::vector<int64_t> rows(layout.batch_shape);
  rows.push_back(k);
  return {empty_output(rows, options), empty_output(rows, options), empty_output(layout.batch_shape, options)};
}

inline RsampleGradients check_rsample_gradients(const char* op, const c10::optional<at::Tensor>& grad_action,
                                                const c10::optional<at::Tensor>& grad_pre_tanh,
                                                const c10::optional<at::Tensor>& grad_log_prob,
                                                const at::Tensor& like, const BatchLayout& layout, int64_t k) {
  std::vector<int64_t> rows(layout.batch_shape);
  rows.push_back(k);
  const auto check = [&](const char* name, const c10::optional<at::Tensor>& g, c10::IntArrayRef shape) {
    if (!g.has_value() || !g->defined()) {
      return at::Tensor();
    }
    check_same_dtype_and_device(op, name, *g, like);
    TORCH_CHECK(g->sizes() == shape, op, ": ", name, " has shape ", g->sizes(), " but its output has shape ", shape);
    return g->contiguous();
  };
  return {check("grad_action", grad_action, rows), check("grad_pre_tanh", grad_pre_tanh, rows),
          check("grad_log_prob", grad_log_prob, layout.batch_shape)};
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
