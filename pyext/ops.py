"""The op surface: the one door to every fusedgauss op, whatever the backend.

Each public function checks its arguments (:mod:`fusedgauss.validation`), asks
:mod:`fusedgauss.backends` which implementation runs, and calls the compiled custom op
``torch.ops.fusedgauss.<op>`` (cpu, cuda), the Triton op ``torch.ops.fusedgauss_triton.<op>``
(:mod:`fusedgauss.triton_ops`, imported on first use) or the plain-PyTorch reference. This
module also attaches to each compiled op its fake (meta) implementation, so ``torch.compile``
traces through it, and to each Triton op its autograd formula, which calls the op's explicit
backward op. The compiled ops have the same formulas in C++ (csrc/autograd/autograd.cpp),
where they cost no Python per call.

Higher-order gradients: the backward kernels are first-order, so a backward pass that builds
a graph (``create_graph=True``) gets each fused op's input gradients from
:func:`differentiable_backward`, which differentiates the op's plain-PyTorch formulas
(:mod:`fusedgauss.reference`); every other backward pass runs the fused backward op.
Differentiating a backward op called directly raises an error that says so.
"""

from __future__ import annotations

import torch

from . import backends, reference, validation


def _implementation(name: str, like: torch.Tensor, event_size: int | None = None, backend: str | None = None):
    """The function that runs op `name` for inputs like `like` (device, and event size unless
    given: an elementwise op has none that limits a backend) on `backend`, or on the backend
    chosen for them."""
    if backend is None:
        backend = backends.select(like.device.type, like.shape[-1] if event_size is None else event_size, name)
    if backend == "torch":
        return getattr(reference, name)
    if backend == "triton":
        from . import triton_ops  # noqa: F401  (importing it registers the ops; it imports triton)

        return getattr(torch.ops.fusedgauss_triton, name)
    return getattr(torch.ops.fusedgauss, name)


#: Below this many entries, torch's own normal_ draws a sample's noise: the compiled op's call
#: costs about what it saves (two threads, AVX2: 1024 entries take 7.7 us by torch, 5.1 by the
#: op; 256 take 2.4 and 3.3).
NOISE_OP_MIN_NUMEL = 1024


