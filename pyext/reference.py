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


def _tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, L L^T) = -1/2 ||L^{-1}(value - loc)||^2 - sum_i log L_ii - (k/2) log 2 pi"""
    k = value.shape[-1]
    batch = _batch_shape(value, loc, scale_tril)
    diff = (value - loc).expand(batch + (k,))
    L = scale_tril.expand(batch + (k, k))
    z = torch.linalg.solve_triangular(L, diff.unsqueeze(-1), upper=False).squeeze(-1)
    half_log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * z.pow(2).sum(-1) - half_log_det - 0.5 * k * LOG_2PI


def _cholesky_or_nan(A: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    return torch.where((info == 0)[..., None, None], L, torch.full_like(L, math.nan))


def mvn_tril_log_prob(value: torch.Tensor, loc: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(value.dtype)
    return _tril_log_prob(value.to(dtype), loc.to(dtype), scale_tril.to(dtype)).to(value.dtype)


def mvn_cov_log_prob(value: torch.Tensor, loc: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, covariance) through L = cholesky(covariance)."""
    dtype = _compute_dtype(value.dtype)
    L = _cholesky_or_nan(covariance.to(dtype))
    return _tril_log_prob(value.to(dtype), loc.to(dtype), L).to(value.dtype)


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of each matrix, read through its lower triangle."""
    return _cholesky_or_nan(A.to(_compute_dtype(A.dtype))).to(A.dtype)
