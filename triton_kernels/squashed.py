"""Triton kernels of the diagonal and tanh-squashed Gaussian ops, and the tanh math they share
with the squashed full-covariance log-prob (triton_kernels/mvn.py).

The math is csrc/math/squash_math.h's, written again in Triton (which cannot call it):
with t = e^{-2|u|},
  tanh|u| = -expm1(-2|u|) / (2 + expm1(-2|u|)),
  log(1 - tanh(u)^2) = log1p(-tanh^2) for |u| < 0.625, else 2 (log 2 - |u| - log1p(t)),
  1 - tanh(u)^2      = 1 - tanh^2       for |u| < 0.625, else 4 t / (1 + t)^2,
and an action y becomes u = atanh(clamp(y, -1 + eps, 1 - eps)) = 1/2 log1p(2c / (1 - c)).
expm1 and log1p take Kahan's and Goldberg's corrections of exp and log, which keeps them
accurate without libdevice (which the interpreter lacks).

Diagonal ops are one program per BLOCK samples, each sample a row of KP entries (K real);
operands are rows ``stride`` apart, or shared (stride 0). Backward kernels write per-sample
gradient rows; the launcher sums the rows of an operand shared by the batch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .linalg import _diagonal, _load_lower, _load_vectors, _store_matrices, _store_vectors

LOG_2 = tl.constexpr(0.69314718055994530941723212145818)
LOG_2PI = tl.constexpr(1.8378770664093454835606594728112)
# Where the value comes from, for SQUASH: a plain Gaussian, the pre-tanh value, the action.
NO_SQUASH = tl.constexpr(0)
FROM_PRE_TANH = tl.constexpr(1)
FROM_ACTION = tl.constexpr(2)
# Runtime integers, as in mvn.py: not specialised on.
DIAG_RUNTIME_INTEGERS = ["n", "value_stride", "loc_stride", "scale_stride"]
DIAG_BACKWARD_RUNTIME_INTEGERS = DIAG_RUNTIME_INTEGERS + ["VALUE_ROWS", "LOC_ROWS", "SCALE_ROWS"]
RSAMPLE_RUNTIME_INTEGERS = ["n", "loc_stride", "scale_stride", "eps_stride"]
RSAMPLE_BACKWARD_RUNTIME_INTEGERS = RSAMPLE_RUNTIME_INTEGERS + [
    "HAS_GRAD_ACTION", "HAS_GRAD_PRE_TANH", "HAS_GRAD_LOG_PROB", "LOC_ROWS", "SCALE_ROWS", "EPS_ROWS",
]


@triton.jit
def _log1p(x):
    """log(1 + x), Goldberg's correction: log(u) x / (u - 1) with u = 1 + x rounded."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(tl.where(d == 0.0, 2.0, u)) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _tanh_terms(u):
    """(tanh(u), log(1 - tanh(u)^2), 1 - tanh(u)^2), finite and accurate for every u."""
    a = tl.abs(u)
    t = tl.exp(-2.0 * a)
    # Kahan: expm1(x) = (e^x - 1) x / log(e^x), exact where e^x rounds to 1.
    log_t = tl.log(tl.where(t == 1.0, 0.5, t))
    expm1 = tl.where(t == 1.0, -2.0 * a, (t - 1.0) * (-2.0 * a) / tl.where(t == 1.0, 1.0, log_t))
    tanh_abs = -expm1 / (2.0 + expm1)
    small = a < 0.625
    # Both sides are evaluated: the small side on the small arguments only, so that it never
    # takes log(0).
    tanh_small = tl.where(small, tanh_abs, 0.0)
    log_det = tl.where(small, _log1p(-tanh_small * tanh_small), 2.0 * (LOG_2 - a - _log1p(t)))
    derivative = tl.where(small, 1.0 - tanh_abs * tanh_abs, 4.0 * t / ((1.0 + t) * (1.0 + t)))
    return tl.where(u < 0.0, -tanh_abs, tanh_abs), log_det, derivative


