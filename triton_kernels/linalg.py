"""Small-matrix linear algebra on register tiles, shared by the Triton kernels.

A program holds a block of samples: a vector per sample as a ``[BLOCK, KP]`` tile and a
matrix per sample as ``[BLOCK, KP, KP]`` (sample, row, column), with ``KP`` the event size
``K`` padded to a power of two. Entries past ``K`` are zero, and only the lower triangle of a
factor is ever non-zero. Triton cannot index a register tile, so row, column and entry
``i`` are taken with a mask and a sum, and written back with ``tl.where``; every loop is over
the constexpr ``K`` and unrolled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _entry(x, i, KP: tl.constexpr):
    """x[:, i] of a [BLOCK, KP] tile, as [BLOCK]."""
    idx = tl.arange(0, KP)
    return tl.sum(tl.where(idx[None, :] == i, x, 0.0), axis=1)


@triton.jit
def _set_entry(x, i, value, KP: tl.constexpr):
    """x with x[:, i] = value ([BLOCK])."""
    idx = tl.arange(0, KP)
    return tl.where(idx[None, :] == i, value[:, None], x)


@triton.jit
def _row(A, i, KP: tl.constexpr):
    """Row i of each matrix of a [BLOCK, KP, KP] tile, as [BLOCK, KP]."""
    idx = tl.arange(0, KP)
    return tl.sum(tl.where(idx[None, :, None] == i, A, 0.0), axis=1)


@triton.jit
def _column(A, j, KP: tl.constexpr):
    """Column j of each matrix of a [BLOCK, KP, KP] tile, as [BLOCK, KP]."""
    idx = tl.arange(0, KP)
    return tl.sum(tl.where(idx[None, None, :] == j, A, 0.0), axis=2)


@triton.jit
def _set_row(A, i, row, KP: tl.constexpr):
    idx = tl.arange(0, KP)
    return tl.where(idx[None, :, None] == i, row[:, None, :], A)


@triton.jit
def _set_column(A, j, column, KP: tl.constexpr):
    idx = tl.arange(0, KP)
    return tl.where(idx[None, None, :] == j, column[:, :, None], A)


@triton.jit
def _diagonal(A, KP: tl.constexpr):
    """The diagonals of a [BLOCK, KP, KP] tile, as [BLOCK, KP]."""
    idx = tl.arange(0, KP)
    return tl.sum(tl.where(idx[None, :, None] == idx[None, None, :], A, 0.0), axis=2)


@triton.jit
def _transpose(A, KP: tl.constexpr):
    """A^T of each matrix of a [BLOCK, KP, KP] tile."""
    return tl.permute(A, (0, 2, 1))


@triton.jit
def _solve_lower(L, b, K: tl.constexpr, KP: tl.constexpr):
    """x = L^{-1} b by forward substitution: x_i = (b_i - sum_{j<i} L_ij x_j) / L_ii."""
    x = tl.zeros_like(b)
    for i in tl.static_range(K):
        row = _row(L, i, KP)
        s = _entry(b, i, KP) - tl.sum(row * x, axis=1)
        x = _set_entry(x, i, s / _entry(row, i, KP), KP)
    return x


@triton.jit
def _solve_lower_transposed(L, b, K: tl.constexpr, KP: tl.constexpr):
    """x = L^{-T} b by back substitution: x_i = (b_i - sum_{j>i} L_ji x_j) / L_ii."""
    x = tl.zeros_like(b)
    for step in tl.static_range(K):
        i = K - 1 - step
        column = _column(L, i, KP)
        s = _entry(b, i, KP) - tl.sum(column * x, axis=1)
        x = _set_entry(x, i, s / _entry(column, i, KP), KP)
    return x


@triton.jit
def _solve_lower_transposed_columns(L, B, K: tl.constexpr, KP: tl.constexpr):
    """X = L^{-T} B for a [BLOCK, KP, KP] right-hand side B, row by row of X:
    X_i = (B_i - sum_{j>i} L_ji X_j) / L_ii."""
    X = tl.zeros_like(B)
    for step in tl.static_range(K):
        i = K - 1 - step
        column = _column(L, i, KP)
        s = _row(B, i, KP) - tl.sum(column[:, :, None] * X, axis=1)
        X = _set_row(X, i, s / _entry(column, i, KP)[:, None], KP)
    return X


@triton.jit
def _cholesky(A, K: tl.constexpr, KP: tl.constexpr):
    """Lower Cholesky factors of the matrices whose lower triangles are in A (right-looking):
    for each column j, L_jj = sqrt(A_jj), L_ij = A_ij / L_jj (i > j), then
    A <- A - L_:j L_:j^T. Returns (L, ok): ok is false for a sample whose pivot was not
    positive (not positive-definite, or NaN); its factor is NaN from that column on."""
    idx = tl.arange(0, KP)
    L = tl.zeros_like(A)
    for j in tl.static_range(K):
        column = _column(A, j, KP)
        pivot = _entry(column, j, KP)
        root = tl.sqrt(tl.where(pivot > 0.0, pivot, float("nan")))
        column = tl.where(idx[None, :] >= j, column / root[:, None], 0.0)
        L = _set_column(L, j, column, KP)
        A = A - column[:, :, None] * column[:, None, :]
    # A failed pivot leaves a NaN diagonal entry, which fails the comparison.
    diag = _diagonal(L, KP)
    failed = tl.sum(tl.where((idx[None, :] < K) & ~(diag > 0.0), 1, 0), axis=1)
    return L, failed == 0


@triton.jit
def _sum_log_diagonal(L, K: tl.constexpr, KP: tl.constexpr):
    """sum_i log L_ii over the first K diagonal entries; NaN where one is not positive."""
    idx = tl.arange(0, KP)
    diag = _diagonal(L, KP)
    logs = tl.where(diag > 0.0, tl.log(tl.where(diag > 0.0, diag, 1.0)), float("nan"))
    return tl.sum(tl.where(idx[None, :] < K, logs, 0.0), axis=1)


@triton.jit
def _load_vectors(ptr, stride, rows, active, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK, KP] tile of the K-vectors at ptr + row * stride (stride 0: one shared vector)."""
    idx = tl.arange(0, KP)
    mask = active[:, None] & (idx[None, :] < K)
    return tl.load(ptr + rows[:, None] * stride + idx[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _lower_offsets(K: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr):
    """[1, KP, KP] offsets of the entries (i, j) within a matrix: row-major K x K, or packed,
    the lower triangle row by row (entry (i, j <= i) at i(i+1)/2 + j)."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    if PACKED:
        return i * (i + 1) // 2 + j
    return i * K + j


@triton.jit
def _load_lower(ptr, stride, rows, active, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr,
                PACKED: tl.constexpr = False):
    """[BLOCK, KP, KP] tile of the lower triangles of the K x K matrices at ptr + row * stride
    (stride 0: one shared matrix), row-major or PACKED; the rest is zero."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    mask = active[:, None, None] & (i < K) & (j <= i)
    offsets = _lower_offsets(K, KP, PACKED)
    return tl.load(ptr + rows[:, None, None] * stride + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_matrices(ptr, rows, active, M, K: tl.constexpr, KP: tl.constexpr, PACKED: tl.constexpr = False):
    """Stores a [BLOCK, KP, KP] tile as contiguous row-major K x K matrices, one per row, or
    PACKED, their lower triangles (K(K+1)/2 entries per row)."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    mask = active[:, None, None] & (i < K) & ((j <= i) if PACKED else (j < K))
    row_size: tl.constexpr = K * (K + 1) // 2 if PACKED else K * K
    offsets = _lower_offsets(K, KP, PACKED)
    tl.store(ptr + rows[:, None, None] * row_size + offsets, M.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_vectors(ptr, rows, active, x, K: tl.constexpr, KP: tl.constexpr):
    idx = tl.arange(0, KP)
    mask = active[:, None] & (idx[None, :] < K)
    tl.store(ptr + rows[:, None] * K + idx[None, :], x.to(ptr.dtype.element_ty), mask=mask)
