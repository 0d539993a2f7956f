// Autograd for the compiled ops, registered under the Autograd key: each forward op's gradient
// is its explicit backward op, and a backward op's own gradient raises.
//
// In C++ rather than through torch.library.register_autograd, because the Python formula
// costs tens of microseconds per op and per backward op (an autograd.Function, argument
// defaults filled in Python, a redispatch), which at a policy's minibatch sizes was most of
// the op's cost; and because libtorch callers (CMakeLists.txt) get gradients too. The Triton
// ops, which exist only in Python, get the same formulas from fusedgauss/ops.py.
//
// Every op saves its tensor inputs (cholesky: its output) and its other arguments, and asks
// its backward op only for the gradients autograd needs (output_mask). Gradients of unused
// outputs reach the backward op as absent (None), not as zeros. The backward kernels are
// first-order: a backward pass that builds a graph (create_graph=True, grad mode on inside
// it) takes its gradients from fusedgauss::differentiable_backward instead, which the Python
// package implements by differentiating the op's plain-PyTorch formulas.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fusedgauss {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// The dispatcher's handle of op fusedgauss::<name> with C++ signature Signature.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("fusedgauss::" + name).c_str(), "").typed<Signature>();
}

variable_list as_list(const Tensor& t) { return {t}; }

template <typename... Tensors>
variable_list as_list(const std::tuple<Tensors...>& outputs) {
  return std::apply([](const auto&... t) { return variable_list{t...}; }, outputs);
}

template <typename Return>
Return from_list(const variable_list& outputs) {
  if constexpr (std::is_same_v<Return, Tensor>) {
    return outputs[0];
  } else {
    return [&]<size_t... I>(std::index_sequence<I...>) { return Return{outputs[I]...}; }(
        std::make_index_sequence<std::tuple_size_v<Return>>{});
  }
}

/// How an argument other than a tensor is kept in the autograd context: a string by value.
template <typename T>
using Kept = std::conditional_t<std::is_same_v<std::decay_t<T>, c10::string_view>, std::string, std::decay_t<T>>;

/// The backward op's gradients for the saved tensors, undefined where output_mask was false,
/// then an undefined gradient for each of the forward op's other arguments.
template <size_t N>
variable_list input_gradients(variable_list gradients, const std::array<bool, N>& mask, size_t other_arguments) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) gradients[i] = Tensor();
  }
  gradients.resize(N + other_arguments);
  return gradients;
}

bool any_defined(const variable_list& grads) {
  return std::any_of(grads.begin(), grads.end(), [](const Tensor& g) { return g.defined(); });
}

/// The log-prob's upstream gradient, which the backward op takes as a Tensor (not Tensor?):
/// zeros where only log_det was used, shaped like its gradient (both are batch-shaped).
Tensor log_prob_gradient(const variable_list& grads) {
  return grads[0].defined() ? grads[0] : at::zeros_like(grads[1]);
}

std::optional<Tensor> optional_gradient(const Tensor& g) { return g.defined() ? std::optional<Tensor>(g) : std::nullopt; }

/// An op's arguments other than tensors, by type, each list in the op's order (every op takes
/// its strings, then its floats, then its bools).
struct OtherArguments {
  std::vector<std::string> strings;
  std::vector<double> floats;
  std::vector<bool> bools;

  void add(const std::string& s) { strings.push_back(s); }
  void add(double x) { floats.push_back(x); }
  void add(bool b) { bools.push_back(b); }

  template <typename... Kept>
  static OtherArguments of(const std::tuple<Kept...>& kept) {
    OtherArguments others;
    std::apply([&](const auto&... x) { (others.add(x), ...); }, kept);
    return others;
  }
};

/// The gradients of op `name`'s saved tensors (empty where `mask` is false) as tensors autograd
/// can differentiate again: fusedgauss::differentiable_backward, for a backward pass that
/// builds a graph. Its kernel comes with the Python package; without it, this raises.
template <size_t N>
variable_list differentiable_backward(const char* name, const variable_list& saved, const variable_list& grads,
                                      const std::array<bool, N>& mask, const OtherArguments& others) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedgauss::differentiable_backward", "");
  TORCH_CHECK_NOT_IMPLEMENTED(op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd),
                              "fusedgauss: the second derivative through ", name,
                              " differentiates its plain-PyTorch formulas, which come with the Python package "
                              "(import fusedgauss)");
  c10::List<std::optional<Tensor>> upstream;
  for (const Tensor& g : grads) upstream.push_back(g.defined() ? std::optional<Tensor>(g) : std::nullopt);
  torch::jit::Stack stack{std::string(name), saved, upstream, std::vector<bool>(mask.begin(), mask.end()),
                          others.strings, others.floats, others.bools};
  op.callBoxed(&stack);
  return stack[0].toTensorVector();
}

