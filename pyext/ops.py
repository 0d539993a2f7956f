"""The op surface: the one door to every fusedgauss op, whatever the backend.

Each public function checks its arguments (:mod:`fusedgauss.validation`), asks
:mod:`fusedgauss.backends` which implementation runs, and calls the compiled custom op
``torch.ops.fusedgauss.<op>`` (cpu, cuda), the Triton op ``torch.ops.fusedgauss_triton.<op>``
(:mod:`fusedgauss.triton_ops`, imported on first use) or the plain-PyTorch reference. This
module also attaches to each compiled op its fake (meta) implementation, so ``torch.compile``
traces through it, and to both kinds of op their autograd formula, which calls the op's
explicit backward op.

Second derivatives through the fused backward ops are not implemented: differentiating one
raises an error that says so (force the "torch" backend for higher-order gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends, reference, validation


def _implementation(name: str, like: torch.Tensor):
    """The function that runs op `name` for inputs like `like` (device, event size)."""
    backend = backends.select(like.device.type, like.shape[-1])
    if backend == "torch":
        return getattr(reference, name)
    if backend == "triton":
        from . import triton_ops  # noqa: F401  (importing it registers the ops; it imports triton)

        return getattr(torch.ops.fusedgauss_triton, name)
    return getattr(torch.ops.fusedgauss, name)


def mvn_tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    r"""log N(value; loc, scale_tril scale_trilᵀ), batched.

    value (*, k), loc (*, k) and scale_tril (*, k, k) broadcast over their batch
    dimensions; scale_tril is read through its lower triangle. With z = L⁻¹(value - loc):
    ``log p = -½‖z‖² - Σᵢ log Lᵢᵢ - (k/2) log 2π``.
    """
    value, loc, scale_tril = validation.mvn_operands(
        "mvn_tril_log_prob", value, loc, scale_tril, "scale_tril"
    )
    return _implementation("mvn_tril_log_prob", value)(value, loc, scale_tril)


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


# --- registration of the compiled ops: fake implementations and autograd --------------------


def _fake_mvn_log_prob(value: torch.Tensor, loc: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    batch = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], matrix.shape[:-2])
    return value.new_empty(batch)


def _fake_mvn_log_prob_backward(
    grad: torch.Tensor,
    value: torch.Tensor,
    loc: torch.Tensor,
    matrix: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(  # type: ignore[return-value]
        t.new_empty(t.shape) if wanted else t.new_empty((0,))
        for t, wanted in zip((value, loc, matrix), output_mask)
    )


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _mvn_log_prob_autograd(backward_op):
    def backward(ctx, grad):
        mask = list(ctx.needs_input_grad)
        grads = backward_op(grad, *ctx.saved_tensors, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask))

    return backward


def _save_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _cholesky_autograd(backward_op):
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        return backward_op(grad, L)

    return backward


def _no_double_backward(op_name: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"fusedgauss: the second derivative through {op_name} is not implemented; "
            'use fusedgauss.backends.use("torch") for higher-order gradients'
        )

    return backward


def register_autograd(namespace: str) -> None:
    """Attaches autograd to the ops of `namespace` (the compiled "fusedgauss" ops, or the
    Triton ones): each forward op's gradient is its backward op, whose own gradient raises."""
    ops = getattr(torch.ops, namespace)
    for name in ("mvn_tril_log_prob", "mvn_cov_log_prob"):
        backward_op = getattr(ops, name + "_backward").default
        torch.library.register_autograd(
            f"{namespace}::{name}", _mvn_log_prob_autograd(backward_op), setup_context=_save_inputs
        )
    torch.library.register_autograd(
        f"{namespace}::cholesky", _cholesky_autograd(ops.cholesky_backward.default), setup_context=_save_output
    )
    for name in ("mvn_tril_log_prob_backward", "mvn_cov_log_prob_backward", "cholesky_backward"):
        torch.library.register_autograd(
            f"{namespace}::{name}", _no_double_backward(name), setup_context=lambda ctx, inputs, output: None
        )


def _register_compiled() -> None:
    lib = "fusedgauss::"
    for name in ("mvn_tril_log_prob", "mvn_cov_log_prob"):
        torch.library.register_fake(lib + name, _fake_mvn_log_prob)
        torch.library.register_fake(lib + name + "_backward", _fake_mvn_log_prob_backward)
    torch.library.register_fake(lib + "cholesky", lambda A: torch.empty_like(A))
    torch.library.register_fake(lib + "cholesky_backward", lambda grad, L: torch.empty_like(L))
    register_autograd("fusedgauss")


if backends.EXTENSION_LOADED:
    _register_compiled()
