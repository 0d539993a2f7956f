"""Plain-PyTorch implementation of every op: the oracle of the tests and the "torch" backend.

Gradients come from autograd through these compositions. float16 and bfloat16 inputs are
computed in float32 (PyTorch has no half triangular solve) and returned in their own dtype.
A matrix that is not positive-definite gives NaN for its own sample only, with no device
synchronisation, as the fused kernels do.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_shape(value: torch.Tensor, loc: torch.Tensor, matrix: torch.Tensor) -> torch.Size:
    return torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], matrix.shape[:-2])


def _tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor):
    """(log N(value; loc, L L^T), sum_i log L_ii), both batch-shaped:
    log N = -1/2 ||L^{-1}(value - loc)||^2 - sum_i log L_ii - (k/2) log 2 pi"""
    k = value.shape[-1]
    batch = _batch_shape(value, loc, scale_tril)
    diff = (value - loc).expand(batch + (k,))
    L = scale_tril.expand(batch + (k, k))
    z = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
    log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * z.pow(2).sum(-1) - log_det - 0.5 * k * LOG_2PI, log_det


def _cholesky_or_nan(A: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    return torch.where((info == 0)[..., None, None], L, torch.full_like(L, math.nan))


def mvn_tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the log-prob, Σᵢ log Lᵢᵢ per sample), as the op returns them."""
    dtype = _compute_dtype(value.dtype)
    log_prob, log_det = _tril_log_prob(value.to(dtype), loc.to(dtype), scale_tril.to(dtype))
    return log_prob.to(value.dtype), log_det.to(value.dtype)


def log_prob_of(op):
    """The reference `op` of a log-prob that also returns log_det (Σᵢ log Lᵢᵢ), returning its
    log-prob alone, as the op's public function does by default."""
    return lambda *args: op(*args)[0]


def mvn_cov_log_prob(value: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, covariance) through L = cholesky(covariance)."""
    dtype = _compute_dtype(value.dtype)
    L = _cholesky_or_nan(covariance.to(dtype))
    return _tril_log_prob(value.to(dtype), loc.to(dtype), L)[0].to(value.dtype)


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of each matrix, read through its lower triangle."""
    return _cholesky_or_nan(A.to(_compute_dtype(A.dtype))).to(A.dtype)


# --- diagonal and tanh-squashed Gaussians ----------------------------------------------------


def action_epsilon(dtype: torch.dtype) -> float:
    """The clamp of an action before atanh: the epsilon of the action's own dtype."""
    return torch.finfo(dtype).eps


def atanh_clamped(action: torch.Tensor, eps: float) -> torch.Tensor:
    """atanh(clamp(action, -1 + eps, 1 - eps)): an action that rounded to ±1 keeps a finite
    pre-tanh value."""
    return torch.atanh(action.clamp(-1 + eps, 1 - eps))


def _tanh_log_abs_det_jacobian(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)²) = 2 (log 2 - |u| - log1p(e^{-2|u|})), finite for every u. (The same
    as 2 (log 2 - u - softplus(-2u)), without softplus's switch to the identity above 20,
    which costs float64 about 1e-9.)"""
    a = u.abs()
    return 2.0 * (math.log(2.0) - a - torch.log1p(torch.exp(-2.0 * a)))


def _diag_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    z = (value - loc) / scale
    return (-0.5 * z.pow(2) - scale.log() - 0.5 * LOG_2PI).sum(-1)


def _pre_tanh(value: torch.Tensor, value_is_pre_tanh: bool, eps: float) -> torch.Tensor:
    return value if value_is_pre_tanh else atanh_clamped(value, eps)


def diag_normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σᵢ log N(valueᵢ; locᵢ, scaleᵢ²)"""
    dtype = _compute_dtype(value.dtype)
    return _diag_log_prob(value.to(dtype), loc.to(dtype), scale.to(dtype)).to(value.dtype)