/// A log-prob op, log_prob(value, loc, parameter, other...) -> log_prob or (log_prob, log_det):
/// its backward op takes (grad[, grad_log_det], value, loc, parameter, other..., output_mask).
template <const char* kName, typename Return, typename... Other>
struct LogProbFunction : torch::autograd::Function<LogProbFunction<kName, Return, Other...>> {
  static constexpr bool kWithLogDet = !std::is_same_v<Return, Tensor>;
  using Forward = Return(const Tensor&, const Tensor&, const Tensor&, Other...);
  using Backward = std::conditional_t<
      kWithLogDet,
      std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                         const Tensor&, Other..., std::array<bool, 3>),
      std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Other...,
                                         std::array<bool, 3>)>;

  static variable_list forward(AutogradContext* ctx, const Tensor& value, const Tensor& loc, const Tensor& parameter,
                               Other... other) {
    static const auto op = find_op<Forward>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({value, loc, parameter});
    if constexpr (sizeof...(Other) > 0) ctx->saved_data["other"] = std::tuple<Kept<Other>...>(other...);
    return as_list(op.call(value, loc, parameter, other...));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(std::string(kName) + "_backward");
    if (!any_defined(grads)) return variable_list(3 + sizeof...(Other));
    const variable_list saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    const auto other = [&] {
      if constexpr (sizeof...(Other) > 0) {
        return ctx->saved_data["other"].to<std::tuple<Kept<Other>...>>();
      } else {
        return std::tuple<>();
      }
    }();
    if (at::GradMode::is_enabled()) {
      return input_gradients(differentiable_backward(kName, saved, grads, mask, OtherArguments::of(other)), mask,
                             sizeof...(Other));
    }
    const auto gradients = std::apply(
        [&](const auto&... kept) {
          if constexpr (kWithLogDet) {
            return op.call(log_prob_gradient(grads), optional_gradient(grads[1]), saved[0], saved[1], saved[2],
                           kept..., mask);
          } else {
            return op.call(grads[0], saved[0], saved[1], saved[2], kept..., mask);
          }
        },
        other);
    return input_gradients(as_list(gradients), mask, sizeof...(Other));
  }

  static Return autograd_kernel(const Tensor& value, const Tensor& loc, const Tensor& parameter, Other... other) {
    return from_list<Return>(LogProbFunction::apply(value, loc, parameter, other...));
  }
};

/// A reparameterised squashed sample, (loc, parameter, eps) -> (action, pre_tanh, log_prob):
/// its backward op takes the three outputs' gradients (each optional), the inputs and the mask.
template <const char* kName>
struct RsampleFunction : torch::autograd::Function<RsampleFunction<kName>> {
  using Return = std::tuple<Tensor, Tensor, Tensor>;
  using Forward = Return(const Tensor&, const Tensor&, const Tensor&);
  using Backward = Return(const std::optional<Tensor>&, const std::optional<Tensor>&, const std::optional<Tensor>&,
                          const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>);

  static variable_list forward(AutogradContext* ctx, const Tensor& loc, const Tensor& parameter, const Tensor& eps) {
    static const auto op = find_op<Forward>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({loc, parameter, eps});
    return as_list(op.call(loc, parameter, eps));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(std::string(kName) + "_backward");
    if (!any_defined(grads)) return variable_list(3);
    const variable_list saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    if (at::GradMode::is_enabled()) {
      return input_gradients(differentiable_backward(kName, saved, grads, mask, {}), mask, 0);
    }
    return input_gradients(as_list(op.call(optional_gradient(grads[0]), optional_gradient(grads[1]),
                                           optional_gradient(grads[2]), saved[0], saved[1], saved[2], mask)),
                           mask, 0);
  }

  static Return autograd_kernel(const Tensor& loc, const Tensor& parameter, const Tensor& eps) {
    return from_list<Return>(RsampleFunction::apply(loc, parameter, eps));
  }
};

