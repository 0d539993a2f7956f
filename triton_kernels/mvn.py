"""Triton kernels of the full-covariance Gaussian log-prob ops and their backward ops.

Each program takes BLOCK samples; operands are rows ``stride`` apart, or shared by the batch
(stride 0: every sample of the block reads the same matrix). The matrix operand (MATRIX) is a
scale_tril, a covariance, factorised in registers (``_cholesky``) and never written out, or a
policy head's packed scale_tril, unpacked in registers (packed.py's diagonal transform plus
min_diag) with its gradient written back packed. Gradients of shared operands are summed per
program into one row of ``partials``; the launcher adds the rows in a second, deterministic
pass and applies the parameter terms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .packed import _diag_entry
from .squashed import NO_SQUASH, _pre_tanh, _tanh_terms, _value_gradient
from .linalg import (
    _cholesky,
    _diagonal,
    _load_lower,
    _load_vectors,
    _solve_lower,
    _solve_lower_transposed,
    _solve_lower_transposed_columns,
    _store_matrices,
    _store_vectors,
    _sum_log_diagonal,
    _transpose,
)

LOG_2PI = tl.constexpr(1.8378770664093454835606594728112)
# The matrix operand, for MATRIX.
SCALE_TRIL = tl.constexpr(0)
COVARIANCE = tl.constexpr(1)
PACKED = tl.constexpr(2)
# Integer arguments Triton would otherwise specialise on (== 1, divisible by 16), each value
# a separate compilation of kernels that take tens of seconds to compile: the batch size, the
# strides (0 for a shared operand) and the backward's output switches.
FORWARD_RUNTIME_INTEGERS = ["n", "value_stride", "loc_stride", "matrix_stride"]
BACKWARD_RUNTIME_INTEGERS = FORWARD_RUNTIME_INTEGERS + ["VALUE_ROWS", "LOC_ROWS", "MATRIX_ROWS", "REDUCE"]
# The switch of an upstream gradient of the log-det, in the backward of the kernels whose
# factor is given (scale_tril, packed); the packed kernels' min_diag, a runtime value as in
# packed.py's kernels.
LOG_DET_BACKWARD_RUNTIME_ARGUMENTS = ["GRAD_LOG_DET"]
PACKED_RUNTIME_ARGUMENTS = ["min_diag"]
PACKED_BACKWARD_RUNTIME_ARGUMENTS = PACKED_RUNTIME_ARGUMENTS + LOG_DET_BACKWARD_RUNTIME_ARGUMENTS


@triton.jit
def _block_rows(n, BLOCK: tl.constexpr):
    """This program's sample indices (int64, so that row * stride cannot overflow) and which
    of them are in the batch."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return rows, rows < n


