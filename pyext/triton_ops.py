"""The Triton backend: every op as a ``torch.library.triton_op`` in the namespace
``fusedgauss_triton``, so that ``torch.compile`` sees into the kernels, with the same autograd
as the compiled ops (:mod:`fusedgauss.ops`).

Each op also has a CPU kernel. With ``TRITON_INTERPRET=1`` (set before triton is imported) it
runs the Triton kernels on CPU tensors through Triton's interpreter, which is how the kernels
are tested without a GPU; otherwise it is the compiled CPU op. ``torch.compile`` and
``torch.library.opcheck`` of these ops need a GPU: under the interpreter, fake tensors have no
data for the kernels to touch.

The batch layout of the operands is the one of ``csrc/common/batching.h``: an operand whose
batch is broadcast is passed once, with stride 0, and one with a single batch element has its
gradient summed over the batch (per program in the kernel, then over programs here, in a fixed
order).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import backends, reference
from .triton_kernels import cholesky as cholesky_kernels
from .triton_kernels import mvn as mvn_kernels
from .triton_kernels import packed as packed_kernels
from .triton_kernels import squashed as squashed_kernels

NAMESPACE = "fusedgauss_triton"
#: Whether the kernels run through Triton's interpreter (TRITON_INTERPRET=1).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Largest event size of the kernels (a program holds a block of k x k tiles in registers).
MAX_EVENT_SIZE = 32


def _launchable(kernel):
    # wrap_triton makes the launch visible to torch.compile; the interpreter's kernels are not
    # JITFunctions, which it requires, and torch.compile cannot run under the interpreter.
    return kernel if INTERPRETING else wrap_triton(kernel)


def _tile(k: int, dtype: torch.dtype) -> dict:
    """Constexprs of a launch: the event size, its power-of-two padding KP, a block of samples
    holding about 4096 matrix entries (the interpreter, which pays per tile operation rather
    than per register, takes 64 samples at a time), and the accumulation type."""
    KP = triton.next_power_of_2(max(k, 1))
    return {
        "K": k,
        "KP": KP,
        "BLOCK": 64 if INTERPRETING else max(1, min(128, 4096 // (KP * KP))),
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _check_event_size(op: str, k: int) -> None:
    if k > MAX_EVENT_SIZE:
        raise ValueError(
            f"{op}: the Triton kernels handle event sizes up to {MAX_EVENT_SIZE}, got {k} "
            "(the torch backend handles any)"
        )


@dataclass
class _Operand:
    data: torch.Tensor  # (*event) when shared, (B, *event) contiguous otherwise
    stride: int  # elements between samples; 0 when shared
    reduces: bool  # a single batch element: its gradient is summed over the batch


def _operand(t: torch.Tensor, event_dims: int, batch_shape: torch.Size, n: int) -> _Operand:
    batch_dims = t.dim() - event_dims
    event = t.shape[batch_dims:]
    # Shared: the batch holds one event. An empty one holds none, even expanded (stride 0).
    if all(size == 1 or (stride == 0 and size > 0) for size, stride in zip(t.shape[:batch_dims],
                                                                          t.stride()[:batch_dims])):
        return _Operand(t[(0,) * batch_dims].contiguous(), 0, math.prod(t.shape[:batch_dims]) == 1)
    full = t.expand(*batch_shape, *event).contiguous().view(n, *event)
    return _Operand(full, math.prod(event), False)


def _layout(value, loc, matrix, matrix_dims: int = 2):
    """Batch shape, batch size and operands of a log-prob's value, loc and matrix (event
    dimensions: 2, or 1 for a packed factor)."""
    batch_shape = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], matrix.shape[: matrix.dim() - matrix_dims])
    n = math.prod(batch_shape)
    operands = (
        _operand(value, 1, batch_shape, n), _operand(loc, 1, batch_shape, n),
        _operand(matrix, matrix_dims, batch_shape, n),
    )
    return batch_shape, n, operands


def _gradient_for(grad: torch.Tensor, t: torch.Tensor, operand: _Operand, batch_shape) -> torch.Tensor:
    if operand.reduces:
        return grad.view(t.shape)
    full = grad.view(*batch_shape, *grad.shape[1:])
    return full if full.shape == t.shape else full.sum_to_size(t.shape)


#: DIAG of the packed kernels, by diag_transform.
_DIAG_TRANSFORMS = {"none": 0, "softplus": 1, "exp": 2}


@dataclass
class _Packing:
    """How a packed factor becomes L (packed_to_scale_tril's arguments)."""

    diag_transform: str
    min_diag: float


def _packing_arguments(packing: _Packing | None) -> tuple[tuple, dict]:
    """What a log-prob kernel takes for its matrix operand beyond the scale_tril ones: the
    packed kernels' min_diag (after the batch size) and DIAG; nothing for the others."""
    if packing is None:
        return (), {}
    return (packing.min_diag,), {"DIAG": _DIAG_TRANSFORMS[packing.diag_transform]}


def _log_prob_forward(kernel, value, loc, matrix, op: str, packing: _Packing | None = None,
                      with_log_det: bool = False, **constexprs):
    """The log-prob, and for a given factor (`with_log_det`: scale_tril, packed) also
    (log_prob, log_det): their kernels store sum_i log L_ii beside the log-prob."""
    k = value.shape[-1]
    _check_event_size(op, k)
    batch_shape, n, (v, m, M) = _layout(value, loc, matrix, 1 if packing else 2)
    out = value.new_empty(batch_shape)
    log_det = (value.new_empty(batch_shape),) if with_log_det else ()
    if n > 0:
        tile = _tile(k, value.dtype)
        grid = (triton.cdiv(n, tile["BLOCK"]),)
        scalars, packed_constexprs = _packing_arguments(packing)
        _launchable(kernel)[grid](
            v.data, v.stride, m.data, m.stride, M.data, M.stride, out, *log_det, n, *scalars,
            **packed_constexprs, **constexprs, **tile,
        )
    return (out, *log_det) if with_log_det else out


def _squash_constexprs(squash: int, dtype: torch.dtype) -> dict:
    """SQUASH (0: none, 1: from the pre-tanh value, 2: from the action) and the action's clamp
    EPS, the epsilon of its dtype; the squashed kernels take them as constexprs."""
    return {"SQUASH": squash, "EPS": torch.finfo(dtype).eps} if squash else {}


def _shared_value_gradient(x, minus_sum_gw, grad_sum, squash: int, eps: float = 0.0):
    """The gradient of a value shared by the batch, from the sums of -g w and g: itself
    unsquashed; squashed, (-sum g w + (sum g) 2 tanh(u)) [/ (1 - x^2) inside the clamp, for an
    action], u the value's pre-tanh value (the same for every sample)."""
    if not squash:
        return minus_sum_gw
    x = x.to(minus_sum_gw.dtype)
    u = x if squash == 1 else reference.atanh_clamped(x, eps)
    d_u = minus_sum_gw + grad_sum * 2 * torch.tanh(u)
    if squash == 1:
        return d_u
    inside = (x >= -1 + eps) & (x <= 1 - eps)
    return torch.where(inside, d_u / ((1 - x) * (1 + x)), 0.0)


def _reduced_matrix_gradient(outer, grad_sum, matrix, covariance: bool):
    """The gradient of a shared matrix from the batch sums of its per-sample terms:
    scale_tril: tril(outer) - (sum g) diag(1/L_ii); covariance: 1/2 (outer - (sum g) Sigma^{-1})."""
    if not covariance:
        return outer.tril() - torch.diag(grad_sum / matrix.diagonal())
    L = _cholesky(matrix)  # NaN when not positive-definite, as for the per-sample gradient
    L_inv = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device), upper=False)
    sigma_inv = L_inv.mT @ L_inv
    sigma_inv = sigma_inv.tril() + sigma_inv.tril(-1).mT
    return 0.5 * (outer - grad_sum * sigma_inv)


