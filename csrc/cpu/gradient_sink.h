#pragma once
// Where one operand's gradient goes in a CPU backward kernel.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "../common/batching.h"
#include "../common/outputs.h"
#include "chunked.h"

namespace fusedgauss {
namespace cpu {

/// Nowhere (not requested), rows of a per-sample output (B, *event), or per-chunk partial sums
/// (an operand that reduces its gradient over the batch) that are added in chunk order.
/// `extra_slots` adds partial-sum slots after the event's, for totals a kernel needs beside
/// the gradient (the sum of the upstream gradients, say).
template <typename scalar_t>
struct GradientSink {
  using acc_t = at::opmath_type<scalar_t>;

  GradientSink(bool requested, const BatchedOperand& operand, std::vector<int64_t> event_shape,
               const Chunks& chunks, int64_t batch_numel, int64_t extra_slots = 0)
      : requested(requested), reduces(requested && operand.reduces_gradient) {
    width = 1;
    for (int64_t s : event_shape) width *= s;
    if (reduces) {
      partials = ChunkPartials<acc_t>(chunks, width + extra_slots);
    } else if (requested) {
      event_shape.insert(event_shape.begin(), batch_numel);
      per_sample = empty_output(event_shape, operand.data.options());
    }
  }

  /// The per-sample output, or nullptr when this sink reduces or takes nothing.
  scalar_t* rows() { return per_sample.defined() ? per_sample.data_ptr<scalar_t>() : nullptr; }

  /// The reduced gradient in acc_t, of `width` entries, and the totals of the extra slots.
  std::pair<at::Tensor, std::vector<acc_t>> reduced(const at::TensorOptions& options) const {
    std::vector<acc_t> total = partials.total();
    at::Tensor out = at::empty({width}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    std::copy(total.begin(), total.begin() + width, out.data_ptr<acc_t>());
    return {out, std::vector<acc_t>(total.begin() + width, total.end())};
  }

  bool requested;
  bool reduces;
  int64_t width;
  at::Tensor per_sample;
  ChunkPartials<acc_t> partials;
};

}  // namespace cpu
}  // namespace fusedgauss