def standard_normal(
    shape, *, dtype: torch.dtype | None = None, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Standard-normal noise of ``shape``, for a sample: the numbers of ``torch.empty(shape,
    dtype=dtype, device=device).normal_(generator=generator)``, from the same generator state,
    which it leaves where torch does, so that a seed gives PyTorch's samples.

    On the CPU the compiled ``standard_normal_`` draws them, on a Zen 4 core 2.8x as fast on
    one thread (3.5-3.9x with AVX-512) and 5-6x on two (the generator's words a state at a
    time, each thread from its own copy of the state; see csrc/cpu/standard_normal_cpu.cpp).
    On other devices, for small tensors, under ``torch.compile`` (whose own generator replaces
    torch's), under a torch.func transform (whose ``vmap`` decides what randomness means) and
    without the compiled extension, torch draws them.
    """
    noise = torch.empty(shape, dtype=dtype, device=device)
    if (noise.device.type == "cpu" and noise.numel() >= NOISE_OP_MIN_NUMEL and backends.EXTENSION_LOADED
            and not torch.compiler.is_compiling() and not backends.under_function_transform()):
        torch.ops.fusedgauss.standard_normal_(noise, generator)
        return noise
    return noise.normal_(generator=generator)


def _with_log_det(outputs: tuple[torch.Tensor, torch.Tensor], return_log_det: bool):
    """A log-prob op's (log_prob, log_det), or its log_prob alone."""
    return outputs if return_log_det else outputs[0]


def mvn_tril_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, *, return_log_det: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log N(value; loc, scale_tril scale_trilᵀ), batched.

    value (*, k), loc (*, k) and scale_tril (*, k, k) broadcast over their batch
    dimensions; scale_tril is read through its lower triangle. With z = L⁻¹(value - loc):
    ``log p = -½‖z‖² - Σᵢ log Lᵢᵢ - (k/2) log 2π``.

    With ``return_log_det``, also ``Σᵢ log Lᵢᵢ`` per sample (shaped like the log-prob), which
    the kernel computes anyway: an entropy from it costs no pass of its own, and its gradient
    joins the log-prob's in the one backward pass (:class:`MultivariateNormal` keeps it for
    :meth:`~MultivariateNormal.entropy`).
    """
    value, loc, scale_tril = validation.mvn_operands(
        "mvn_tril_log_prob", value, loc, scale_tril, "scale_tril"
    )
    return _with_log_det(_implementation("mvn_tril_log_prob", value)(value, loc, scale_tril), return_log_det)


def mvn_cov_log_prob(value: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    r"""log N(value; loc, covariance), batched, factorising each covariance inside the kernel.

    The Cholesky factor is never written to memory. A covariance that is not
    positive-definite gives NaN for its own samples.
    """
    value, loc, covariance = validation.mvn_operands(
        "mvn_cov_log_prob", value, loc, covariance, "covariance"
    )
    return _implementation("mvn_cov_log_prob", value)(value, loc, covariance)


def cholesky(A: torch.Tensor) -> torch.Tensor:
    r"""Lower Cholesky factor L of each matrix in A (*, k, k), with A = L Lᵀ.

    Reads the lower triangle of A. A matrix that is not positive-definite gives a NaN factor,
    without synchronising; check with ``torch.isnan`` where that matters. The gradient is
    symmetric, as torch.linalg.cholesky's.
    """
    A = validation.square_matrices("cholesky", "A", A)
    return _implementation("cholesky", A)(A)


def diag_normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""Σᵢ log N(valueᵢ; locᵢ, scaleᵢ²): a Gaussian with diagonal covariance, as
    ``Independent(Normal(loc, scale), 1).log_prob``. value, loc and scale (*, k) broadcast
    over their batch dimensions."""
    value, loc, scale = validation.rows_operands(
        "diag_normal_log_prob", {"value": value, "loc": loc, "scale": scale}
    )
    return _implementation("diag_normal_log_prob", value)(value, loc, scale)


def tanh_log_abs_det_jacobian(u: torch.Tensor) -> torch.Tensor:
    r"""log|d tanh(u)/du| = log(1 - tanh(u)²) = 2(log 2 - u - softplus(-2u)), elementwise,
    finite for every u (it is about -2|u| where tanh(u) rounds to ±1)."""
    u = validation.single_operand("tanh_log_abs_det_jacobian", "u", u)
    return _implementation("tanh_log_abs_det_jacobian", u, event_size=1)(u)


def squashed_diag_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, value_is_pre_tanh: bool
) -> torch.Tensor:
    r"""log-prob of the action a = tanh(u) with u ~ N(loc, diag(scale)²), in one pass:
    ``Σᵢ log N(uᵢ; locᵢ, scaleᵢ²) - Σᵢ log(1 - tanh(uᵢ)²)``.

    With ``value_is_pre_tanh`` the value is u itself (the policy-gradient path: no atanh).
    Otherwise it is the action, and u = atanh(clamp(a, -1 + ε, 1 - ε)) with ε the epsilon of
    the action's dtype, so an action that rounded to ±1 gives a finite log-prob.
    """
    value, loc, scale = validation.rows_operands(
        "squashed_diag_log_prob", {"value": value, "loc": loc, "scale": scale}
    )
    return _implementation("squashed_diag_log_prob", value)(value, loc, scale, bool(value_is_pre_tanh))


