#pragma once
// Argument checks shared by every device's op implementations. The Python op surface
// (pyext/ops.py) checks first, with dtype promotion and friendlier errors; these checks
// keep the ops safe when they are called from C++ or through torch.ops directly.

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "../math/packed_math.h"
#include "batching.h"

namespace fusedgauss {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_dtype_and_device(const char* op, const char* name, const at::Tensor& t,
                                        const at::Tensor& reference) {
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but the other arguments have ", reference.scalar_type());
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " is on ", t.device(),
              " but the other arguments are on ", reference.device());
}

inline void check_square(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2 && t.size(-1) == t.size(-2), op, ": ", name,
              " must be a batch of square matrices (*, k, k), got shape ", t.sizes());
}

/// value (*, k), loc (*, k) and a (*, k, k) matrix, ready for a kernel; or, for the packed
/// ops, the matrix operand is a packed scale_tril (*, k(k+1)/2) whose diagonal entries become
/// diag_transform(x) + min_diag.
struct MvnProblem {
  BatchLayout layout;
  int64_t k;
  BatchedOperand value;
  BatchedOperand loc;
  BatchedOperand matrix;
  math::DiagTransform diag_transform = math::DiagTransform::kNone;
  double min_diag = 0;
};

/// `value_name` names the vector operand beside loc in errors ("eps" for a sample).
inline MvnProblem prepare_mvn_problem(const char* op, const char* matrix_name, const at::Tensor& value,
                                      const at::Tensor& loc, const at::Tensor& matrix,
                                      const char* value_name = "value") {
  check_floating(op, value_name, value);
  check_same_dtype_and_device(op, "loc", loc, value);
  check_same_dtype_and_device(op, matrix_name, matrix, value);
  check_square(op, matrix_name, matrix);
  const int64_t k = matrix.size(-1);
  TORCH_CHECK(value.dim() >= 1 && loc.dim() >= 1, op, ": ", value_name,
              " and loc must have an event dimension, got shapes ", value.sizes(), " and ", loc.sizes());
  TORCH_CHECK(value.size(-1) == k && loc.size(-1) == k, op, ": event sizes differ: ", value_name, " has ",
              value.size(-1), ", loc has ", loc.size(-1), ", ", matrix_name, " is ", k, " x ", k);
  BatchLayout layout = broadcast_batch({{&value, 1}, {&loc, 1}, {&matrix, 2}});
  constexpr bool kStrided = true;  // every full-covariance kernel reads samples at their stride
  return {layout, k, batch_operand(value, 1, layout, kStrided), batch_operand(loc, 1, layout, kStrided),
          batch_operand(matrix, 2, layout, kStrided)};
}

/// Three operands of shape (*, k) each, ready for a kernel: the diagonal and squashed-diagonal
/// ops (value, loc, scale) and the rsample ops (loc, scale, eps).
struct RowsProblem {
  BatchLayout layout;
  int64_t k;
  std::array<BatchedOperand, 3> operands;
};

inline RowsProblem prepare_rows_problem(const char* op, std::array<const char*, 3> names,
                                        std::array<const at::Tensor*, 3> tensors) {
  check_floating(op, names[0], *tensors[0]);
  for (size_t i = 0; i < 3; ++i) {
    check_same_dtype_and_device(op, names[i], *tensors[i], *tensors[0]);
    TORCH_CHECK(tensors[i]->dim() >= 1, op, ": ", names[i], " must have an event dimension, got shape ",
                tensors[i]->sizes());
  }
  const int64_t k = tensors[0]->size(-1);
  TORCH_CHECK(tensors[1]->size(-1) == k && tensors[2]->size(-1) == k, op, ": event sizes differ: ", names[0],
              " has ", k, ", ", names[1], " has ", tensors[1]->size(-1), ", ", names[2], " has ",
              tensors[2]->size(-1));
  BatchLayout layout = broadcast_batch({{tensors[0], 1}, {tensors[1], 1}, {tensors[2], 1}});
  return {layout, k,
          {batch_operand(*tensors[0], 1, layout), batch_operand(*tensors[1], 1, layout),
           batch_operand(*tensors[2], 1, layout)}};
}

/// The packed scale_tril of packed_to_scale_tril, ready for a kernel: `samples` rows of
/// n = k(k+1)/2 contiguous values, and the shape of the (*, k, k) result.
struct PackedProblem {
  at::Tensor packed;  // (samples, n), contiguous
  int64_t k;
  int64_t samples;
  math::DiagTransform transform;
  std::vector<int64_t> scale_tril_sizes;
};