def _reduced_packed_gradient(outer, grad_sum, packed, packing: _Packing):
    """The gradient of a packed factor shared by the batch: its scale_tril's, packed."""
    L = _packed_to_scale_tril(packed, packing.diag_transform, packing.min_diag)
    return _packed_to_scale_tril_backward(_reduced_matrix_gradient(outer, grad_sum, L, False), packed,
                                          packing.diag_transform)


def _log_prob_backward(kernel, covariance: bool, grad, value, loc, matrix, output_mask, op: str, squash: int = 0,
                       packing: _Packing | None = None, grad_log_det: torch.Tensor | None = None):
    """The gradients of value, loc and the matrix. The kernels of a given factor (scale_tril,
    packed: not `covariance`) also take the upstream gradient h of the forward's log_det
    (None: unused): per sample, inside the kernel; for a factor shared by the batch,
    (sum h) d/dx sum_i log L_ii, added here."""
    with_log_det = not covariance
    k = value.shape[-1]
    _check_event_size(op, k)
    batch_shape, n, operands = _layout(value, loc, matrix, 1 if packing else 2)
    inputs = (value, loc, matrix)
    events = ((k,), (k,), matrix.shape[-1:] if packing else (k, k))
    rows = [
        value.new_empty((n, *event)) if wanted and not operand.reduces else None
        for wanted, operand, event in zip(output_mask, operands, events)
    ]
    reduces = any(wanted and operand.reduces for wanted, operand in zip(output_mask, operands))
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    tile = _tile(k, value.dtype)
    programs = triton.cdiv(n, tile["BLOCK"])
    partials = value.new_empty((programs, k + k * k + 1), dtype=acc_dtype) if reduces else None
    # A shared factor's log-det term is added after the kernel (from sum h), not inside it.
    per_sample_log_det = grad_log_det is not None and not operands[2].reduces
    if n > 0:
        # Unused pointers (their constexpr switch is off) still need a tensor.
        placeholder = grad
        v, m, M = operands
        scalars, packed_constexprs = _packing_arguments(packing)
        log_det_arguments = ()
        if with_log_det:
            log_det_arguments = (grad_log_det.contiguous() if per_sample_log_det else placeholder,)
        rows_switches = (int(rows[0] is not None), int(rows[1] is not None), int(rows[2] is not None), int(reduces))
        _launchable(kernel)[(programs,)](
            grad.contiguous(), *log_det_arguments, v.data, v.stride, m.data, m.stride, M.data, M.stride,
            *(r if r is not None else placeholder for r in rows),
            partials if reduces else placeholder, n, *scalars, *rows_switches,
            *((int(per_sample_log_det),) if with_log_det else ()),
            **packed_constexprs, **_squash_constexprs(squash, value.dtype), **tile,
        )
    grads = list(rows)
    if reduces:
        total = partials.sum(0) if n > 0 else partials.new_zeros(k + k * k + 1)
        sum_gw, outer, grad_sum = total[:k], total[k : k + k * k].view(k, k), total[-1]
        eps = torch.finfo(value.dtype).eps
        reduced = (_shared_value_gradient(operands[0].data, -sum_gw, grad_sum, squash, eps), sum_gw, None)
        for i, (wanted, operand) in enumerate(zip(output_mask, operands)):
            if wanted and operand.reduces:
                if i == 2 and packing:
                    factor = operand.data.to(acc_dtype)
                    reduced_grad = _reduced_packed_gradient(outer, grad_sum, factor, packing)
                    if grad_log_det is not None:
                        reduced_grad = reduced_grad + _packed_scale_tril_log_det_backward(
                            grad_log_det.to(acc_dtype).sum(), factor, packing.diag_transform, packing.min_diag)
                elif i == 2:
                    factor = operand.data.to(acc_dtype)
                    reduced_grad = _reduced_matrix_gradient(outer, grad_sum, factor, covariance)
                    if grad_log_det is not None:  # (sum h) diag(1 / L_ii)
                        reduced_grad = reduced_grad + torch.diag(grad_log_det.to(acc_dtype).sum() / factor.diagonal())
                else:
                    reduced_grad = reduced[i]
                grads[i] = reduced_grad.to(value.dtype)
    return tuple(
        _gradient_for(g, t, operand, batch_shape) if wanted else value.new_empty((0,))
        for g, t, operand, wanted in zip(grads, inputs, operands, output_mask)
    )


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    k = A.shape[-1]
    _check_event_size("cholesky", k)
    A = A.contiguous()
    out = torch.empty_like(A)
    n = A.numel() // (k * k) if k > 0 else 0
    if n > 0:
        tile = _tile(k, A.dtype)
        _launchable(cholesky_kernels._cholesky_forward_kernel)[(triton.cdiv(n, tile["BLOCK"]),)](A, out, n, **tile)
    return out