def tanh_log_abs_det_jacobian(u: torch.Tensor) -> torch.Tensor:
    return _tanh_log_abs_det_jacobian(u.to(_compute_dtype(u.dtype))).to(u.dtype)


def squashed_diag_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, value_is_pre_tanh: bool
) -> torch.Tensor:
    """log-prob of tanh(u), u ~ N(loc, diag(scale)²), from the action or from u."""
    dtype = _compute_dtype(value.dtype)
    u = _pre_tanh(value.to(dtype), value_is_pre_tanh, action_epsilon(value.dtype))
    log_prob = _diag_log_prob(u, loc.to(dtype), scale.to(dtype)) - _tanh_log_abs_det_jacobian(u).sum(-1)
    return log_prob.to(value.dtype)


def squashed_tril_log_prob(
    value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor, value_is_pre_tanh: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of tanh(u), u ~ N(loc, L Lᵀ), from the action or from u; Σᵢ log Lᵢᵢ per sample)."""
    dtype = _compute_dtype(value.dtype)
    u = _pre_tanh(value.to(dtype), value_is_pre_tanh, action_epsilon(value.dtype))
    gaussian, log_det = _tril_log_prob(u, loc.to(dtype), scale_tril.to(dtype))
    log_prob = gaussian - _tanh_log_abs_det_jacobian(u).sum(-1)
    return log_prob.to(value.dtype), log_det.to(value.dtype)


def _squashed_sample(u: torch.Tensor, gaussian_log_prob: torch.Tensor, dtype: torch.dtype):
    log_prob = gaussian_log_prob - _tanh_log_abs_det_jacobian(u).sum(-1)
    return torch.tanh(u).to(dtype), u.to(dtype), log_prob.to(dtype)


def squashed_diag_rsample_log_prob(
    loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u = loc + scale·eps, (tanh(u), u, log-prob), the log-prob taken at (u - loc)/scale = eps."""
    out_dtype = loc.dtype
    dtype = _compute_dtype(loc.dtype)
    loc, scale, eps = loc.to(dtype), scale.to(dtype), eps.to(dtype)
    u = loc + scale * eps
    gaussian = (-0.5 * eps.pow(2) - scale.log() - 0.5 * LOG_2PI).expand_as(u).sum(-1)
    return _squashed_sample(u, gaussian, out_dtype)


