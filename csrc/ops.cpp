// Every fusedgauss op's schema, in one place. Device kernels register their implementations
// in csrc/cpu and csrc/cuda; autograd and fake (meta) implementations are attached in
// Python (pyext/ops.py). Schemas are functional: fresh outputs, no in-place arguments.

#include <torch/library.h>

TORCH_LIBRARY(fusedgauss, m) {
  // log N(value; loc, scale_tril scale_tril^T). Batch shapes broadcast; event size k.
  m.def("mvn_tril_log_prob(Tensor value, Tensor loc, Tensor scale_tril) -> Tensor");
  // Gradients with the shapes of value, loc and scale_tril; an entry whose output_mask is
  // false is an empty tensor.
  m.def(
      "mvn_tril_log_prob_backward(Tensor grad, Tensor value, Tensor loc, Tensor scale_tril, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // log N(value; loc, covariance); the Cholesky factor lives in the kernel only.
  m.def("mvn_cov_log_prob(Tensor value, Tensor loc, Tensor covariance) -> Tensor");
  m.def(
      "mvn_cov_log_prob_backward(Tensor grad, Tensor value, Tensor loc, Tensor covariance, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Lower Cholesky factor of each matrix in A (*, k, k), read through its lower triangle.
  m.def("cholesky(Tensor A) -> Tensor");
  m.def("cholesky_backward(Tensor grad, Tensor L) -> Tensor");
}