@triton.jit
def _factor_block(matrix_ptr, matrix_stride, rows, active, min_diag, MATRIX: tl.constexpr, DIAG: tl.constexpr,
                  K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """The block's Cholesky factors (a scale_tril as read, a covariance factorised, a packed
    factor unpacked: L_ii = transform(x_ii) + min_diag), whether each is valid, and dL_ii/dx_ii
    ([BLOCK, KP]; 1 unless packed). Samples past the batch get the identity, so that they
    compute finite values that are never stored."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    eye = (i == j).to(ACC)
    M = _load_lower(matrix_ptr, matrix_stride, rows, active, K, KP, ACC, MATRIX == PACKED)
    M = tl.where(active[:, None, None], M, eye)
    ok = active | ~active
    diag_derivative = tl.full([M.shape[0], KP], 1.0, ACC)
    if MATRIX == COVARIANCE:
        L, ok = _cholesky(M, K, KP)
    elif MATRIX == PACKED:
        diag, diag_derivative = _diag_entry(_diagonal(M, KP), DIAG)
        L = tl.where((i == j) & (i < K) & active[:, None, None], (diag + min_diag)[:, :, None], M)
    else:
        L = M
    return L, ok, diag_derivative


@triton.jit
def _squashed_differences(value_ptr, value_stride, loc_ptr, loc_stride, rows, active, SQUASH: tl.constexpr,
                          EPS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """(x, d = u - mu, sum_i log(1 - tanh(u_i)^2)) with u the value x, or squashed, its pre-tanh
    value (x itself, or atanh of the clamped action); the Jacobian sum is 0 unsquashed."""
    x = _load_vectors(value_ptr, value_stride, rows, active, K, KP, ACC)
    u = _pre_tanh(x, SQUASH, EPS)
    jacobian = tl.zeros_like(tl.sum(u, axis=1))
    if SQUASH != NO_SQUASH:
        tanh, log_det, derivative = _tanh_terms(u)
        idx = tl.arange(0, KP)
        jacobian = tl.sum(tl.where(idx[None, :] < K, log_det, 0.0), axis=1)
    return x, u - _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC), jacobian


@triton.jit
def _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          log_det_ptr, n, min_diag, MATRIX: tl.constexpr, DIAG: tl.constexpr, SQUASH: tl.constexpr,
                          EPS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                          ACC: tl.constexpr):
    """Stores the log-probs at out_ptr and, for a given factor (scale_tril, packed),
    sum_i log L_ii at log_det_ptr (unused for a covariance)."""
    rows, active = _block_rows(n, BLOCK)
    x, d, jacobian = _squashed_differences(value_ptr, value_stride, loc_ptr, loc_stride, rows, active, SQUASH, EPS,
                                           K, KP, ACC)
    L, ok, _ = _factor_block(matrix_ptr, matrix_stride, rows, active, min_diag, MATRIX, DIAG, K, KP, ACC)
    z = _solve_lower(L, d, K, KP)
    log_det = _sum_log_diagonal(L, K, KP)
    log_prob = -0.5 * tl.sum(z * z, axis=1) - log_det - 0.5 * K * LOG_2PI - jacobian
    log_prob = tl.where(ok, log_prob, float("nan"))
    tl.store(out_ptr + rows, log_prob.to(out_ptr.dtype.element_ty), mask=active)
    if MATRIX != COVARIANCE:
        tl.store(log_det_ptr + rows, log_det.to(log_det_ptr.dtype.element_ty), mask=active)


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTEGERS)
def _mvn_tril_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride,
                                      out_ptr, log_det_ptr, n, K: tl.constexpr, KP: tl.constexpr,
                                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    """log N(x; mu, L L^T) = -1/2 ||z||^2 - sum_i log L_ii - (K/2) log 2 pi,  z = L^{-1}(x - mu);
    also stores sum_i log L_ii at log_det_ptr."""
    _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          log_det_ptr, n, 0.0, SCALE_TRIL, 0, NO_SQUASH, 0.0, K, KP, BLOCK, ACC)


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTEGERS)
def _mvn_cov_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride,
                                     out_ptr, n, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                                     ACC: tl.constexpr):
    """log N(x; mu, Sigma) with L = chol(Sigma) computed in registers; NaN for a sample whose
    Sigma is not positive-definite."""
    _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          out_ptr, n, 0.0, COVARIANCE, 0, NO_SQUASH, 0.0, K, KP, BLOCK, ACC)


@triton.jit
def _mvn_log_prob_backward(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, min_diag,
                           MATRIX: tl.constexpr, DIAG: tl.constexpr, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE,
                           GRAD_LOG_DET, SQUASH: tl.constexpr, EPS: tl.constexpr, K: tl.constexpr,
                           KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """GRAD_LOG_DET (given factors, per sample): h at grad_log_det_ptr is the upstream gradient
    of sum_i log L_ii, and the diagonal term of d/dL is -(g - h) diag(1/L_ii). The partials
    keep sum g: the launcher adds a shared factor's log-det term itself."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    rows, active = _block_rows(n, BLOCK)
    g = tl.load(grad_ptr + rows, mask=active, other=0.0).to(ACC)
    x, d, jacobian = _squashed_differences(value_ptr, value_stride, loc_ptr, loc_stride, rows, active, SQUASH, EPS, K, KP,
                                    ACC)
    L, ok, diag_derivative = _factor_block(matrix_ptr, matrix_stride, rows, active, min_diag, MATRIX, DIAG, K, KP,
                                           ACC)
    g = tl.where(ok, g, float("nan"))
    z = _solve_lower(L, d, K, KP)
    w = _solve_lower_transposed(L, z, K, KP)
    gw = tl.where(active[:, None], g[:, None] * w, 0.0)
    if VALUE_ROWS:
        d_u = -gw
        if SQUASH != NO_SQUASH:
            tanh, log_det, derivative = _tanh_terms(_pre_tanh(x, SQUASH, EPS))
            d_u += 2.0 * g[:, None] * tanh
        _store_vectors(value_grad_ptr, rows, active, _value_gradient(x, d_u, SQUASH, EPS), K, KP)
    if LOC_ROWS:
        _store_vectors(loc_grad_ptr, rows, active, gw, K, KP)
    # The per-sample term of the matrix gradient, without its parameter term:
    # tril(g w z^T) for a scale_tril (packed too), g w w^T (exactly symmetric) for a covariance.
    if MATRIX == COVARIANCE:
        outer = g[:, None, None] * (w[:, :, None] * w[:, None, :])
    else:
        outer = tl.where(j <= i, gw[:, :, None] * z[:, None, :], 0.0)
    outer = tl.where(active[:, None, None], outer, 0.0)
    if MATRIX_ROWS:
        if MATRIX == COVARIANCE:
            # Sigma^{-1} = L^{-T} L^{-1}: L^{-T} = L^{-T} I, then L^{-T} (L^{-T})^T.
            eye = tl.where(active[:, None, None], (i == j).to(ACC), 0.0)
            inverse_transposed = _solve_lower_transposed_columns(L, eye, K, KP)
            sigma_inv = _solve_lower_transposed_columns(L, _transpose(inverse_transposed, KP), K, KP)
            sigma_inv = tl.where(j <= i, sigma_inv, _transpose(sigma_inv, KP))
            grad_matrix = 0.5 * (outer - g[:, None, None] * sigma_inv)
        else:
            diag = tl.where(idx[None, :] < K, _diagonal(L, KP), 1.0)
            diag_coefficient = g
            if GRAD_LOG_DET:
                diag_coefficient = g - tl.load(grad_log_det_ptr + rows, mask=active, other=0.0).to(ACC)
            grad_matrix = outer - tl.where(i == j, (diag_coefficient[:, None] / diag)[:, :, None], 0.0)
            if MATRIX == PACKED:
                grad_matrix = tl.where(i == j, grad_matrix * diag_derivative[:, :, None], grad_matrix)
        _store_matrices(matrix_grad_ptr, rows, active, grad_matrix, K, KP, MATRIX == PACKED)
    if REDUCE:
        # Row of this program: sum g w (K), the sum of the per-sample matrix terms (K * K),
        # and sum g.
        row = partials_ptr + tl.program_id(0).to(tl.int64) * (K + K * K + 1)
        tl.store(row + idx, tl.sum(gw, axis=0), mask=idx < K)
        matrix_mask = (idx[:, None] < K) & (idx[None, :] < K)
        tl.store(row + K + idx[:, None] * K + idx[None, :], tl.sum(outer, axis=0), mask=matrix_mask)
        tl.store(row + K + K * K, tl.sum(tl.where(active, g, 0.0), axis=0))


@triton.jit(do_not_specialize=BACKWARD_RUNTIME_INTEGERS + LOG_DET_BACKWARD_RUNTIME_ARGUMENTS)
def _mvn_tril_log_prob_backward_kernel(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride,
                                       matrix_ptr, matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr,
                                       partials_ptr, n, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, GRAD_LOG_DET,
                                       K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """With z = L^{-1}(x - mu), w = L^{-T} z and upstream gradient g:
    d/dx = -g w,  d/dmu = g w,  d/dL = g (tril(w z^T) - diag(1/L_ii)).
    VALUE_ROWS, LOC_ROWS, MATRIX_ROWS: write that gradient per sample; REDUCE: write this
    program's sums of the per-sample terms to its row of partials. GRAD_LOG_DET: h at
    grad_log_det_ptr, the upstream gradient of the forward's sum_i log L_ii, adds h / L_ii on
    the diagonal."""
    _mvn_log_prob_backward(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, 0.0,
                           SCALE_TRIL, 0, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, GRAD_LOG_DET, NO_SQUASH, 0.0, K,
                           KP, BLOCK, ACC)


@triton.jit(do_not_specialize=BACKWARD_RUNTIME_INTEGERS)
def _mvn_cov_log_prob_backward_kernel(grad_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                                      matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr,
                                      n, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, K: tl.constexpr, KP: tl.constexpr,
                                      BLOCK: tl.constexpr, ACC: tl.constexpr):
    """With L = chol(Sigma), w = Sigma^{-1}(x - mu) and upstream gradient g:
    d/dx = -g w,  d/dmu = g w,  d/dSigma = g/2 (w w^T - Sigma^{-1}), symmetric."""
    _mvn_log_prob_backward(grad_ptr, grad_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, 0.0,
                           COVARIANCE, 0, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, 0, NO_SQUASH, 0.0, K, KP, BLOCK,
                           ACC)


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTEGERS)
def _squashed_tril_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride,
                                           out_ptr, log_det_ptr, n, SQUASH: tl.constexpr, EPS: tl.constexpr,
                                           K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                                           ACC: tl.constexpr):
    """log N(u; mu, L L^T) - sum_i log(1 - tanh(u_i)^2), u the pre-tanh value (SQUASH =
    FROM_PRE_TANH) or atanh of the action clamped to [-1 + EPS, 1 - EPS] (FROM_ACTION); also
    stores sum_i log L_ii at log_det_ptr."""
    _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          log_det_ptr, n, 0.0, SCALE_TRIL, 0, SQUASH, EPS, K, KP, BLOCK, ACC)