@triton.jit
def _clamp_bound(x, EPS: tl.constexpr):
    """1 - EPS in x's dtype. Written as the constexpr -1.0 + EPS, the bound would be a float32
    constant, which rounds float64's 1 - 2^-52 to 1: atanh(±1) = ±inf."""
    return tl.full(x.shape, 1.0, x.dtype) - EPS


@triton.jit
def _pre_tanh(x, SQUASH: tl.constexpr, EPS: tl.constexpr):
    """u of a value x: x itself, or atanh of the action x clamped to [-1 + EPS, 1 - EPS]."""
    if SQUASH == FROM_ACTION:
        bound = _clamp_bound(x, EPS)
        c = tl.minimum(tl.maximum(x, -bound), bound)
        return 0.5 * _log1p(2.0 * c / (1.0 - c))
    else:
        return x


@triton.jit
def _value_gradient(x, d_u, SQUASH: tl.constexpr, EPS: tl.constexpr):
    """d/dx from d/du: times 1 / (1 - x^2) inside the clamp, 0 where it clamps (actions)."""
    if SQUASH == FROM_ACTION:
        bound = _clamp_bound(x, EPS)
        inside = (x >= -bound) & (x <= bound)
        return tl.where(inside, d_u / ((1.0 - x) * (1.0 + x)), 0.0)
    else:
        return d_u


@triton.jit
def _rows(n, BLOCK: tl.constexpr, KP: tl.constexpr, K: tl.constexpr):
    """This program's sample indices (int64), which are in the batch, and the entry mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = rows < n
    idx = tl.arange(0, KP)
    return rows, active, active[:, None] & (idx[None, :] < K)


@triton.jit
def _load_scale(ptr, stride, rows, active, entries, K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr):
    """A [BLOCK, KP] tile of scales, 1 in the padding (so that its logs and divisions stay finite)."""
    return tl.where(entries, _load_vectors(ptr, stride, rows, active, K, KP, ACC), 1.0)


# --- diag_normal_log_prob and squashed_diag_log_prob --------------------------------------------


@triton.jit(do_not_specialize=DIAG_RUNTIME_INTEGERS)
def _diag_log_prob_forward_kernel(value_ptr, value_stride, loc_ptr, loc_stride, scale_ptr, scale_stride, out_ptr, n,
                                  SQUASH: tl.constexpr, EPS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                                  BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sum_i [-1/2 ((u_i - mu_i) / s_i)^2 - log s_i] - (K/2) log 2 pi [- sum_i log(1 - tanh(u_i)^2)],
    u the value (unsquashed, or given as the pre-tanh value) or atanh of the clamped action."""
    rows, active, entries = _rows(n, BLOCK, KP, K)
    x = _load_vectors(value_ptr, value_stride, rows, active, K, KP, ACC)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    s = _load_scale(scale_ptr, scale_stride, rows, active, entries, K, KP, ACC)
    u = _pre_tanh(x, SQUASH, EPS)
    z = (u - m) / s
    term = -0.5 * z * z - tl.log(s)
    if SQUASH != NO_SQUASH:
        tanh, log_det, derivative = _tanh_terms(u)
        term -= log_det
    log_prob = tl.sum(tl.where(entries, term, 0.0), axis=1) - 0.5 * K * LOG_2PI
    tl.store(out_ptr + rows, log_prob.to(out_ptr.dtype.element_ty), mask=active)


