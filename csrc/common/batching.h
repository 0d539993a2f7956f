#pragma once
// How the operands of a batched op are laid out for a kernel, on any device.
//
// Every op takes tensors of shape (*batch_i, *event) whose batch shapes broadcast. A kernel
// sees each operand in one of two layouts:
//   - shared: one event for the whole batch (batch stride 0). This is an operand whose batch
//     has one element, or one that was expanded (all batch strides 0). Its gradient is
//     reduced inside the kernel, never through a (B, *event) temporary.
//   - per sample: (B, *event), each sample's event one contiguous run. Contiguous, or, for the
//     kernels that read samples at any stride (the full-covariance ops: `strided_samples`),
//     samples a fixed stride apart, as in a slice of a wider tensor (a policy network's output
//     split into loc and a packed scale_tril), read where it lies. Any other layout, and an
//     operand that broadcasts only partly (fits neither layout), is materialised here, and a
//     partly broadcast one has its gradient summed back afterwards.

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>

#include <string>
#include <vector>

namespace fusedgauss {

struct BatchedOperand {
  at::Tensor data;         // contiguous (*event) when shared; (B, *event) samples otherwise
  int64_t batch_stride;    // elements between consecutive samples; 0 when shared
  // The input has a single batch element, so its gradient is the sum over the batch.
  // (An expanded input is read as shared but needs a gradient per batch element.)
  bool reduces_gradient;
  bool shared() const { return batch_stride == 0; }
};

struct BatchLayout {
  std::vector<int64_t> batch_shape;  // broadcast batch shape of all operands
  int64_t batch_numel;
};

inline c10::IntArrayRef batch_sizes(const at::Tensor& t, int64_t event_dims) {
  return t.sizes().slice(0, t.dim() - event_dims);
}

/// Whether t's batch holds one event (every batch dimension of size 1 or stride 0). An
/// empty batch holds none, even when expanded (stride 0 over a size-0 dimension): it is read
/// per sample, as zero samples.
inline bool batch_is_broadcast(const at::Tensor& t, int64_t event_dims) {
  for (int64_t d = 0; d < t.dim() - event_dims; ++d) {
    if (t.size(d) == 0 || (t.size(d) != 1 && t.stride(d) != 0)) {
      return false;
    }
  }
  return true;
}

/// Broadcast batch shape of the given (tensor, event_dims) pairs.
inline BatchLayout broadcast_batch(std::initializer_list<std::pair<const at::Tensor*, int64_t>> operands) {
  std::vector<int64_t> shape;
  for (const auto& [tensor, event_dims] : operands) {
    auto inferred = at::infer_size(shape, batch_sizes(*tensor, event_dims));
    shape.assign(inferred.begin(), inferred.end());
  }
  int64_t numel = 1;
  for (int64_t s : shape) {
    numel *= s;
  }
  return {shape, numel};
}

/// The stride between consecutive samples of `full` (an operand expanded to the batch's
/// shape) when each sample's event is one contiguous run and the samples lie a fixed stride
/// apart without overlapping; -1 otherwise.
inline int64_t uniform_sample_stride(const at::Tensor& full, int64_t event_dims) {
  int64_t event_numel = 1;
  for (int64_t d = full.dim() - 1; d >= full.dim() - event_dims; --d) {
    if (full.size(d) != 1 && full.stride(d) != event_numel) return -1;
    event_numel *= full.size(d);
  }
  int64_t stride = -1;      // of the innermost batch dimension with more than one element
  int64_t outer_stride = -1;  // what the next one out must have for the batch to flatten
  for (int64_t d = full.dim() - event_dims - 1; d >= 0; --d) {
    if (full.size(d) == 1) continue;
    if (stride < 0) {
      stride = full.stride(d);
    } else if (full.stride(d) != outer_stride) {
      return -1;
    }
    outer_stride = full.stride(d) * full.size(d);
  }
  if (stride < 0) return event_numel;  // one sample
  return stride >= event_numel ? stride : -1;
}

/// `strided_samples`: the op's kernels read a per-sample operand at its batch_stride, so one
/// whose samples lie a fixed stride apart is passed as it is (see the top of this file).
inline BatchedOperand batch_operand(const at::Tensor& t, int64_t event_dims, const BatchLayout& layout,
                                    bool strided_samples = false) {
  if (batch_is_broadcast(t, event_dims)) {
    at::Tensor event = t;
    while (event.dim() > event_dims) {
      event = event.select(0, 0);
    }
    int64_t input_batch_numel = 1;
    for (int64_t s : batch_sizes(t, event_dims)) {
      input_batch_numel *= s;
    }
    return {event.contiguous(), 0, input_batch_numel == 1};
  }
  int64_t event_numel = 1;
  std::vector<int64_t> flat_shape{layout.batch_numel};
  for (int64_t d = t.dim() - event_dims; d < t.dim(); ++d) {
    event_numel *= t.size(d);
    flat_shape.push_back(t.size(d));
  }
  std::vector<int64_t> full_shape(layout.batch_shape);
  for (int64_t d = t.dim() - event_dims; d < t.dim(); ++d) {
    full_shape.push_back(t.size(d));
  }
  const at::Tensor full = t.expand(full_shape);
  if (strided_samples) {
    const int64_t stride = uniform_sample_stride(full, event_dims);
    if (stride > 0) return {full, stride, false};
  }
  return {full.contiguous().view(flat_shape), event_numel, false};
}

/// Gradient with the shape of `input`, from what a kernel wrote for its operand: the
/// event summed over the batch when the operand reduces its gradient, (B, *event) otherwise.
inline at::Tensor gradient_for(const at::Tensor& kernel_grad, const at::Tensor& input,
                               const BatchedOperand& operand, const BatchLayout& layout) {
  if (operand.reduces_gradient) {
    return kernel_grad.view(input.sizes());
  }
  std::vector<int64_t> full_shape(layout.batch_shape);
  for (int64_t d = 1; d < kernel_grad.dim(); ++d) {
    full_shape.push_back(kernel_grad.size(d));
  }
  at::Tensor full = kernel_grad.view(full_shape);
  if (full.sizes() == input.sizes()) {
    return full;
  }
  return at::sum_to(full, input.sizes());
}

}  // namespace fusedgauss