@triton.jit(do_not_specialize=BACKWARD_RUNTIME_INTEGERS + LOG_DET_BACKWARD_RUNTIME_ARGUMENTS)
def _squashed_tril_log_prob_backward_kernel(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr,
                                            loc_stride, matrix_ptr, matrix_stride, value_grad_ptr, loc_grad_ptr,
                                            matrix_grad_ptr, partials_ptr, n, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS,
                                            REDUCE, GRAD_LOG_DET, SQUASH: tl.constexpr, EPS: tl.constexpr,
                                            K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                                            ACC: tl.constexpr):
    """As _mvn_tril_log_prob_backward_kernel at u (GRAD_LOG_DET too), except
    d/du = -g w + g 2 tanh(u), and for an action d/dx = d/du / (1 - x^2) inside the clamp
    (0 where it clamps)."""
    _mvn_log_prob_backward(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, 0.0,
                           SCALE_TRIL, 0, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, GRAD_LOG_DET, SQUASH, EPS, K,
                           KP, BLOCK, ACC)


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTEGERS + PACKED_RUNTIME_ARGUMENTS)
def _mvn_packed_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride,
                                        out_ptr, log_det_ptr, n, min_diag, DIAG: tl.constexpr, K: tl.constexpr,
                                        KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """_mvn_tril_log_prob_forward_kernel with L unpacked from the K(K+1)/2 values x of a sample:
    L_ij = x[i(i+1)/2 + j] below the diagonal, L_ii = transform(x[i(i+1)/2 + i]) + min_diag."""
    _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          log_det_ptr, n, min_diag, PACKED, DIAG, NO_SQUASH, 0.0, K, KP, BLOCK, ACC)