/// packed_head_log_prob(value, head, diag_transform, min_diag, squashed, value_is_pre_tanh) ->
/// (log_prob, log_det): its backward op takes (grad, grad_log_det, value, head, the other
/// arguments, output_mask) and returns the gradients of value and head.
template <const char* kName>
struct PackedHeadFunction : torch::autograd::Function<PackedHeadFunction<kName>> {
  using Return = std::tuple<Tensor, Tensor>;
  using Others = std::tuple<std::string, double, bool, bool>;
  using Forward = Return(const Tensor&, const Tensor&, c10::string_view, double, bool, bool);
  using Backward = Return(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, c10::string_view,
                          double, bool, bool, std::array<bool, 2>);

  static variable_list forward(AutogradContext* ctx, const Tensor& value, const Tensor& head,
                               c10::string_view diag_transform, double min_diag, bool squashed,
                               bool value_is_pre_tanh) {
    static const auto op = find_op<Forward>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({value, head});
    ctx->saved_data["other"] = Others(std::string(diag_transform), min_diag, squashed, value_is_pre_tanh);
    return as_list(op.call(value, head, diag_transform, min_diag, squashed, value_is_pre_tanh));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(std::string(kName) + "_backward");
    if (!any_defined(grads)) return variable_list(6);
    const variable_list saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const auto others = ctx->saved_data["other"].to<Others>();
    if (at::GradMode::is_enabled()) {
      return input_gradients(differentiable_backward(kName, saved, grads, mask, OtherArguments::of(others)), mask, 4);
    }
    const auto [diag_transform, min_diag, squashed, value_is_pre_tanh] = others;
    return input_gradients(as_list(op.call(log_prob_gradient(grads), optional_gradient(grads[1]), saved[0], saved[1],
                                           diag_transform, min_diag, squashed, value_is_pre_tanh, mask)),
                           mask, 4);
  }

  static Return autograd_kernel(const Tensor& value, const Tensor& head, c10::string_view diag_transform,
                                double min_diag, bool squashed, bool value_is_pre_tanh) {
    return from_list<Return>(
        PackedHeadFunction::apply(value, head, diag_transform, min_diag, squashed, value_is_pre_tanh));
  }
};

/// An op of one tensor, op(x, other...) -> y, whose backward op takes (grad, saved, kept...):
/// `saved` is x, or y where kSavesOutput (cholesky's backward reads L), and `kept` the first
/// kKeptOthers of the other arguments (packed_to_scale_tril's backward needs no min_diag).
template <const char* kName, bool kSavesOutput, size_t kKeptOthers, typename... Other>
struct UnaryFunction : torch::autograd::Function<UnaryFunction<kName, kSavesOutput, kKeptOthers, Other...>> {
  using Forward = Tensor(const Tensor&, Other...);
  using KeptTuple = std::tuple<Kept<Other>...>;

  template <size_t... I>
  static auto backward_signature(std::index_sequence<I...>)
      -> Tensor (*)(const Tensor&, const Tensor&, std::tuple_element_t<I, std::tuple<Other...>>...);
  using Backward = std::remove_pointer_t<decltype(backward_signature(std::make_index_sequence<kKeptOthers>{}))>;

  static variable_list forward(AutogradContext* ctx, const Tensor& x, Other... other) {
    static const auto op = find_op<Forward>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    Tensor y = op.call(x, other...);
    ctx->save_for_backward({kSavesOutput ? y : x});
    if constexpr (sizeof...(Other) > 0) ctx->saved_data["other"] = KeptTuple(other...);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Backward>(std::string(kName) + "_backward");
    variable_list gradients(1 + sizeof...(Other));
    if (!grads[0].defined()) return gradients;
    const Tensor saved = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled()) {
      OtherArguments others;
      if constexpr (sizeof...(Other) > 0) others = OtherArguments::of(ctx->saved_data["other"].to<KeptTuple>());
      gradients[0] = differentiable_backward(kName, {saved}, grads, std::array<bool, 1>{true}, others)[0];
      return gradients;
    }
    gradients[0] = [&]<size_t... I>(std::index_sequence<I...>) {
      if constexpr (kKeptOthers == 0) {
        return op.call(grads[0], saved);
      } else {
        const auto other = ctx->saved_data["other"].to<KeptTuple>();
        return op.call(grads[0], saved, std::get<I>(other)...);
      }
    }(std::make_index_sequence<kKeptOthers>{});
    return gradients;
  }

  static Tensor autograd_kernel(const Tensor& x, Other... other) { return UnaryFunction::apply(x, other...)[0]; }
};

