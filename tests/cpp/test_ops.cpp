// The registered ops, called through the dispatcher as a libtorch user would, against ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <cmath>
#include <tuple>

#include "check.h"

namespace {

at::Tensor call_log_prob(const char* name, const at::Tensor& value, const at::Tensor& loc,
                         const at::Tensor& matrix) {
  static auto& dispatcher = c10::Dispatcher::singleton();
  return dispatcher.findSchemaOrThrow(name, "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>()
      .call(value, loc, matrix);
}

/// mvn_tril_log_prob's two outputs: the log-prob and each sample's sum_i log L_ii.
std::tuple<at::Tensor, at::Tensor> call_tril_log_prob(const at::Tensor& value, const at::Tensor& loc,
                                                      const at::Tensor& scale_tril) {
  static auto& dispatcher = c10::Dispatcher::singleton();
  return dispatcher.findSchemaOrThrow("fusedgauss::mvn_tril_log_prob", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>()
      .call(value, loc, scale_tril);
}

double max_abs_difference(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

void test_log_prob_ops(int64_t k) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor value = at::randn({5, 3, k}, options);
  const at::Tensor loc = at::randn({3, k}, options);
  const at::Tensor B = at::randn({5, 1, k, k}, options);
  const at::Tensor cov = at::matmul(B, B.mT()) / k + 0.5 * at::eye(k, options);
  const at::Tensor L = at::linalg_cholesky(cov).contiguous();
  const at::Tensor diff = (value - loc).unsqueeze(-1);
  const at::Tensor z = at::linalg_solve_triangular(L.expand({5, 3, k, k}), diff, /*upper=*/false).squeeze(-1);
  const at::Tensor log_det = L.diagonal(0, -2, -1).log().sum(-1);
  const at::Tensor expected = -0.5 * z.pow(2).sum(-1) - log_det - 0.5 * k * std::log(2 * M_PI);
  const auto [tril_log_prob, tril_log_det] = call_tril_log_prob(value, loc, L);
  EXPECT_TRUE(max_abs_difference(tril_log_prob, expected) < 1e-10);
  EXPECT_TRUE(max_abs_difference(tril_log_det, log_det.expand({5, 3})) < 1e-12);
  EXPECT_TRUE(max_abs_difference(call_log_prob("fusedgauss::mvn_cov_log_prob", value, loc, cov), expected) < 1e-10);
}

void test_cholesky_op(int64_t k) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor B = at::randn({4, k, k}, options);
  const at::Tensor A = at::matmul(B, B.mT()) / k + 0.5 * at::eye(k, options);
  const at::Tensor L = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("fusedgauss::cholesky", "")
                           .typed<at::Tensor(const at::Tensor&)>()
                           .call(A);
  EXPECT_TRUE(max_abs_difference(L, at::linalg_cholesky(A)) < 1e-12);
}

/// The ops carry their autograd with them: a libtorch caller differentiates through the op
/// itself (its Autograd kernel calls the backward op), and gets ATen's gradients.
void test_gradients_through_the_op(int64_t k) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor value = at::randn({4, k}, options);
  const at::Tensor loc = at::randn({4, k}, options).requires_grad_();
  const at::Tensor B = at::randn({4, k, k}, options);
  const at::Tensor L =
      at::linalg_cholesky(at::matmul(B, B.mT()) / k + 0.5 * at::eye(k, options)).detach().requires_grad_();
  const at::Tensor weights = at::randn({4}, options);

  const auto [log_prob, log_det] = call_tril_log_prob(value, loc, L);
  const auto got = torch::autograd::grad({(log_prob * weights).sum() + log_det.sum()}, {loc, L});

  const at::Tensor z = at::linalg_solve_triangular(L, (value - loc).unsqueeze(-1), /*upper=*/false).squeeze(-1);
  const at::Tensor expected_log_det = L.diagonal(0, -2, -1).log().sum(-1);
  const at::Tensor expected_log_prob = -0.5 * z.pow(2).sum(-1) - expected_log_det - 0.5 * k * std::log(2 * M_PI);
  const auto expected =
      torch::autograd::grad({(expected_log_prob * weights).sum() + expected_log_det.sum()}, {loc, L});
  EXPECT_TRUE(max_abs_difference(got[0], expected[0]) < 1e-10);
  EXPECT_TRUE(max_abs_difference(got[1], expected[1]) < 1e-10);
}

/// A backward pass that builds a graph (create_graph: the first half of a second derivative)
/// takes its gradients from the Python package's plain-PyTorch formulas; without the package
/// it raises, saying so.
void test_second_derivative_needs_the_python_package() {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor loc = at::randn({4, 3}, options).requires_grad_();
  const auto [log_prob, log_det] = call_tril_log_prob(at::randn({4, 3}, options), loc, at::eye(3, options));
  bool threw = false;
  try {
    torch::autograd::grad({log_prob.sum()}, {loc}, {}, std::nullopt, /*create_graph=*/true);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("come with the Python package") != std::string::npos;
  }
  EXPECT_TRUE(threw);
}

void test_bad_input_is_rejected() {
  bool threw = false;
  try {
    call_tril_log_prob(at::randn({3}), at::randn({4}), at::eye(3));
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("event sizes differ") != std::string::npos;
  }
  EXPECT_TRUE(threw);
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int64_t k : {1, 2, 6, 17}) {
    test_log_prob_ops(k);
    test_cholesky_op(k);
    test_gradients_through_the_op(k);
  }
  test_second_derivative_needs_the_python_package();
  test_bad_input_is_rejected();
  std::printf("%s: %d failures\n", failures() ? "FAILED" : "ok", failures());
  return failures();
}