@triton.jit(do_not_specialize=BACKWARD_RUNTIME_INTEGERS + PACKED_BACKWARD_RUNTIME_ARGUMENTS)
def _mvn_packed_log_prob_backward_kernel(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride,
                                         matrix_ptr, matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr,
                                         partials_ptr, n, min_diag, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE,
                                         GRAD_LOG_DET, DIAG: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                                         BLOCK: tl.constexpr, ACC: tl.constexpr):
    """As _mvn_tril_log_prob_backward_kernel, the matrix gradient written packed: d/dx at the
    position of (i, j < i) is d/dL_ij, and at (i, i) it is d/dL_ii * dL_ii/dx_ii. A program's
    partials are the scale_tril's (the launcher packs their sum). GRAD_LOG_DET as there."""
    _mvn_log_prob_backward(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, min_diag,
                           PACKED, DIAG, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, GRAD_LOG_DET, NO_SQUASH, 0.0, K,
                           KP, BLOCK, ACC)


@triton.jit(do_not_specialize=FORWARD_RUNTIME_INTEGERS + PACKED_RUNTIME_ARGUMENTS)
def _squashed_packed_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                                             matrix_stride, out_ptr, log_det_ptr, n, min_diag, DIAG: tl.constexpr,
                                             SQUASH: tl.constexpr, EPS: tl.constexpr, K: tl.constexpr,
                                             KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """_squashed_tril_log_prob_forward_kernel with L unpacked as in
    _mvn_packed_log_prob_forward_kernel."""
    _mvn_log_prob_forward(value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr, matrix_stride, out_ptr,
                          log_det_ptr, n, min_diag, PACKED, DIAG, SQUASH, EPS, K, KP, BLOCK, ACC)


@triton.jit(do_not_specialize=BACKWARD_RUNTIME_INTEGERS + PACKED_BACKWARD_RUNTIME_ARGUMENTS)
def _squashed_packed_log_prob_backward_kernel(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr,
                                              loc_stride, matrix_ptr, matrix_stride, value_grad_ptr, loc_grad_ptr,
                                              matrix_grad_ptr, partials_ptr, n, min_diag, VALUE_ROWS, LOC_ROWS,
                                              MATRIX_ROWS, REDUCE, GRAD_LOG_DET, DIAG: tl.constexpr,
                                              SQUASH: tl.constexpr, EPS: tl.constexpr,
                                              K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                                              ACC: tl.constexpr):
    """_squashed_tril_log_prob_backward_kernel with the packed factor of
    _mvn_packed_log_prob_backward_kernel (GRAD_LOG_DET too)."""
    _mvn_log_prob_backward(grad_ptr, grad_log_det_ptr, value_ptr, value_stride, loc_ptr, loc_stride, matrix_ptr,
                           matrix_stride, value_grad_ptr, loc_grad_ptr, matrix_grad_ptr, partials_ptr, n, min_diag,
                           PACKED, DIAG, VALUE_ROWS, LOC_ROWS, MATRIX_ROWS, REDUCE, GRAD_LOG_DET, SQUASH, EPS, K,
                           KP, BLOCK, ACC)