@triton.jit(do_not_specialize=DIAG_BACKWARD_RUNTIME_INTEGERS)
def _diag_log_prob_backward_kernel(grad_ptr, value_ptr, value_stride, loc_ptr, loc_stride, scale_ptr, scale_stride,
                                   value_grad_ptr, loc_grad_ptr, scale_grad_ptr, n, VALUE_ROWS, LOC_ROWS, SCALE_ROWS,
                                   SQUASH: tl.constexpr, EPS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    """With z = (u - mu) / s and upstream gradient g, per entry:
    d/dmu = g z / s,  d/ds = g (z^2 - 1) / s,  d/du = -g z / s [+ g 2 tanh(u)], d/dx from d/du."""
    rows, active, entries = _rows(n, BLOCK, KP, K)
    g = tl.load(grad_ptr + rows, mask=active, other=0.0).to(ACC)[:, None]
    x = _load_vectors(value_ptr, value_stride, rows, active, K, KP, ACC)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    s = _load_scale(scale_ptr, scale_stride, rows, active, entries, K, KP, ACC)
    u = _pre_tanh(x, SQUASH, EPS)
    z = (u - m) / s
    d_loc = g * z / s
    if VALUE_ROWS:
        d_u = -d_loc
        if SQUASH != NO_SQUASH:
            tanh, log_det, derivative = _tanh_terms(u)
            d_u += 2.0 * g * tanh
        _store_vectors(value_grad_ptr, rows, active, _value_gradient(x, d_u, SQUASH, EPS), K, KP)
    if LOC_ROWS:
        _store_vectors(loc_grad_ptr, rows, active, d_loc, K, KP)
    if SCALE_ROWS:
        _store_vectors(scale_grad_ptr, rows, active, g * (z * z - 1.0) / s, K, KP)


# --- squashed_diag_rsample_log_prob ---------------------------------------------------------------


@triton.jit(do_not_specialize=RSAMPLE_RUNTIME_INTEGERS)
def _squashed_diag_rsample_log_prob_forward_kernel(loc_ptr, loc_stride, scale_ptr, scale_stride, eps_ptr, eps_stride,
                                                   action_ptr, pre_tanh_ptr, log_prob_ptr, n, K: tl.constexpr,
                                                   KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """u = mu + s eps, action = tanh(u),
    log_prob = sum_i [-1/2 eps_i^2 - log s_i - log(1 - tanh(u_i)^2)] - (K/2) log 2 pi."""
    rows, active, entries = _rows(n, BLOCK, KP, K)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    s = _load_scale(scale_ptr, scale_stride, rows, active, entries, K, KP, ACC)
    e = _load_vectors(eps_ptr, eps_stride, rows, active, K, KP, ACC)
    u = m + s * e
    tanh, log_det, derivative = _tanh_terms(u)
    _store_vectors(action_ptr, rows, active, tanh, K, KP)
    _store_vectors(pre_tanh_ptr, rows, active, u, K, KP)
    term = tl.where(entries, -0.5 * e * e - tl.log(s) - log_det, 0.0)
    tl.store(log_prob_ptr + rows, (tl.sum(term, axis=1) - 0.5 * K * LOG_2PI).to(log_prob_ptr.dtype.element_ty),
             mask=active)


@triton.jit
def _rsample_upstream(grad_action_ptr, grad_pre_tanh_ptr, grad_log_prob_ptr, rows, active, HAS_GRAD_ACTION,
                      HAS_GRAD_PRE_TANH, HAS_GRAD_LOG_PROB, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                      ACC: tl.constexpr):
    """The upstream gradients of action, u (per-sample rows) and log-prob; zero where absent."""
    g_action = tl.zeros((BLOCK, KP), ACC)
    g_pre_tanh = tl.zeros((BLOCK, KP), ACC)
    g_log_prob = tl.zeros((BLOCK,), ACC)
    if HAS_GRAD_ACTION:
        g_action = _load_vectors(grad_action_ptr, K, rows, active, K, KP, ACC)
    if HAS_GRAD_PRE_TANH:
        g_pre_tanh = _load_vectors(grad_pre_tanh_ptr, K, rows, active, K, KP, ACC)
    if HAS_GRAD_LOG_PROB:
        g_log_prob = tl.load(grad_log_prob_ptr + rows, mask=active, other=0.0).to(ACC)
    return g_action, g_pre_tanh, g_log_prob


@triton.jit(do_not_specialize=RSAMPLE_BACKWARD_RUNTIME_INTEGERS)
def _squashed_diag_rsample_log_prob_backward_kernel(grad_action_ptr, grad_pre_tanh_ptr, grad_log_prob_ptr, loc_ptr,
                                                    loc_stride, scale_ptr, scale_stride, eps_ptr, eps_stride,
                                                    loc_grad_ptr, scale_grad_ptr, eps_grad_ptr, n, HAS_GRAD_ACTION,
                                                    HAS_GRAD_PRE_TANH, HAS_GRAD_LOG_PROB, LOC_ROWS, SCALE_ROWS,
                                                    EPS_ROWS, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
                                                    ACC: tl.constexpr):
    """With g_u = g_action (1 - tanh(u)^2) + g_pre_tanh + g_log_prob 2 tanh(u) per entry:
    d/dmu = g_u,  d/ds = g_u eps - g_log_prob / s,  d/deps = g_u s - g_log_prob eps."""
    rows, active, entries = _rows(n, BLOCK, KP, K)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    s = _load_scale(scale_ptr, scale_stride, rows, active, entries, K, KP, ACC)
    e = _load_vectors(eps_ptr, eps_stride, rows, active, K, KP, ACC)
    g_action, g_pre_tanh, g_log_prob = _rsample_upstream(grad_action_ptr, grad_pre_tanh_ptr, grad_log_prob_ptr, rows,
                                                         active, HAS_GRAD_ACTION, HAS_GRAD_PRE_TANH,
                                                         HAS_GRAD_LOG_PROB, K, KP, BLOCK, ACC)
    tanh, log_det, derivative = _tanh_terms(m + s * e)
    g_u = g_action * derivative + g_pre_tanh + g_log_prob[:, None] * 2.0 * tanh
    if LOC_ROWS:
        _store_vectors(loc_grad_ptr, rows, active, g_u, K, KP)
    if SCALE_ROWS:
        _store_vectors(scale_grad_ptr, rows, active, g_u * e - g_log_prob[:, None] / s, K, KP)
    if EPS_ROWS:
        _store_vectors(eps_grad_ptr, rows, active, g_u * s - g_log_prob[:, None] * e, K, KP)


# --- squashed_tril_rsample_log_prob ---------------------------------------------------------------


@triton.jit(do_not_specialize=RSAMPLE_RUNTIME_INTEGERS)
def _squashed_tril_rsample_log_prob_forward_kernel(loc_ptr, loc_stride, scale_ptr, scale_stride, eps_ptr, eps_stride,
                                                   action_ptr, pre_tanh_ptr, log_prob_ptr, n, K: tl.constexpr,
                                                   KP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """u = mu + L eps, action = tanh(u), log_prob = -1/2 ||eps||^2 - sum_i log L_ii - (K/2) log 2 pi
    - sum_i log(1 - tanh(u_i)^2): no solve."""
    rows, active, entries = _rows(n, BLOCK, KP, K)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    L = _load_lower(scale_ptr, scale_stride, rows, active, K, KP, ACC)
    e = _load_vectors(eps_ptr, eps_stride, rows, active, K, KP, ACC)
    u = m + tl.sum(L * e[:, None, :], axis=2)
    tanh, log_det, derivative = _tanh_terms(u)
    _store_vectors(action_ptr, rows, active, tanh, K, KP)
    _store_vectors(pre_tanh_ptr, rows, active, u, K, KP)
    diag = tl.where(entries, _diagonal(L, KP), 1.0)
    term = tl.where(entries, -0.5 * e * e - tl.log(diag) - log_det, 0.0)
    tl.store(log_prob_ptr + rows, (tl.sum(term, axis=1) - 0.5 * K * LOG_2PI).to(log_prob_ptr.dtype.element_ty),
             mask=active)


@triton.jit(do_not_specialize=RSAMPLE_BACKWARD_RUNTIME_INTEGERS + ["REDUCE"])
def _squashed_tril_rsample_log_prob_backward_kernel(grad_action_ptr, grad_pre_tanh_ptr, grad_log_prob_ptr, loc_ptr,
                                                    loc_stride, scale_ptr, scale_stride, eps_ptr, eps_stride,
                                                    loc_grad_ptr, scale_grad_ptr, eps_grad_ptr, partials_ptr, n,
                                                    HAS_GRAD_ACTION, HAS_GRAD_PRE_TANH, HAS_GRAD_LOG_PROB, LOC_ROWS,
                                                    SCALE_ROWS, EPS_ROWS, REDUCE, K: tl.constexpr, KP: tl.constexpr,
                                                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    """With g_u as for the diagonal sample:
    d/dmu = g_u,  d/dL = tril(g_u eps^T) - g_log_prob diag(1/L_ii),  d/deps = L^T g_u - g_log_prob eps.
    REDUCE: this program's sums of g_u (K), of tril(g_u eps^T) (K * K) and of g_log_prob, as
    mvn.py's partials, for a shared loc or scale_tril."""
    idx = tl.arange(0, KP)
    i = idx[None, :, None]
    j = idx[None, None, :]
    rows, active, entries = _rows(n, BLOCK, KP, K)
    m = _load_vectors(loc_ptr, loc_stride, rows, active, K, KP, ACC)
    L = _load_lower(scale_ptr, scale_stride, rows, active, K, KP, ACC)
    e = _load_vectors(eps_ptr, eps_stride, rows, active, K, KP, ACC)
    g_action, g_pre_tanh, g_log_prob = _rsample_upstream(grad_action_ptr, grad_pre_tanh_ptr, grad_log_prob_ptr, rows,
                                                         active, HAS_GRAD_ACTION, HAS_GRAD_PRE_TANH,
                                                         HAS_GRAD_LOG_PROB, K, KP, BLOCK, ACC)
    tanh, log_det, derivative = _tanh_terms(m + tl.sum(L * e[:, None, :], axis=2))
    g_u = tl.where(entries, g_action * derivative + g_pre_tanh + g_log_prob[:, None] * 2.0 * tanh, 0.0)
    if LOC_ROWS:
        _store_vectors(loc_grad_ptr, rows, active, g_u, K, KP)
    if EPS_ROWS:
        _store_vectors(eps_grad_ptr, rows, active, tl.sum(L * g_u[:, :, None], axis=1) - g_log_prob[:, None] * e,
                       K, KP)
    outer = tl.where((j <= i) & active[:, None, None], g_u[:, :, None] * e[:, None, :], 0.0)
    if SCALE_ROWS:
        diag = tl.where(entries, _diagonal(L, KP), 1.0)
        _store_matrices(scale_grad_ptr, rows, active,
                        outer - tl.where(i == j, (g_log_prob[:, None] / diag)[:, :, None], 0.0), K, KP)
    if REDUCE:
        row = partials_ptr + tl.program_id(0).to(tl.int64) * (K + K * K + 1)
        tl.store(row + idx, tl.sum(g_u, axis=0), mask=idx < K)
        matrix_mask = (idx[:, None] < K) & (idx[None, :] < K)
        tl.store(row + K + idx[:, None] * K + idx[None, :], tl.sum(outer, axis=0), mask=matrix_mask)
        tl.store(row + K + K * K, tl.sum(tl.where(active, g_log_prob, 0.0), axis=0))


# --- tanh_log_abs_det_jacobian --------------------------------------------------------------------


@triton.jit(do_not_specialize=["n"])
def _tanh_log_abs_det_jacobian_forward_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """log(1 - tanh(u)^2), elementwise."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tanh, log_det, derivative = _tanh_terms(tl.load(u_ptr + offsets, mask=mask, other=0.0).to(ACC))
    tl.store(out_ptr + offsets, log_det.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _tanh_log_abs_det_jacobian_backward_kernel(grad_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """d/du log(1 - tanh(u)^2) = -2 tanh(u), times the upstream gradient."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tanh, log_det, derivative = _tanh_terms(tl.load(u_ptr + offsets, mask=mask, other=0.0).to(ACC))
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offsets, (-2.0 * g * tanh).to(out_ptr.dtype.element_ty), mask=mask)
