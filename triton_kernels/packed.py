"""Triton kernels of packed_to_scale_tril: a policy head's packed lower triangle (K(K+1)/2
values per sample, row by row as ``torch.tril_indices(K, K)`` lists them) into its K x K
scale_tril, and the gradient back; and of packed_scale_tril_log_det, Σᵢ log L_ii from the
diagonal entries alone, and its gradient. csrc/math/packed_math.h's math, written again in
Triton:

  softplus   L_ii = max(x, 0) + log1p(e^{-|x|}) + min_diag,   dL_ii/dx = sigmoid(x)
  exp        L_ii = e^x + min_diag,                            dL_ii/dx = e^x
  none       L_ii = x + min_diag,                              dL_ii/dx = 1

and d log L_ii / dx = (dL_ii/dx) / L_ii. Every kernel is elementwise over its output, BLOCK
entries (or samples) a program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .squashed import _log1p

# DIAG, the diagonal transform (the order of csrc/math/packed_math.h's DiagTransform).
DIAG_NONE = tl.constexpr(0)
DIAG_SOFTPLUS = tl.constexpr(1)
DIAG_EXP = tl.constexpr(2)


@triton.jit
def _diag_entry(x, DIAG: tl.constexpr):
    """(transform(x), its derivative) of a diagonal entry; min_diag is the caller's."""
    if DIAG == DIAG_SOFTPLUS:
        e = tl.exp(-tl.abs(x))
        value = tl.maximum(x, 0.0) + _log1p(e)
        derivative = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)
    elif DIAG == DIAG_EXP:
        value = tl.exp(x)
        derivative = value
    else:
        value = x
        derivative = tl.full(x.shape, 1.0, x.dtype)
    return value, derivative


@triton.jit(do_not_specialize=["entries", "min_diag"])
def _packed_to_scale_tril_forward_kernel(
    packed_ptr, L_ptr, entries, min_diag, K: tl.constexpr, DIAG: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """L[b, i, j] = x[b, i(i+1)/2 + j] below the diagonal, transform(x) + min_diag on it, 0 above."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b = e // (K * K)
    i = (e // K) % K
    j = e % K
    lower = j <= i
    x = tl.load(packed_ptr + b * (K * (K + 1) // 2) + i * (i + 1) // 2 + j, mask=(e < entries) & lower, other=0.0)
    x = x.to(ACC)
    diag, _ = _diag_entry(x, DIAG)
    out = tl.where(i == j, diag + min_diag, tl.where(lower, x, 0.0))
    tl.store(L_ptr + e, out.to(L_ptr.dtype.element_ty), mask=e < entries)


@triton.jit
def _packed_position(e, N: tl.constexpr):
    """(sample b, packed position p, row i of p) of flat packed entries e: i(i+1)/2 <= p <
    (i+1)(i+2)/2, from a square root corrected by one step either way."""
    b = e // N
    p = e % N
    i = ((tl.sqrt(8.0 * p.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    return b, p, tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)


@triton.jit(do_not_specialize=["entries"])
def _packed_to_scale_tril_backward_kernel(
    grad_ptr, packed_ptr, out_ptr, entries, K: tl.constexpr, DIAG: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """d/dx[b, p] = dL[b, i, j] at the (i, j) of packed position p, times dL_ii/dx on the
    diagonal."""
    N: tl.constexpr = K * (K + 1) // 2
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < entries
    b, p, i = _packed_position(e, N)
    j = p - i * (i + 1) // 2
    g = tl.load(grad_ptr + (b * K + i) * K + j, mask=mask, other=0.0).to(ACC)
    x = tl.load(packed_ptr + e, mask=mask, other=0.0).to(ACC)
    _, derivative = _diag_entry(x, DIAG)
    tl.store(out_ptr + e, tl.where(i == j, g * derivative, g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["entries", "min_diag"])
def _packed_scale_tril_log_det_forward_kernel(
    packed_ptr, out_ptr, entries, min_diag, K: tl.constexpr, DIAG: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    """log_det[b] = Σᵢ log(transform(x[b, i(i+1)/2 + i]) + min_diag), over `entries` samples."""
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = b < entries
    log_det = tl.zeros((BLOCK,), ACC)
    for i in tl.static_range(K):
        x = tl.load(packed_ptr + b * (K * (K + 1) // 2) + i * (i + 1) // 2 + i, mask=mask, other=1.0).to(ACC)
        diag, _ = _diag_entry(x, DIAG)
        log_det += tl.log(diag + min_diag)
    tl.store(out_ptr + b, log_det.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["entries", "min_diag"])
def _packed_scale_tril_log_det_backward_kernel(
    grad_ptr, packed_ptr, out_ptr, entries, min_diag, K: tl.constexpr, DIAG: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr
):
    """d/dx[b, p] = grad[b] (dL_ii/dx) / L_ii at a diagonal position p = i(i+1)/2 + i, 0 elsewhere."""
    N: tl.constexpr = K * (K + 1) // 2
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < entries
    b, p, i = _packed_position(e, N)
    on_diagonal = p == i * (i + 1) // 2 + i
    g = tl.load(grad_ptr + b, mask=mask & on_diagonal, other=0.0).to(ACC)
    x = tl.load(packed_ptr + e, mask=mask, other=1.0).to(ACC)
    diag, derivative = _diag_entry(x, DIAG)
    d = tl.where(on_diagonal, g * derivative / (diag + min_diag), 0.0)
    tl.store(out_ptr + e, d.to(out_ptr.dtype.element_ty), mask=mask)
