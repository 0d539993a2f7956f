"""Triton kernels of the batched small-matrix Cholesky factorisation and its backward."""

from __future__ import annotations

import triton
import triton.language as tl

from .linalg import (
    _cholesky,
    _load_lower,
    _row,
    _solve_lower_transposed_columns,
    _store_matrices,
    _transpose,
)
from .mvn import _block_rows


@triton.jit(do_not_specialize=["n"])
def _cholesky_forward_kernel(A_ptr, out_ptr, n, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                             ACC: tl.constexpr):
    """L with A = L L^T from the lower triangle of A (right-looking, in registers):
    L_jj = sqrt(A_jj), L_ij = A_ij / L_jj, then A <- A - L_:j L_:j^T. A matrix that is not
    positive-definite gives a NaN factor."""
    idx = tl.arange(0, KP)
    eye = (idx[None, :, None] == idx[None, None, :]).to(ACC)
    rows, active = _block_rows(n, BLOCK)
    A = tl.where(active[:, None, None], _load_lower(A_ptr, K * K, rows, active, K, KP, ACC), eye)
    L, ok = _cholesky(A, K, KP)
    _store_matrices(out_ptr, rows, active, tl.where(ok[:, None, None], L, float("nan")), K, KP)


@triton.jit(do_not_specialize=["n"])
def _cholesky_backward_kernel(grad_ptr, L_ptr, out_ptr, n, K: tl.constexpr, KP: tl.constexpr,
                              BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Gradient through A = L L^T -> L (torch.linalg.cholesky's convention, symmetric):
    P = Phi(L^T G) made symmetric, Phi = the lower triangle with its diagonal halved;
    dA = L^{-T} P L^{-1}, symmetrised. G is read through its lower triangle."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    eye = (i == j).to(ACC)
    rows, active = _block_rows(n, BLOCK)
    L = tl.where(active[:, None, None], _load_lower(L_ptr, K * K, rows, active, K, KP, ACC), eye)
    G = _load_lower(grad_ptr, K * K, rows, active, K, KP, ACC)
    # L^T G = sum_m (row m of L)^T (row m of G), a rank-one update per row.
    M = tl.zeros_like(G)
    for m in tl.static_range(K):
        M += _row(L, m, KP)[:, :, None] * _row(G, m, KP)[:, None, :]
    P = tl.where(j <= i, 0.5 * M, 0.0)
    P = tl.where(j <= i, P, _transpose(P, KP))
    # P L^{-1} = (L^{-T} P)^T, since P is symmetric; then dA = L^{-T} (P L^{-1}).
    X = _transpose(_solve_lower_transposed_columns(L, P, K, KP), KP)
    dA = _solve_lower_transposed_columns(L, X, K, KP)
    dA = 0.5 * (dA + _transpose(dA, KP))
    _store_matrices(out_ptr, rows, active, dA, K, KP)
