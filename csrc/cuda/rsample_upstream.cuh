#pragma once
// The upstream gradients of a squashed rsample op, as its CUDA backward kernels read them.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../common/op_wrappers.h"

namespace fusedgauss {
namespace cuda {

/// Gradients of the action (B, k), the pre-tanh value (B, k) and the log-prob (B); nullptr
/// where autograd passed none (that output was not used), which reads as zero.
template <typename scalar_t>
struct RsampleUpstream {
  const scalar_t* action;
  const scalar_t* pre_tanh;
  const scalar_t* log_prob;

  explicit RsampleUpstream(const RsampleGradients& g)
      : action(g.action.defined() ? g.action.const_data_ptr<scalar_t>() : nullptr),
        pre_tanh(g.pre_tanh.defined() ? g.pre_tanh.const_data_ptr<scalar_t>() : nullptr),
        log_prob(g.log_prob.defined() ? g.log_prob.const_data_ptr<scalar_t>() : nullptr) {}

  /// Entry e of upstream gradient g (one of the three), 0 when it is absent.
  __device__ C10_ALWAYS_INLINE at::opmath_type<scalar_t> at(const scalar_t* g, int64_t e) const {
    return g != nullptr ? static_cast<at::opmath_type<scalar_t>>(g[e]) : at::opmath_type<scalar_t>(0);
  }
};

}  // namespace cuda
}  // namespace fusedgauss