/// A backward op: it runs as it is, and differentiating through it raises.
template <const char* kName, typename Return, typename... Args>
struct FirstOrderOnly : torch::autograd::Function<FirstOrderOnly<kName, Return, Args...>> {
  static variable_list forward(AutogradContext*, Args... args) {
    static const auto op = find_op<Return(Args...)>(kName);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_list(op.call(args...));
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "fusedgauss: the second derivative through ", kName,
                                " is not implemented; use fusedgauss.backends.use(\"torch\") for higher-order "
                                "gradients");
  }

  static Return autograd_kernel(Args... args) { return from_list<Return>(FirstOrderOnly::apply(args...)); }
};

using Gradients3 = std::tuple<Tensor, Tensor, Tensor>;
using Mask = std::array<bool, 3>;
using OptionalTensor = const std::optional<Tensor>&;
using TensorRef = const Tensor&;

constexpr char kMvnTril[] = "mvn_tril_log_prob";
constexpr char kMvnTrilBackward[] = "mvn_tril_log_prob_backward";
constexpr char kMvnCov[] = "mvn_cov_log_prob";
constexpr char kMvnCovBackward[] = "mvn_cov_log_prob_backward";
constexpr char kMvnPacked[] = "mvn_packed_log_prob";
constexpr char kMvnPackedBackward[] = "mvn_packed_log_prob_backward";
constexpr char kDiag[] = "diag_normal_log_prob";
constexpr char kDiagBackward[] = "diag_normal_log_prob_backward";
constexpr char kSquashedDiag[] = "squashed_diag_log_prob";
constexpr char kSquashedDiagBackward[] = "squashed_diag_log_prob_backward";
constexpr char kSquashedTril[] = "squashed_tril_log_prob";
constexpr char kSquashedTrilBackward[] = "squashed_tril_log_prob_backward";
constexpr char kSquashedPacked[] = "squashed_packed_log_prob";
constexpr char kSquashedPackedBackward[] = "squashed_packed_log_prob_backward";
constexpr char kDiagRsample[] = "squashed_diag_rsample_log_prob";
constexpr char kDiagRsampleBackward[] = "squashed_diag_rsample_log_prob_backward";
constexpr char kTrilRsample[] = "squashed_tril_rsample_log_prob";
constexpr char kTrilRsampleBackward[] = "squashed_tril_rsample_log_prob_backward";
constexpr char kTanhJacobian[] = "tanh_log_abs_det_jacobian";
constexpr char kTanhJacobianBackward[] = "tanh_log_abs_det_jacobian_backward";
constexpr char kCholesky[] = "cholesky";
constexpr char kCholeskyBackward[] = "cholesky_backward";
constexpr char kPackedToScaleTril[] = "packed_to_scale_tril";
constexpr char kPackedToScaleTrilBackward[] = "packed_to_scale_tril_backward";
constexpr char kPackedLogDet[] = "packed_scale_tril_log_det";
constexpr char kPackedLogDetBackward[] = "packed_scale_tril_log_det_backward";
constexpr char kPackedHead[] = "packed_head_log_prob";
constexpr char kPackedHeadBackward[] = "packed_head_log_prob_backward";