def _cholesky_backward(grad: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    k = L.shape[-1]
    _check_event_size("cholesky_backward", k)
    L = L.contiguous()
    out = torch.empty_like(L)
    n = L.numel() // (k * k) if k > 0 else 0
    if n > 0:
        tile = _tile(k, L.dtype)
        _launchable(cholesky_kernels._cholesky_backward_kernel)[(triton.cdiv(n, tile["BLOCK"]),)](
            grad.contiguous(), L, out, n, **tile
        )
    return out


# --- the ops ----------------------------------------------------------------------------------


def _mvn_tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_forward(mvn_kernels._mvn_tril_log_prob_forward_kernel, value, loc, scale_tril, "mvn_tril_log_prob",
                             with_log_det=True)


def _mvn_cov_log_prob(value: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    return _log_prob_forward(mvn_kernels._mvn_cov_log_prob_forward_kernel, value, loc, covariance, "mvn_cov_log_prob")


def _mvn_tril_log_prob_backward(
    grad: torch.Tensor, grad_log_det: torch.Tensor | None, value: torch.Tensor, loc: torch.Tensor,
    scale_tril: torch.Tensor, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _log_prob_backward(
        mvn_kernels._mvn_tril_log_prob_backward_kernel, False, grad, value, loc, scale_tril, output_mask,
        "mvn_tril_log_prob_backward", grad_log_det=grad_log_det,
    )


def _mvn_cov_log_prob_backward(
    grad: torch.Tensor, value: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _log_prob_backward(
        mvn_kernels._mvn_cov_log_prob_backward_kernel, True, grad, value, loc, covariance, output_mask,
        "mvn_cov_log_prob_backward",
    )


# --- diagonal and squashed ops -----------------------------------------------------------------


def _rows_layout(*tensors):
    """Batch shape, batch size and operands of tensors of shape (*, k) each."""
    batch_shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    n = math.prod(batch_shape)
    return batch_shape, n, tuple(_operand(t, 1, batch_shape, n) for t in tensors)


def _gradients_from_rows(rows, inputs, operands, batch_shape, output_mask, like):
    """Per-sample gradient rows to the inputs' shapes: an operand that reduces gets their sum."""
    return tuple(
        _gradient_for(r.sum(0) if operand.reduces else r, t, operand, batch_shape) if wanted else like.new_empty((0,))
        for r, t, operand, wanted in zip(rows, inputs, operands, output_mask)
    )


def _diag_log_prob_forward(value, loc, scale, squash: int, op: str):
    k = value.shape[-1]
    _check_event_size(op, k)
    batch_shape, n, (v, m, sc) = _rows_layout(value, loc, scale)
    out = value.new_empty(batch_shape)
    if n > 0:
        tile = _tile(k, value.dtype)
        _launchable(squashed_kernels._diag_log_prob_forward_kernel)[(triton.cdiv(n, tile["BLOCK"]),)](
            v.data, v.stride, m.data, m.stride, sc.data, sc.stride, out, n,
            SQUASH=squash, EPS=torch.finfo(value.dtype).eps, **tile,
        )
    return out


def _diag_log_prob_backward(grad, value, loc, scale, output_mask, squash: int, op: str):
    k = value.shape[-1]
    _check_event_size(op, k)
    batch_shape, n, operands = _rows_layout(value, loc, scale)
    rows = [value.new_empty((n, k)) if wanted else None for wanted in output_mask]
    if n > 0:
        tile = _tile(k, value.dtype)
        v, m, sc = operands
        _launchable(squashed_kernels._diag_log_prob_backward_kernel)[(triton.cdiv(n, tile["BLOCK"]),)](
            grad.contiguous(), v.data, v.stride, m.data, m.stride, sc.data, sc.stride,
            *(r if r is not None else grad for r in rows), n, *(int(r is not None) for r in rows),
            SQUASH=squash, EPS=torch.finfo(value.dtype).eps, **tile,
        )
    return _gradients_from_rows(rows, (value, loc, scale), operands, batch_shape, output_mask, value)


def _rsample_forward(kernel, loc, scale, eps, parameter_dims: int, op: str):
    k = loc.shape[-1]
    _check_event_size(op, k)
    batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape[: scale.dim() - parameter_dims], eps.shape[:-1])
    n = math.prod(batch_shape)
    m, sc, e = (_operand(t, dims, batch_shape, n) for t, dims in ((loc, 1), (scale, parameter_dims), (eps, 1)))
    action, pre_tanh = loc.new_empty((*batch_shape, k)), loc.new_empty((*batch_shape, k))
    log_prob = loc.new_empty(batch_shape)
    if n > 0:
        tile = _tile(k, loc.dtype)
        _launchable(kernel)[(triton.cdiv(n, tile["BLOCK"]),)](
            m.data, m.stride, sc.data, sc.stride, e.data, e.stride, action, pre_tanh, log_prob, n, **tile
        )
    return action, pre_tanh, log_prob


def _rsample_backward(kernel, grad_action, grad_pre_tanh, grad_log_prob, loc, scale, eps, output_mask,
                      parameter_dims: int, op: str):
    """The gradients of loc, the scale (diagonal: parameter_dims 1) or scale_tril (2) and eps. A
    diagonal kernel writes rows, summed here for shared operands; a scale_tril kernel reduces a
    shared loc and scale_tril per program, as the log-prob's backward does. Shared noise is
    read per sample when its gradient is wanted, so that it comes out in rows."""
    k = loc.shape[-1]
    _check_event_size(op, k)
    tril = parameter_dims == 2
    batch_shape = torch.broadcast_shapes(loc.shape[:-1], scale.shape[: scale.dim() - parameter_dims], eps.shape[:-1])
    n = math.prod(batch_shape)
    operands = [_operand(t, dims, batch_shape, n) for t, dims in ((loc, 1), (scale, parameter_dims), (eps, 1))]
    if output_mask[2] and operands[2].stride == 0:
        operands[2] = _Operand(eps.expand(*batch_shape, k).contiguous().view(n, k), k, False)
    events = ((k,), scale.shape[-parameter_dims:], (k,))
    reduced_in_kernel = [tril and i < 2 and wanted and op_.reduces for i, (wanted, op_) in enumerate(zip(output_mask, operands))]
    rows = [
        loc.new_empty((n, *event)) if wanted and not in_kernel else None
        for wanted, event, in_kernel in zip(output_mask, events, reduced_in_kernel)
    ]
    acc_dtype = torch.float64 if loc.dtype == torch.float64 else torch.float32
    tile = _tile(k, loc.dtype)
    programs = triton.cdiv(n, tile["BLOCK"])
    reduces = any(reduced_in_kernel)
    partials = loc.new_empty((programs, k + k * k + 1), dtype=acc_dtype) if reduces else None
    upstream = (grad_action, grad_pre_tanh, grad_log_prob)
    if n > 0:
        placeholder = loc
        m, sc, e = operands
        extra = (partials if reduces else placeholder,) if tril else ()
        flags = (int(reduces),) if tril else ()
        _launchable(kernel)[(programs,)](
            *(g.contiguous() if g is not None else placeholder for g in upstream),
            m.data, m.stride, sc.data, sc.stride, e.data, e.stride,
            *(r if r is not None else placeholder for r in rows), *extra, n,
            *(int(g is not None) for g in upstream), *(int(r is not None) for r in rows), *flags, **tile,
        )
    grads = [r.sum(0) if r is not None and operand.reduces else r for r, operand in zip(rows, operands)]
    if reduces:
        total = partials.sum(0) if n > 0 else partials.new_zeros(k + k * k + 1)
        sum_g_u, outer, grad_sum = total[:k], total[k : k + k * k].view(k, k), total[-1]
        if reduced_in_kernel[0]:
            grads[0] = sum_g_u.to(loc.dtype)
        if reduced_in_kernel[1]:
            grads[1] = _reduced_matrix_gradient(outer, grad_sum, operands[1].data.to(acc_dtype), False).to(loc.dtype)
    return tuple(
        _gradient_for(g, t, operand, batch_shape) if wanted else loc.new_empty((0,))
        for g, t, operand, wanted in zip(grads, (loc, scale, eps), operands, output_mask)
    )


def _diag_normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _diag_log_prob_forward(value, loc, scale, 0, "diag_normal_log_prob")


def _diag_normal_log_prob_backward(
    grad: torch.Tensor, value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _diag_log_prob_backward(grad, value, loc, scale, output_mask, 0, "diag_normal_log_prob_backward")


def _squash(value_is_pre_tanh: bool) -> int:
    return 1 if value_is_pre_tanh else 2


def _squashed_diag_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, value_is_pre_tanh: bool
) -> torch.Tensor:
    return _diag_log_prob_forward(value, loc, scale, _squash(value_is_pre_tanh), "squashed_diag_log_prob")


def _squashed_diag_log_prob_backward(
    grad: torch.Tensor, value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, value_is_pre_tanh: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _diag_log_prob_backward(
        grad, value, loc, scale, output_mask, _squash(value_is_pre_tanh), "squashed_diag_log_prob_backward"
    )


def _squashed_tril_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, value_is_pre_tanh: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_forward(
        mvn_kernels._squashed_tril_log_prob_forward_kernel, value, loc, scale_tril, "squashed_tril_log_prob",
        with_log_det=True, **_squash_constexprs(_squash(value_is_pre_tanh), value.dtype),
    )


def _squashed_tril_log_prob_backward(
    grad: torch.Tensor, grad_log_det: torch.Tensor | None, value: torch.Tensor, loc: torch.Tensor,
    scale_tril: torch.Tensor, value_is_pre_tanh: bool, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _log_prob_backward(
        mvn_kernels._squashed_tril_log_prob_backward_kernel, False, grad, value, loc, scale_tril, output_mask,
        "squashed_tril_log_prob_backward", squash=_squash(value_is_pre_tanh), grad_log_det=grad_log_det,
    )


def _squashed_diag_rsample_log_prob(
    loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rsample_forward(
        squashed_kernels._squashed_diag_rsample_log_prob_forward_kernel, loc, scale, eps, 1,
        "squashed_diag_rsample_log_prob",
    )


def _squashed_diag_rsample_log_prob_backward(
    grad_action: torch.Tensor | None, grad_pre_tanh: torch.Tensor | None, grad_log_prob: torch.Tensor | None,
    loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rsample_backward(
        squashed_kernels._squashed_diag_rsample_log_prob_backward_kernel, grad_action, grad_pre_tanh, grad_log_prob,
        loc, scale, eps, output_mask, 1, "squashed_diag_rsample_log_prob_backward",
    )


def _squashed_tril_rsample_log_prob(
    loc: torch.Tensor, scale_tril: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rsample_forward(
        squashed_kernels._squashed_tril_rsample_log_prob_forward_kernel, loc, scale_tril, eps, 2,
        "squashed_tril_rsample_log_prob",
    )


def _squashed_tril_rsample_log_prob_backward(
    grad_action: torch.Tensor | None, grad_pre_tanh: torch.Tensor | None, grad_log_prob: torch.Tensor | None,
    loc: torch.Tensor, scale_tril: torch.Tensor, eps: torch.Tensor, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rsample_backward(
        squashed_kernels._squashed_tril_rsample_log_prob_backward_kernel, grad_action, grad_pre_tanh, grad_log_prob,
        loc, scale_tril, eps, output_mask, 2, "squashed_tril_rsample_log_prob_backward",
    )


def _elementwise(kernel, out_like: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(out_like, memory_format=torch.contiguous_format)
    n = out.numel()
    if n > 0:
        block = 1024
        acc = tl.float64 if out.dtype == torch.float64 else tl.float32
        _launchable(kernel)[(triton.cdiv(n, block),)](*(t.contiguous() for t in tensors), out, n, BLOCK=block, ACC=acc)
    return out


def _tanh_log_abs_det_jacobian(u: torch.Tensor) -> torch.Tensor:
    return _elementwise(squashed_kernels._tanh_log_abs_det_jacobian_forward_kernel, u, u)


def _tanh_log_abs_det_jacobian_backward(grad: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _elementwise(squashed_kernels._tanh_log_abs_det_jacobian_backward_kernel, u, grad, u)


def _packed_launch(kernel, out: torch.Tensor, *tensors: torch.Tensor, k: int, diag_transform: str, **scalars) -> torch.Tensor:
    entries = out.numel()
    if entries > 0:
        block = 1024
        acc = tl.float64 if out.dtype == torch.float64 else tl.float32
        _launchable(kernel)[(triton.cdiv(entries, block),)](
            *(t.contiguous() for t in tensors), out, entries, *scalars.values(),
            K=k, DIAG=_DIAG_TRANSFORMS[diag_transform], BLOCK=block, ACC=acc,
        )
    return out


def _packed_to_scale_tril(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    k = reference.event_size_of_packed(packed.shape[-1])
    out = packed.new_empty(packed.shape[:-1] + (k, k))
    return _packed_launch(packed_kernels._packed_to_scale_tril_forward_kernel, out, packed, k=k,
                          diag_transform=diag_transform, min_diag=min_diag)


def _packed_to_scale_tril_backward(grad: torch.Tensor, packed: torch.Tensor, diag_transform: str) -> torch.Tensor:
    k = reference.event_size_of_packed(packed.shape[-1])
    out = torch.empty_like(packed, memory_format=torch.contiguous_format)
    return _packed_launch(packed_kernels._packed_to_scale_tril_backward_kernel, out, grad, packed, k=k,
                          diag_transform=diag_transform)


def _packed_scale_tril_log_det(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    k = reference.event_size_of_packed(packed.shape[-1])
    out = packed.new_empty(packed.shape[:-1])
    return _packed_launch(packed_kernels._packed_scale_tril_log_det_forward_kernel, out, packed, k=k,
                          diag_transform=diag_transform, min_diag=min_diag)


def _packed_scale_tril_log_det_backward(grad: torch.Tensor, packed: torch.Tensor, diag_transform: str,
                                        min_diag: float) -> torch.Tensor:
    k = reference.event_size_of_packed(packed.shape[-1])
    out = torch.empty_like(packed, memory_format=torch.contiguous_format)
    return _packed_launch(packed_kernels._packed_scale_tril_log_det_backward_kernel, out, grad, packed, k=k,
                          diag_transform=diag_transform, min_diag=min_diag)


def _mvn_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_forward(
        mvn_kernels._mvn_packed_log_prob_forward_kernel, value, loc, packed, "mvn_packed_log_prob",
        _Packing(diag_transform, min_diag), with_log_det=True,
    )


def _mvn_packed_log_prob_backward(
    grad: torch.Tensor, grad_log_det: torch.Tensor | None, value: torch.Tensor, loc: torch.Tensor,
    packed: torch.Tensor, diag_transform: str, min_diag: float, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _log_prob_backward(
        mvn_kernels._mvn_packed_log_prob_backward_kernel, False, grad, value, loc, packed, output_mask,
        "mvn_packed_log_prob_backward", packing=_Packing(diag_transform, min_diag), grad_log_det=grad_log_det,
    )


def _squashed_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float,
    value_is_pre_tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _log_prob_forward(
        mvn_kernels._squashed_packed_log_prob_forward_kernel, value, loc, packed, "squashed_packed_log_prob",
        _Packing(diag_transform, min_diag), with_log_det=True,
        **_squash_constexprs(_squash(value_is_pre_tanh), value.dtype),
    )


def _squashed_packed_log_prob_backward(
    grad: torch.Tensor, grad_log_det: torch.Tensor | None, value: torch.Tensor, loc: torch.Tensor,
    packed: torch.Tensor, diag_transform: str, min_diag: float, value_is_pre_tanh: bool, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _log_prob_backward(
        mvn_kernels._squashed_packed_log_prob_backward_kernel, False, grad, value, loc, packed, output_mask,
        "squashed_packed_log_prob_backward", squash=_squash(value_is_pre_tanh),
        packing=_Packing(diag_transform, min_diag), grad_log_det=grad_log_det,
    )


def _cpu_kernel(name: str, launcher):
    """The CPU implementation of triton op `name`: the kernels through the interpreter, or the
    compiled CPU op."""

    def run(*args):
        if INTERPRETING:
            return launcher(*args)
        if not backends.COMPILED_CPU:
            raise backends.BackendUnavailableError(
                f"{NAMESPACE}::{name} on CPU tensors runs the Triton kernels only under TRITON_INTERPRET=1, "
                "and otherwise the compiled CPU op, which this build lacks"
            )
        return getattr(torch.ops.fusedgauss, name)(*args)

    return run


LAUNCHERS = {
    "mvn_tril_log_prob": _mvn_tril_log_prob,
    "mvn_tril_log_prob_backward": _mvn_tril_log_prob_backward,
    "mvn_cov_log_prob": _mvn_cov_log_prob,
    "mvn_cov_log_prob_backward": _mvn_cov_log_prob_backward,
    "cholesky": _cholesky,
    "cholesky_backward": _cholesky_backward,
    "diag_normal_log_prob": _diag_normal_log_prob,
    "diag_normal_log_prob_backward": _diag_normal_log_prob_backward,
    "squashed_diag_log_prob": _squashed_diag_log_prob,
    "squashed_diag_log_prob_backward": _squashed_diag_log_prob_backward,
    "squashed_tril_log_prob": _squashed_tril_log_prob,
    "squashed_tril_log_prob_backward": _squashed_tril_log_prob_backward,
    "squashed_diag_rsample_log_prob": _squashed_diag_rsample_log_prob,
    "squashed_diag_rsample_log_prob_backward": _squashed_diag_rsample_log_prob_backward,
    "squashed_tril_rsample_log_prob": _squashed_tril_rsample_log_prob,
    "squashed_tril_rsample_log_prob_backward": _squashed_tril_rsample_log_prob_backward,
    "tanh_log_abs_det_jacobian": _tanh_log_abs_det_jacobian,
    "tanh_log_abs_det_jacobian_backward": _tanh_log_abs_det_jacobian_backward,
    "packed_to_scale_tril": _packed_to_scale_tril,
    "packed_to_scale_tril_backward": _packed_to_scale_tril_backward,
    "packed_scale_tril_log_det": _packed_scale_tril_log_det,
    "packed_scale_tril_log_det_backward": _packed_scale_tril_log_det_backward,
    "mvn_packed_log_prob": _mvn_packed_log_prob,
    "mvn_packed_log_prob_backward": _mvn_packed_log_prob_backward,
    "squashed_packed_log_prob": _squashed_packed_log_prob,
    "squashed_packed_log_prob_backward": _squashed_packed_log_prob_backward,
}


def _register() -> None:
    from .ops import register_autograd

    for name, launcher in LAUNCHERS.items():
        op = triton_op(f"{NAMESPACE}::{name}", mutates_args=())(launcher)
        op.register_kernel("cpu")(_cpu_kernel(name, launcher))
    register_autograd(NAMESPACE)


_register()
