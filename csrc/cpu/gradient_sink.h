#pragma once
// Where one operand's gradient goes in a CPU backward kernel.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "../common/batching.h"
#include "../common/outputs.h"
#include "chunked.h"
#include "lanes.h"

namespace fusedgauss {
namespace cpu {

/// Nowhere (not requested), rows of a per-sample output (B, *event), or per-chunk partial sums
/// (an operand that reduces its gradient over the batch) that are added in chunk order.
/// `extra_slots` adds partial-sum slots after the event's, for totals a kernel needs beside
/// the gradient (the sum of the upstream gradients, say). `rows_in`, when defined, is where a
/// per-sample gradient goes instead of an output of its own: a (B, width) stretch of wider rows
/// (unit column stride), which other sinks fill beside it.
template <typename scalar_t>
struct GradientSink {
  using acc_t = at::opmath_type<scalar_t>;

  GradientSink(bool requested, const BatchedOperand& operand, std::vector<int64_t> event_shape,
               const Chunks& chunks, int64_t batch_numel, int64_t extra_slots = 0,
               const at::Tensor& rows_in = at::Tensor())
      : requested(requested), reduces(requested && operand.reduces_gradient) {
    width = 1;
    for (int64_t s : event_shape) width *= s;
    row_stride = width;
    if (reduces) {
      TORCH_INTERNAL_ASSERT(!rows_in.defined(), "a reduced gradient has no rows to write into");
      partials = ChunkPartials<acc_t>(chunks, width + extra_slots);
    } else if (requested && rows_in.defined()) {
      TORCH_INTERNAL_ASSERT(rows_in.dim() == 2 && rows_in.size(0) == batch_numel && rows_in.size(1) == width &&
                            rows_in.stride(1) == 1);
      per_sample = rows_in;
      row_stride = rows_in.stride(0);
    } else if (requested) {
      event_shape.insert(event_shape.begin(), batch_numel);
      per_sample = empty_output(event_shape, operand.data.options());
    }
  }

  /// The per-sample output, or nullptr when this sink reduces or takes nothing.
  scalar_t* rows() { return per_sample.defined() ? per_sample.data_ptr<scalar_t>() : nullptr; }

  /// Whether the per-sample rows are too big to stay in the caches (kStreamingOutputBytes) and
  /// are whole rows. A stretch of wider rows (rows_in) shares cache lines with the sinks that
  /// fill the rest: non-temporal stores of part of a line, beside ordinary stores into it,
  /// flush partial lines (a k=17 policy head's backward, its loc and packed parts streamed
  /// apart: 150 -> 590 ns a sample once its 680-byte rows passed 8 MB; it writes whole rows now).
  bool streams() const {
    return per_sample.defined() && row_stride == width &&
           per_sample.size(0) * row_stride * per_sample.element_size() >= kStreamingOutputBytes;
  }

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
  int64_t row_stride;  // of the per-sample rows: width, or that of the rows written into
  at::Tensor per_sample;
  ChunkPartials<acc_t> partials;
};

/// A chunk's writes of lane-minor blocks into a sink's per-sample rows: scatter_rows, or
/// stream_rows when the sink streams, fenced when the chunk is done.
template <int W, typename scalar_t>
class SinkRows {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit SinkRows(GradientSink<scalar_t>& sink)
      : rows_(sink.rows()),
        width_(sink.width),
        row_stride_(sink.row_stride),
        streaming_(sink.streams()),
        stage_(streaming_ ? static_cast<size_t>(width_ * W) : 0) {}
  SinkRows(const SinkRows&) = delete;
  SinkRows& operator=(const SinkRows&) = delete;
  ~SinkRows() {
    if (streaming_) finish_streaming();
  }

  /// Whether the sink takes rows (false: it reduces, or was not asked for).
  bool active() const { return rows_ != nullptr; }

  /// Rows b0 .. b0 + count - 1 from the first `count` lanes of `lanes` (width x W).
  C10_ALWAYS_INLINE void write(const acc_t* lanes, int64_t b0, int count) {
    scalar_t* out = rows_ + b0 * row_stride_;
    if (streaming_) {
      stream_rows<W>(width_, lanes, count, out, row_stride_, stage_.data());
    } else {
      scatter_rows<W>(width_, lanes, count, out, row_stride_);
    }
  }

 private:
  scalar_t* rows_;
  int64_t width_;
  int64_t row_stride_;
  bool streaming_;
  std::vector<scalar_t> stage_;
};

}  // namespace cpu
}  // namespace fusedgauss