def squashed_tril_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, value_is_pre_tanh: bool, *,
    return_log_det: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""log-prob of a = tanh(u) with u ~ N(loc, L Lᵀ), in one pass: the full-covariance
    log-prob of u minus ``Σᵢ log(1 - tanh(uᵢ)²)``; u as in :func:`squashed_diag_log_prob`
    (``return_log_det`` as in :func:`mvn_tril_log_prob`: the base Gaussian's ``Σᵢ log Lᵢᵢ``)."""
    value, loc, scale_tril = validation.mvn_operands(
        "squashed_tril_log_prob", value, loc, scale_tril, "scale_tril"
    )
    outputs = _implementation("squashed_tril_log_prob", value)(value, loc, scale_tril, bool(value_is_pre_tanh))
    return _with_log_det(outputs, return_log_det)


def squashed_diag_rsample_log_prob(
    loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""A reparameterised squashed sample from standard-normal noise eps (*, k), in one pass:
    ``u = loc + scale·eps``, returns ``(tanh(u), u, log_prob)`` with
    ``log_prob = Σᵢ [-½ epsᵢ² - log scaleᵢ - ½ log 2π - log(1 - tanh(uᵢ)²)]``.

    No division and no atanh: the Gaussian part is exact at (u - loc)/scale = eps, and the
    gradients are the total derivatives through u (SAC's actor and entropy terms).
    """
    loc, scale, eps = validation.rows_operands(
        "squashed_diag_rsample_log_prob", {"loc": loc, "scale": scale, "eps": eps}
    )
    return _implementation("squashed_diag_rsample_log_prob", loc)(loc, scale, eps)


def squashed_tril_rsample_log_prob(
    loc: torch.Tensor, scale_tril: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""As :func:`squashed_diag_rsample_log_prob` with ``u = loc + L eps``: the Gaussian part is
    ``-½‖eps‖² - Σᵢ log Lᵢᵢ - (k/2) log 2π``, with no triangular solve."""
    eps, loc, scale_tril = validation.mvn_operands(
        "squashed_tril_rsample_log_prob", eps, loc, scale_tril, "scale_tril", value_name="eps"
    )
    return _implementation("squashed_tril_rsample_log_prob", loc)(loc, scale_tril, eps)


def packed_to_scale_tril(
    packed: torch.Tensor, diag_transform: str = "softplus", min_diag: float = 0.0
) -> torch.Tensor:
    r"""A policy head's scale_tril from its flat output: packed (*, k(k+1)/2), the lower
    triangle row by row as ``torch.tril_indices(k, k)`` lists it, into L (*, k, k) with zeros
    above the diagonal and ``Lᵢᵢ = diag_transform(xᵢᵢ) + min_diag``, where diag_transform is
    ``"softplus"`` (log(1 + eˣ)), ``"exp"`` or ``"none"``. One pass each way, in place of the
    zeros, index assignment, softplus and tril of a plain-PyTorch head.
    """
    validation.packed_scale_tril("packed_to_scale_tril", packed, diag_transform, min_diag)
    return _implementation("packed_to_scale_tril", packed, event_size=1)(packed, diag_transform, float(min_diag))


def packed_scale_tril_log_det(
    packed: torch.Tensor, diag_transform: str = "softplus", min_diag: float = 0.0
) -> torch.Tensor:
    r"""``Σᵢ log Lᵢᵢ`` (*,) of ``L = packed_to_scale_tril(packed, diag_transform, min_diag)``:
    half the log-determinant of the covariance L Lᵀ, from the k diagonal entries alone (L is
    never built), in one pass each way. The entropy of a packed Gaussian is
    ``½k(1 + log 2π)`` plus this."""
    validation.packed_scale_tril("packed_scale_tril_log_det", packed, diag_transform, min_diag)
    return _implementation("packed_scale_tril_log_det", packed, event_size=1)(packed, diag_transform, float(min_diag))


def packed_head_log_prob(
    value: torch.Tensor, head: torch.Tensor, diag_transform: str = "softplus", min_diag: float = 0.0, *,
    squashed: bool = False, value_is_pre_tanh: bool = False, return_log_det: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r""":func:`mvn_packed_log_prob` (with ``squashed``, :func:`squashed_packed_log_prob`) of
    loc and packed read from a policy head's whole output: head (*, k + k(k+1)/2) holds
    ``[loc | packed]`` in each row, as one linear layer outputs them, k being value's event size.
    The numbers of those ops on ``head.split([k, k(k+1)/2], -1)``; the compiled op
    (``packed_head_log_prob``) hands the head its gradient in one tensor that the kernel
    writes, where a split's backward copies the two parts' gradients into a new one.

    The compiled op runs where value and head have one batch shape and dtype; otherwise (a
    head shared by the batch, say), and on the Triton and torch backends, the head is split
    and the packed op runs on its parts, with the same numbers and gradients.
    """
    op = "squashed_packed_log_prob" if squashed else "mvn_packed_log_prob"
    k = value.shape[-1] if value.dim() >= 1 else 0
    if head.dim() < 1 or head.shape[-1] != k + k * (k + 1) // 2:
        raise ValueError(
            f"packed_head_log_prob: head must hold k + k(k+1)/2 values per sample for value's event size k, "
            f"got value {tuple(value.shape)} and head {tuple(head.shape)}"
        )
    if (
        validation.usual_packed_head(value, head, diag_transform, min_diag)
        and backends.EXTENSION_LOADED
        and _implementation(op, value) is getattr(torch.ops.fusedgauss, op)
    ):
        outputs = torch.ops.fusedgauss.packed_head_log_prob.default(
            value, head, diag_transform, float(min_diag), bool(squashed), bool(value_is_pre_tanh))
        return _with_log_det(outputs, return_log_det)
    loc, packed = reference.split_head(head, k)
    flags = (bool(value_is_pre_tanh),) if squashed else ()
    return _packed_log_prob(op, value, loc, packed, diag_transform, min_diag, *flags, return_log_det=return_log_det)


def _packed_log_prob(op: str, value, loc, packed, diag_transform, min_diag, *flags, return_log_det: bool):
    value, loc, packed = validation.packed_mvn_operands(op, value, loc, packed, diag_transform, min_diag)
    return _with_log_det(_implementation(op, value)(value, loc, packed, diag_transform, float(min_diag), *flags),
                         return_log_det)


def mvn_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str = "softplus",
    min_diag: float = 0.0, *, return_log_det: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r""":func:`mvn_tril_log_prob` with ``scale_tril = packed_to_scale_tril(packed, diag_transform,
    min_diag)``, reading the k(k+1)/2 packed values per sample directly: L is unpacked inside the
    kernel, never written to memory, and the gradient comes back to ``packed``. A packed
    operand shared by the batch (a state-independent factor) has its gradient reduced in the
    kernel. ``return_log_det`` as in :func:`mvn_tril_log_prob`."""
    return _packed_log_prob("mvn_packed_log_prob", value, loc, packed, diag_transform, min_diag,
                            return_log_det=return_log_det)


def squashed_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float,
    value_is_pre_tanh: bool, *, return_log_det: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r""":func:`squashed_tril_log_prob` with the scale_tril packed, as :func:`mvn_packed_log_prob`
    (``return_log_det`` too: the base Gaussian's ``Σᵢ log Lᵢᵢ``)."""
    return _packed_log_prob(
        "squashed_packed_log_prob", value, loc, packed, diag_transform, min_diag, bool(value_is_pre_tanh),
        return_log_det=return_log_det,
    )


# --- registration of the compiled ops: fake implementations and autograd --------------------


def _fake_log_prob(parameter_dims: int):
    """The fake of a log-prob op whose third operand has `parameter_dims` event dimensions
    (2: a matrix, 1: a diagonal scale)."""

    def fake(value: torch.Tensor, loc: torch.Tensor, parameter: torch.Tensor, *flags) -> torch.Tensor:
        batch = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], parameter.shape[:-parameter_dims])
        return value.new_empty(batch)

    return fake


def _fake_log_prob_and_log_det(parameter_dims: int):
    """The fake of a log-prob op that also returns log_det: both batch-shaped."""

    def fake(value: torch.Tensor, loc: torch.Tensor, parameter: torch.Tensor, *flags):
        log_prob = _fake_log_prob(parameter_dims)(value, loc, parameter)
        return log_prob, torch.empty_like(log_prob)

    return fake


def _fake_gradients(*inputs_then_mask) -> tuple[torch.Tensor, ...]:
    """The fake of a backward op: gradients shaped like its tensor inputs, empty where the mask
    (its last argument) is false."""
    *tensors, output_mask = inputs_then_mask
    return tuple(t.new_empty(t.shape) if wanted else t.new_empty((0,)) for t, wanted in zip(tensors, output_mask))


def _fake_rsample(parameter_dims: int):
    def fake(loc: torch.Tensor, parameter: torch.Tensor, eps: torch.Tensor):
        batch = torch.broadcast_shapes(loc.shape[:-1], parameter.shape[:-parameter_dims], eps.shape[:-1])
        rows = batch + loc.shape[-1:]
        return loc.new_empty(rows), loc.new_empty(rows), loc.new_empty(batch)

    return fake


def _fake_packed_to_scale_tril(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    k = reference.event_size_of_packed(packed.shape[-1])
    return packed.new_empty(packed.shape[:-1] + (k, k))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _save_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _cholesky_autograd(backward_op):
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        return backward_op(grad, L)

    return backward


def differentiable_backward(op: str, saved, grads, needs_input_grad, others) -> list[torch.Tensor | None]:
    r"""The gradients of op's tensor inputs for a backward pass that builds a graph
    (``create_graph=True``: a Hessian-vector product, TRPO's Fisher-vector product, a gradient
    penalty), as tensors autograd can differentiate again. The fused backward kernels are
    first-order, so the op is recomputed from its saved inputs with its plain-PyTorch formulas
    (:mod:`fusedgauss.reference`, the "torch" backend) and autograd differentiates those: that
    backward pass gets the torch backend's numbers at its speed, and every other one the fused
    backward op.

    ``saved`` are the op's tensor inputs (``cholesky``: its output L, which the input A = L Lᵀ
    is rebuilt from, so that the second derivative reaches A through the fused Cholesky's own
    gradient), ``grads`` the upstream gradients of its outputs (None: unused), ``others`` its
    other arguments in order. Returns one gradient per saved tensor, None where
    ``needs_input_grad`` is false."""
    inputs = [saved[0] @ saved[0].mT] if op == "cholesky" else list(saved)
    with torch.enable_grad():
        outputs = getattr(reference, op)(*inputs, *others)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        used = [(output, grad) for output, grad in zip(outputs, grads) if grad is not None]
        wanted = [t for t, needed in zip(inputs, needs_input_grad) if needed]
        gradients = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used],
                                             create_graph=True, materialize_grads=True))
    return [next(gradients) if needed else None for needed in needs_input_grad]