def squashed_tril_rsample_log_prob(
    loc: torch.Tensor, scale_tril: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u = loc + L eps (L read through its lower triangle), (tanh(u), u, log-prob)."""
    out_dtype = loc.dtype
    dtype = _compute_dtype(loc.dtype)
    loc, L, eps = loc.to(dtype), scale_tril.to(dtype).tril(), eps.to(dtype)
    k = loc.shape[-1]
    u = loc + (L @ eps.unsqueeze(-1)).squeeze(-1)
    half_log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    gaussian = -0.5 * eps.pow(2).sum(-1) - half_log_det - 0.5 * k * LOG_2PI
    return _squashed_sample(u, gaussian.expand(u.shape[:-1]), out_dtype)


# --- packed scale_tril of a policy head ------------------------------------------------------

#: The transforms of a packed diagonal entry x into L_ii (before min_diag is added).
DIAG_TRANSFORMS = ("softplus", "exp", "none")


def event_size_of_packed(n: int) -> int | None:
    """k with k(k+1)/2 = n, or None when there is none."""
    k = (math.isqrt(8 * n + 1) - 1) // 2
    return k if n > 0 and k * (k + 1) // 2 == n else None


def event_size_of_head(n: int) -> int | None:
    """k with k + k(k+1)/2 = n (a policy head's loc and packed scale_tril), or None."""
    k = (math.isqrt(8 * n + 9) - 3) // 2
    return k if n > 0 and k + k * (k + 1) // 2 == n else None


def split_head(head: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A policy head's rows [loc | packed] as views (loc, packed), k being the event size."""
    return head.split([k, head.shape[-1] - k], dim=-1)


def _diag_transform(x: torch.Tensor, diag_transform: str) -> torch.Tensor:
    if diag_transform == "softplus":
        # log(1 + e^x). F.softplus is the identity above x = 20, where log(1 + e^x) - x < 2.1e-9
        # (within float32's rounding of x); the kernels' max(x, 0) + log1p(e^-|x|) is not, and
        # the plain-PyTorch head uses F.softplus. torch.logaddexp(x, 0), exact everywhere, is an
        # unvectorised kernel that cost a PPO update more than the fused log-prob did.
        return torch.nn.functional.softplus(x)
    if diag_transform == "exp":
        return torch.exp(x)
    return x


def _diagonal_positions(k: int, device) -> torch.Tensor:
    """The packed positions i(i+1)/2 + i of the diagonal entries (i, i)."""
    i = torch.arange(k, device=device)
    return i * (i + 1) // 2 + i


def packed_diagonal(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    """The diagonal (*, k) of packed_to_scale_tril(packed, ...), from the k diagonal entries alone."""
    x = packed.to(_compute_dtype(packed.dtype))
    positions = _diagonal_positions(event_size_of_packed(x.shape[-1]), x.device)
    return (_diag_transform(x.index_select(-1, positions), diag_transform) + min_diag).to(packed.dtype)


def packed_scale_tril_log_det(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    """Σᵢ log L_ii (*,) of packed_to_scale_tril(packed, ...), from the k diagonal entries alone."""
    x = packed.to(_compute_dtype(packed.dtype))
    return packed_diagonal(x, diag_transform, min_diag).log().sum(-1).to(packed.dtype)


def packed_to_scale_tril(packed: torch.Tensor, diag_transform: str, min_diag: float) -> torch.Tensor:
    """L (*, k, k) from packed (*, k(k+1)/2), row by row as ``torch.tril_indices(k, k)`` lists
    the lower triangle, with L_ii = diag_transform(x_ii) + min_diag."""
    x = packed.to(_compute_dtype(packed.dtype))
    k = event_size_of_packed(x.shape[-1])
    rows, cols = torch.tril_indices(k, k, device=x.device)
    # Only the diagonal entries go through the transform: exp of a large off-diagonal entry
    # would be inf, and its zero gradient through a torch.where NaN.
    values = x.index_copy(-1, _diagonal_positions(k, x.device), packed_diagonal(x, diag_transform, min_diag))
    L = x.new_zeros(x.shape[:-1] + (k * k,)).index_copy(-1, rows * k + cols, values)
    return L.view(x.shape[:-1] + (k, k)).to(packed.dtype)


def mvn_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mvn_tril_log_prob with scale_tril = packed_to_scale_tril(packed, diag_transform, min_diag),
    Σᵢ log Lᵢᵢ per sample)."""
    return mvn_tril_log_prob(value, loc, packed_to_scale_tril(packed, diag_transform, min_diag))


def squashed_packed_log_prob(
    value: torch.Tensor, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str, min_diag: float,
    value_is_pre_tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squashed_tril_log_prob with scale_tril = packed_to_scale_tril(packed, diag_transform, min_diag),
    Σᵢ log Lᵢᵢ per sample)."""
    scale_tril = packed_to_scale_tril(packed, diag_transform, min_diag)
    return squashed_tril_log_prob(value, loc, scale_tril, value_is_pre_tanh)


def packed_head_log_prob(
    value: torch.Tensor, head: torch.Tensor, diag_transform: str, min_diag: float, squashed: bool,
    value_is_pre_tanh: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mvn_packed_log_prob (with squashed, squashed_packed_log_prob) of loc and packed read from
    a policy head's rows, [loc | packed]."""
    loc, packed = split_head(head, value.shape[-1])
    if squashed:
        return squashed_packed_log_prob(value, loc, packed, diag_transform, min_diag, value_is_pre_tanh)
    return mvn_packed_log_prob(value, loc, packed, diag_transform, min_diag)