using TensorPair = std::tuple<Tensor, Tensor>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedgauss, Autograd, m) {
  m.impl(kMvnTril, &LogProbFunction<kMvnTril, TensorPair>::autograd_kernel);
  m.impl(kMvnCov, &LogProbFunction<kMvnCov, Tensor>::autograd_kernel);
  m.impl(kMvnPacked, &LogProbFunction<kMvnPacked, TensorPair, c10::string_view, double>::autograd_kernel);
  m.impl(kDiag, &LogProbFunction<kDiag, Tensor>::autograd_kernel);
  m.impl(kSquashedDiag, &LogProbFunction<kSquashedDiag, Tensor, bool>::autograd_kernel);
  m.impl(kSquashedTril, &LogProbFunction<kSquashedTril, TensorPair, bool>::autograd_kernel);
  m.impl(kSquashedPacked, &LogProbFunction<kSquashedPacked, TensorPair, c10::string_view, double, bool>::autograd_kernel);
  m.impl(kDiagRsample, &RsampleFunction<kDiagRsample>::autograd_kernel);
  m.impl(kTrilRsample, &RsampleFunction<kTrilRsample>::autograd_kernel);
  m.impl(kTanhJacobian, &UnaryFunction<kTanhJacobian, false, 0>::autograd_kernel);
  m.impl(kCholesky, &UnaryFunction<kCholesky, true, 0>::autograd_kernel);
  m.impl(kPackedToScaleTril, &UnaryFunction<kPackedToScaleTril, false, 1, c10::string_view, double>::autograd_kernel);
  m.impl(kPackedLogDet, &UnaryFunction<kPackedLogDet, false, 2, c10::string_view, double>::autograd_kernel);
  m.impl(kPackedHead, &PackedHeadFunction<kPackedHead>::autograd_kernel);

  m.impl(kMvnTrilBackward,
         &FirstOrderOnly<kMvnTrilBackward, Gradients3, TensorRef, OptionalTensor, TensorRef, TensorRef, TensorRef,
                         Mask>::autograd_kernel);
  m.impl(kMvnCovBackward,
         &FirstOrderOnly<kMvnCovBackward, Gradients3, TensorRef, TensorRef, TensorRef, TensorRef, Mask>::autograd_kernel);
  m.impl(kMvnPackedBackward,
         &FirstOrderOnly<kMvnPackedBackward, Gradients3, TensorRef, OptionalTensor, TensorRef, TensorRef, TensorRef,
                         c10::string_view, double, Mask>::autograd_kernel);
  m.impl(kDiagBackward,
         &FirstOrderOnly<kDiagBackward, Gradients3, TensorRef, TensorRef, TensorRef, TensorRef, Mask>::autograd_kernel);
  m.impl(kSquashedDiagBackward, &FirstOrderOnly<kSquashedDiagBackward, Gradients3, TensorRef, TensorRef, TensorRef,
                                                TensorRef, bool, Mask>::autograd_kernel);
  m.impl(kSquashedTrilBackward, &FirstOrderOnly<kSquashedTrilBackward, Gradients3, TensorRef, OptionalTensor,
                                                TensorRef, TensorRef, TensorRef, bool, Mask>::autograd_kernel);
  m.impl(kSquashedPackedBackward,
         &FirstOrderOnly<kSquashedPackedBackward, Gradients3, TensorRef, OptionalTensor, TensorRef, TensorRef,
                         TensorRef, c10::string_view, double, bool, Mask>::autograd_kernel);
  m.impl(kDiagRsampleBackward, &FirstOrderOnly<kDiagRsampleBackward, Gradients3, OptionalTensor, OptionalTensor,
                                               OptionalTensor, TensorRef, TensorRef, TensorRef, Mask>::autograd_kernel);
  m.impl(kTrilRsampleBackward, &FirstOrderOnly<kTrilRsampleBackward, Gradients3, OptionalTensor, OptionalTensor,
                                               OptionalTensor, TensorRef, TensorRef, TensorRef, Mask>::autograd_kernel);
  m.impl(kTanhJacobianBackward, &FirstOrderOnly<kTanhJacobianBackward, Tensor, TensorRef, TensorRef>::autograd_kernel);
  m.impl(kCholeskyBackward, &FirstOrderOnly<kCholeskyBackward, Tensor, TensorRef, TensorRef>::autograd_kernel);
  m.impl(kPackedToScaleTrilBackward, &FirstOrderOnly<kPackedToScaleTrilBackward, Tensor, TensorRef, TensorRef,
                                                     c10::string_view>::autograd_kernel);
  m.impl(kPackedLogDetBackward, &FirstOrderOnly<kPackedLogDetBackward, Tensor, TensorRef, TensorRef,
                                                c10::string_view, double>::autograd_kernel);
  m.impl(kPackedHeadBackward,
         &FirstOrderOnly<kPackedHeadBackward, TensorPair, TensorRef, OptionalTensor, TensorRef, TensorRef,
                         c10::string_view, double, bool, bool, std::array<bool, 2>>::autograd_kernel);
}

}  // namespace fusedgauss