def _differentiable_backward_kernel(op, saved, grads, needs_input_grad, strings, floats, bools):
    """``fusedgauss::differentiable_backward`` (schema in csrc/ops.cpp), which the compiled ops'
    C++ autograd calls in a backward pass that builds a graph: :func:`differentiable_backward`,
    the op's other arguments passed by type (every op takes its strings, then its floats, then
    its bools), an empty tensor where no gradient was asked for."""
    gradients = differentiable_backward(op, saved, grads, needs_input_grad, (*strings, *floats, *bools))
    return [g if g is not None else t.new_empty((0,)) for g, t in zip(gradients, saved)]


def _with_higher_order(name: str, first_order):
    """A Triton op's autograd formula: `first_order` (its backward op), except in a backward
    pass that builds a graph, where :func:`differentiable_backward` gives the gradients of the
    saved tensors (the op's tensor inputs, or cholesky's output) and ctx.flags are the op's
    other arguments."""

    def backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return first_order(ctx, *grads)
        saved = ctx.saved_tensors
        gradients = differentiable_backward(name, saved, grads, ctx.needs_input_grad[:len(saved)],
                                            getattr(ctx, "flags", ()))
        return (*gradients, *(None for _ in ctx.needs_input_grad[len(saved):]))

    return backward


def _no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fusedgauss: the second derivative through {op_name} is not implemented; "
            'use fusedgauss.backends.use("torch") for higher-order gradients'
        )

    return backward


