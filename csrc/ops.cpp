// Every fusedgauss op's schema, in one place. Device kernels register their implementations
// in csrc/cpu and csrc/cuda, autograd in csrc/autograd; fake (meta) implementations are
// attached in Python (pyext/ops.py). Schemas are functional: fresh outputs, no in-place
// arguments, but for the sampler's noise (first below).

#include <torch/library.h>

TORCH_LIBRARY(fusedgauss, m) {
  // torch's Tensor.normal_() (mean 0, std 1) on the CPU: the same numbers from the same
  // generator state, drawn faster (csrc/cpu/standard_normal_cpu.cpp), for the noise of a
  // sample. The one in-place op, as torch's samplers are: it fills a fresh tensor.
  m.def("standard_normal_(Tensor(a!) self, Generator? generator=None) -> ()",
        {at::Tag::nondeterministic_seeded});

  // log N(value; loc, scale_tril scale_tril^T). Batch shapes broadcast; event size k.
  // The ops whose factor is given (scale_tril, or packed below) also return each sample's
  // sum_i log L_ii (log_det, batch-shaped like the log-prob), which the log-prob computes
  // anyway, so that an entropy beside a log-prob costs no pass of its own; their backward ops
  // take its upstream gradient grad_log_det (None: it was not used).
  m.def("mvn_tril_log_prob(Tensor value, Tensor loc, Tensor scale_tril) -> (Tensor log_prob, Tensor log_det)");
  // Gradients with the shapes of value, loc and scale_tril; an entry whose output_mask is
  // false is an empty tensor.
  m.def(
      "mvn_tril_log_prob_backward(Tensor grad, Tensor? grad_log_det, Tensor value, Tensor loc, Tensor scale_tril, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // log N(value; loc, covariance); the Cholesky factor lives in the kernel only.
  m.def("mvn_cov_log_prob(Tensor value, Tensor loc, Tensor covariance) -> Tensor");
  m.def(
      "mvn_cov_log_prob_backward(Tensor grad, Tensor value, Tensor loc, Tensor covariance, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Lower Cholesky factor of each matrix in A (*, k, k), read through its lower triangle.
  m.def("cholesky(Tensor A) -> Tensor");
  m.def("cholesky_backward(Tensor grad, Tensor L) -> Tensor");

  // log N(value; loc, diag(scale)^2) summed over the event: value, loc, scale (*, k).
  m.def("diag_normal_log_prob(Tensor value, Tensor loc, Tensor scale) -> Tensor");
  m.def(
      "diag_normal_log_prob_backward(Tensor grad, Tensor value, Tensor loc, Tensor scale, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // log|d tanh(u) / du| = log(1 - tanh(u)^2), elementwise, in the stable form.
  m.def("tanh_log_abs_det_jacobian(Tensor u) -> Tensor");
  m.def("tanh_log_abs_det_jacobian_backward(Tensor grad, Tensor u) -> Tensor");
  // log-prob of a = tanh(u), u ~ a Gaussian with a diagonal or scale_tril base, given the
  // action a (value_is_pre_tanh false: u = atanh of a clamped to the dtype's open interval)
  // or u itself: base log-prob of u minus sum_i log(1 - tanh(u_i)^2).
  m.def("squashed_diag_log_prob(Tensor value, Tensor loc, Tensor scale, bool value_is_pre_tanh) -> Tensor");
  m.def(
      "squashed_diag_log_prob_backward(Tensor grad, Tensor value, Tensor loc, Tensor scale, "
      "bool value_is_pre_tanh, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // (log_det: the base Gaussian's sum_i log L_ii, as mvn_tril_log_prob's.)
  m.def(
      "squashed_tril_log_prob(Tensor value, Tensor loc, Tensor scale_tril, bool value_is_pre_tanh) "
      "-> (Tensor log_prob, Tensor log_det)");
  m.def(
      "squashed_tril_log_prob_backward(Tensor grad, Tensor? grad_log_det, Tensor value, Tensor loc, "
      "Tensor scale_tril, bool value_is_pre_tanh, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // A reparameterised squashed sample from standard-normal noise eps (*, k):
  // u = loc + scale * eps (or scale_tril @ eps), action = tanh(u), and its log-prob, with no
  // solve and no atanh. Backward takes the gradients of the three outputs (absent: zero).
  m.def(
      "squashed_diag_rsample_log_prob(Tensor loc, Tensor scale, Tensor eps) "
      "-> (Tensor action, Tensor pre_tanh, Tensor log_prob)");
  m.def(
      "squashed_diag_rsample_log_prob_backward(Tensor? grad_action, Tensor? grad_pre_tanh, "
      "Tensor? grad_log_prob, Tensor loc, Tensor scale, Tensor eps, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "squashed_tril_rsample_log_prob(Tensor loc, Tensor scale_tril, Tensor eps) "
      "-> (Tensor action, Tensor pre_tanh, Tensor log_prob)");
  m.def(
      "squashed_tril_rsample_log_prob_backward(Tensor? grad_action, Tensor? grad_pre_tanh, "
      "Tensor? grad_log_prob, Tensor loc, Tensor scale_tril, Tensor eps, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");

  // A policy head's packed scale_tril: packed (*, k(k+1)/2), row by row as
  // torch.tril_indices(k, k) lists the lower triangle, into L (*, k, k), with L_ii =
  // diag_transform(x_ii) + min_diag ("softplus", "exp" or "none") and zeros above the diagonal.
  m.def("packed_to_scale_tril(Tensor packed, str diag_transform, float min_diag) -> Tensor");
  m.def("packed_to_scale_tril_backward(Tensor grad, Tensor packed, str diag_transform) -> Tensor");
  // Its log-determinant, sum_i log L_ii (*,), from the k diagonal entries alone: L is never built.
  m.def("packed_scale_tril_log_det(Tensor packed, str diag_transform, float min_diag) -> Tensor");
  m.def(
      "packed_scale_tril_log_det_backward(Tensor grad, Tensor packed, str diag_transform, float min_diag) "
      "-> Tensor");
  // The log-probs of mvn_tril_log_prob and squashed_tril_log_prob with scale_tril given packed
  // (as packed_to_scale_tril reads it): L is unpacked inside the kernel and never written out,
  // and the gradient is the packed operand's; log_det and grad_log_det as theirs.
  m.def(
      "mvn_packed_log_prob(Tensor value, Tensor loc, Tensor packed, str diag_transform, float min_diag) "
      "-> (Tensor log_prob, Tensor log_det)");
  m.def(
      "mvn_packed_log_prob_backward(Tensor grad, Tensor? grad_log_det, Tensor value, Tensor loc, Tensor packed, "
      "str diag_transform, float min_diag, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "squashed_packed_log_prob(Tensor value, Tensor loc, Tensor packed, str diag_transform, float min_diag, "
      "bool value_is_pre_tanh) -> (Tensor log_prob, Tensor log_det)");
  m.def(
      "squashed_packed_log_prob_backward(Tensor grad, Tensor? grad_log_det, Tensor value, Tensor loc, "
      "Tensor packed, str diag_transform, float min_diag, bool value_is_pre_tanh, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // mvn_packed_log_prob (squashed: squashed_packed_log_prob) of a policy head's whole output,
  // head (*, k + k(k+1)/2) = [loc | packed] in each row (k: value's event size; head has the
  // batch shape). Its backward returns value's gradient and the head's, in one tensor: what the
  // head's layer takes, where a split's backward would copy two gradients into one.
  m.def(
      "packed_head_log_prob(Tensor value, Tensor head, str diag_transform, float min_diag, bool squashed, "
      "bool value_is_pre_tanh) -> (Tensor log_prob, Tensor log_det)");
  m.def(
      "packed_head_log_prob_backward(Tensor grad, Tensor? grad_log_det, Tensor value, Tensor head, "
      "str diag_transform, float min_diag, bool squashed, bool value_is_pre_tanh, bool[2] output_mask) "
      "-> (Tensor, Tensor)");

  // The gradients of forward op `op`'s saved tensors (its tensor inputs; cholesky: its output)
  // as tensors autograd can differentiate again, for a backward pass that builds a graph
  // (create_graph=True), from the upstream gradients of its outputs (None: unused) and its
  // other arguments by type, each list in the op's order. Implemented in Python
  // (fusedgauss.ops.differentiable_backward: autograd through the op's plain-PyTorch
  // formulas); csrc/autograd calls it. An entry of needs_input_grad that is false gives an
  // empty tensor.
  m.def(
      "differentiable_backward(str op, Tensor[] saved, Tensor?[] grads, bool[] needs_input_grad, str[] strings, "
      "float[] floats, bool[] bools) -> Tensor[]");
}