inline math::DiagTransform parse_diag_transform(const char* op, c10::string_view name) {
  if (name == "softplus") return math::DiagTransform::kSoftplus;
  if (name == "exp") return math::DiagTransform::kExp;
  if (name == "none") return math::DiagTransform::kNone;
  TORCH_CHECK(false, op, ": diag_transform must be \"softplus\", \"exp\" or \"none\", got \"",
              std::string(name.data(), name.size()), "\"");
}

/// k with k(k+1)/2 = n, or an error naming n.
inline int64_t event_size_of_packed(const char* op, int64_t n) {
  const int64_t k = n > 0 ? math::packed_row(n) : 0;
  TORCH_CHECK(n > 0 && math::packed_size(k) == n, op, ": the last dimension of packed must hold k(k+1)/2 values ",
              "for some k >= 1 (1, 3, 6, 10, ...), got ", n);
  return k;
}

/// With `grad` (a backward op), also checks that it is shaped like the scale_tril.
inline PackedProblem prepare_packed_problem(const char* op, const at::Tensor& packed, c10::string_view diag_transform,
                                            const at::Tensor* grad = nullptr) {
  check_floating(op, "packed", packed);
  TORCH_CHECK(packed.dim() >= 1, op, ": packed must have an event dimension, got shape ", packed.sizes());
  const int64_t k = event_size_of_packed(op, packed.size(-1));
  std::vector<int64_t> sizes(packed.sizes().begin(), packed.sizes().end() - 1);
  sizes.push_back(k);
  sizes.push_back(k);
  if (grad != nullptr) {
    check_same_dtype_and_device(op, "grad", *grad, packed);
    TORCH_CHECK(grad->sizes() == at::IntArrayRef(sizes), op, ": grad has shape ", grad->sizes(),
                " but the scale_tril of packed ", packed.sizes(), " has shape ", at::IntArrayRef(sizes));
  }
  const at::Tensor rows = packed.contiguous();
  return {rows, k, packed.numel() / packed.size(-1), parse_diag_transform(op, diag_transform), sizes};
}

/// The gradient of packed_scale_tril_log_det's output: shaped like packed's batch.
inline void check_log_det_gradient(const char* op, const at::Tensor& grad, const at::Tensor& packed) {
  check_same_dtype_and_device(op, "grad", grad, packed);
  const at::IntArrayRef batch = packed.sizes().slice(0, packed.dim() - 1);
  TORCH_CHECK(grad.sizes() == batch, op, ": grad has shape ", grad.sizes(), " but the log-determinants of packed ",
              packed.sizes(), " have shape ", batch);
}

/// value (*, k), loc (*, k) and a packed scale_tril (*, k(k+1)/2), ready for a kernel.
inline MvnProblem prepare_packed_mvn_problem(const char* op, const at::Tensor& value, const at::Tensor& loc,
                                             const at::Tensor& packed, c10::string_view diag_transform,
                                             double min_diag) {
  check_floating(op, "value", value);
  check_same_dtype_and_device(op, "loc", loc, value);
  check_same_dtype_and_device(op, "packed", packed, value);
  TORCH_CHECK(value.dim() >= 1 && loc.dim() >= 1 && packed.dim() >= 1, op,
              ": value, loc and packed must have an event dimension, got shapes ", value.sizes(), ", ", loc.sizes(),
              " and ", packed.sizes());
  const int64_t k = value.size(-1);
  TORCH_CHECK(loc.size(-1) == k && packed.size(-1) == math::packed_size(k), op, ": event sizes differ: value has ", k,
              ", loc has ", loc.size(-1), ", packed has ", packed.size(-1), " values (k(k+1)/2 = ",
              math::packed_size(k), " for k = ", k, ")");
  BatchLayout layout = broadcast_batch({{&value, 1}, {&loc, 1}, {&packed, 1}});
  constexpr bool kStrided = true;  // as prepare_mvn_problem's
  return {layout,
          k,
          batch_operand(value, 1, layout, kStrided),
          batch_operand(loc, 1, layout, kStrided),
          batch_operand(packed, 1, layout, kStrided),
          parse_diag_transform(op, diag_transform),
          min_diag};
}

}  // namespace fusedgauss