def _rsample_autograd(backward_op):
    def backward(ctx, grad_action, grad_pre_tanh, grad_log_prob):
        mask = list(ctx.needs_input_grad)
        grads = backward_op(grad_action, grad_pre_tanh, grad_log_prob, *ctx.saved_tensors, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    return backward


def _packed_to_scale_tril_autograd(backward_op):
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return backward_op(grad, packed, ctx.flags[0]), None, None

    return backward


def _packed_scale_tril_log_det_autograd(backward_op):
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return backward_op(grad, packed, *ctx.flags), None, None

    return backward


def _save_packed(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])
    ctx.flags = inputs[1:]  # diag_transform, min_diag


def _log_prob_autograd(backward_op):
    """The gradient of a log-prob op: its backward op takes the upstream gradients of the op's
    outputs (the log-prob's, and log_det's where the op returns one), then the op's three
    tensors, its other arguments and the mask."""

    def backward(ctx, *output_grads):
        mask = list(ctx.needs_input_grad[:3])
        grads = backward_op(*output_grads, *ctx.saved_tensors, *ctx.flags, mask)
        return (*(g if wanted else None for g, wanted in zip(grads, mask)), *(None for _ in ctx.flags))

    return backward


def _save_inputs_and_flags(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.flags = inputs[3:]  # the op's other arguments: diag_transform, min_diag, value_is_pre_tanh


def _tanh_log_abs_det_jacobian_autograd(backward_op):
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return backward_op(grad, u)

    return backward


#: Each op's backward op, by the kind of autograd formula that calls it.
_LOG_PROB_OPS = ("mvn_cov_log_prob", "diag_normal_log_prob", "squashed_diag_log_prob")
_RSAMPLE_OPS = ("squashed_diag_rsample_log_prob", "squashed_tril_rsample_log_prob")
#: The log-prob ops that also return log_det (Σᵢ log Lᵢᵢ): those whose factor is given.
LOG_DET_LOG_PROB_OPS = ("mvn_tril_log_prob", "squashed_tril_log_prob", "mvn_packed_log_prob",
                        "squashed_packed_log_prob")
OPS = (
    *_LOG_PROB_OPS, *_RSAMPLE_OPS, *LOG_DET_LOG_PROB_OPS, "tanh_log_abs_det_jacobian",
    "cholesky", "packed_to_scale_tril", "packed_scale_tril_log_det",
)


def register_autograd(namespace: str) -> None:
    """Attaches autograd to the ops of `namespace` (the Triton ones; the compiled ops have theirs
    in C++): each forward op's gradient is its backward op (differentiable_backward where the
    backward pass builds a graph), whose own gradient raises."""
    ops = getattr(torch.ops, namespace)
    names = [name for name in OPS if hasattr(ops, name)]
    formulas = {
        **{name: (_log_prob_autograd, _save_inputs_and_flags) for name in (*_LOG_PROB_OPS, *LOG_DET_LOG_PROB_OPS)},
        **{name: (_rsample_autograd, _save_inputs) for name in _RSAMPLE_OPS},
        "tanh_log_abs_det_jacobian": (_tanh_log_abs_det_jacobian_autograd, _save_inputs),
        "cholesky": (_cholesky_autograd, _save_output),
        "packed_to_scale_tril": (_packed_to_scale_tril_autograd, _save_packed),
        "packed_scale_tril_log_det": (_packed_scale_tril_log_det_autograd, _save_packed),
    }
    for name in names:
        formula, setup_context = formulas[name]
        backward_op = getattr(ops, name + "_backward").default
        torch.library.register_autograd(f"{namespace}::{name}", _with_higher_order(name, formula(backward_op)),
                                        setup_context=setup_context)
        torch.library.register_autograd(
            f"{namespace}::{name}_backward",
            _no_double_backward(name + "_backward"),
            setup_context=lambda ctx, inputs, output: None,
        )


#: Event dimensions of each op's parameter operand (its third input; second for rsample ops).
_PARAMETER_DIMS = {
    "mvn_tril_log_prob": 2,
    "mvn_cov_log_prob": 2,
    "diag_normal_log_prob": 1,
    "squashed_diag_log_prob": 1,
    "squashed_tril_log_prob": 2,
    "squashed_diag_rsample_log_prob": 1,
    "squashed_tril_rsample_log_prob": 2,
    "mvn_packed_log_prob": 1,
    "squashed_packed_log_prob": 1,
}


def _register_compiled() -> None:
    lib = "fusedgauss::"
    for name in _LOG_PROB_OPS:
        torch.library.register_fake(lib + name, _fake_log_prob(_PARAMETER_DIMS[name]))
        torch.library.register_fake(
            lib + name + "_backward", lambda grad, value, loc, parameter, *rest: _fake_gradients(value, loc, parameter, rest[-1])
        )
    for name in LOG_DET_LOG_PROB_OPS:
        torch.library.register_fake(lib + name, _fake_log_prob_and_log_det(_PARAMETER_DIMS[name]))
        torch.library.register_fake(
            lib + name + "_backward",
            lambda grad, grad_log_det, value, loc, parameter, *rest: _fake_gradients(value, loc, parameter, rest[-1]),
        )
    for name in _RSAMPLE_OPS:
        torch.library.register_fake(lib + name, _fake_rsample(_PARAMETER_DIMS[name]))
        torch.library.register_fake(lib + name + "_backward", lambda ga, gu, glp, *inputs: _fake_gradients(*inputs))
    torch.library.register_fake(lib + "standard_normal_", lambda noise, generator=None: None)
    torch.library.register_fake(lib + "tanh_log_abs_det_jacobian", lambda u: torch.empty_like(u))
    torch.library.register_fake(lib + "tanh_log_abs_det_jacobian_backward", lambda grad, u: torch.empty_like(u))
    torch.library.register_fake(lib + "cholesky", lambda A: torch.empty_like(A))
    torch.library.register_fake(lib + "cholesky_backward", lambda grad, L: torch.empty_like(L))
    torch.library.register_fake(lib + "packed_to_scale_tril", _fake_packed_to_scale_tril)
    torch.library.register_fake(lib + "packed_to_scale_tril_backward", lambda grad, packed, transform: torch.empty_like(packed))
    torch.library.register_fake(lib + "packed_scale_tril_log_det", lambda packed, *flags: packed.new_empty(packed.shape[:-1]))
    torch.library.register_fake(
        lib + "packed_scale_tril_log_det_backward", lambda grad, packed, *flags: torch.empty_like(packed)
    )
    torch.library.register_fake(
        lib + "packed_head_log_prob", lambda value, head, *flags: _fake_log_prob_and_log_det(1)(value, head, head)
    )
    torch.library.register_fake(
        lib + "packed_head_log_prob_backward",
        lambda grad, grad_log_det, value, head, *rest: _fake_gradients(value, head, rest[-1]),
    )


if backends.EXTENSION_LOADED:
    _register_compiled()
    _HIGHER_ORDER_LIBRARY = torch.library.Library("fusedgauss", "IMPL")
    _HIGHER_ORDER_LIBRARY.impl("differentiable_backward", _differentiable_backward_kernel, "CompositeImplicitAutograd")
