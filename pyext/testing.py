"""Fresh random arguments for every op, shared by ``python -m fusedgauss check | bench`` and the
tests: well-conditioned matrices, positive scales, and the cases each op is checked and timed
on."""

from __future__ import annotations

import math

import torch

from . import ops

#: The packed ops' diagonal transform and min_diag in every case below.
PACKED_TRANSFORM = ("softplus", 0.01)
#: ops.OPS and the policy-head op, which reads loc and the packed factor from one row.
OPS_AND_HEAD = (*ops.OPS, "packed_head_log_prob")


def random_spd(batch_shape, k, *, dtype=torch.float64, condition=None, generator=None):
    """Random symmetric positive-definite matrices (*batch_shape, k, k).

    With `condition`, the eigenvalues are spread log-uniformly over [1, condition], so each
    matrix has exactly that condition number; otherwise A Aᵀ/k + I/2.
    """
    shape = tuple(batch_shape) + (k, k)
    A = torch.randn(shape, dtype=torch.float64, generator=generator)
    if condition is None:
        spd = A @ A.mT / k + 0.5 * torch.eye(k, dtype=torch.float64)
    else:
        Q, _ = torch.linalg.qr(A)
        eig = torch.logspace(0, math.log10(condition), k, dtype=torch.float64)
        spd = (Q * eig) @ Q.mT
        spd = 0.5 * (spd + spd.mT)
    return spd.to(dtype)


def random_scale_tril(batch_shape, k, *, dtype=torch.float64, condition=None, generator=None):
    """Lower Cholesky factors (contiguous) of random_spd matrices."""
    spd = random_spd(batch_shape, k, condition=condition, generator=generator)
    return torch.linalg.cholesky(spd).contiguous().to(dtype)


def random_packed(batch_shape, k, *, generator=None) -> torch.Tensor:
    """Packed factors (*batch_shape, k(k+1)/2) that :data:`PACKED_TRANSFORM` turns into the
    factors of random_scale_tril (float64): their diagonal entries are softplus's inverse of
    Lᵢᵢ - min_diag. (Random packed values would give factors whose condition grows with k,
    and float32 errors with it.)"""
    diag_transform, min_diag = PACKED_TRANSFORM
    assert diag_transform == "softplus"
    rows, cols = torch.tril_indices(k, k)
    packed = random_scale_tril(batch_shape, k, generator=generator)[..., rows, cols]
    on_diagonal = rows == cols
    packed[..., on_diagonal] = torch.expm1(packed[..., on_diagonal] - min_diag).log()
    return packed


def op_arguments(name: str, batch_shape, k: int, *, value_is_pre_tanh: bool = True, generator=None) -> list:
    """Fresh float64 CPU arguments of op `name` (a name of :data:`OPS_AND_HEAD`) for a batch of
    per-sample parameters: its tensors, then its other arguments, in the order of
    ``fusedgauss.reference.<name>``. The squashed log-prob ops score the pre-tanh value, or
    with ``value_is_pre_tanh=False`` its action tanh(u)."""
    batch_shape = tuple(batch_shape)

    def randn(*event):
        return torch.randn(batch_shape + event, dtype=torch.float64, generator=generator)

    def scale():
        return torch.rand(batch_shape + (k,), dtype=torch.float64, generator=generator) + 0.5

    def scale_tril():
        return random_scale_tril(batch_shape, k, generator=generator)

    def packed():
        return random_packed(batch_shape, k, generator=generator)

    def squashed_value():
        u = randn(k)
        return u if value_is_pre_tanh else torch.tanh(u)

    arguments = {
        "mvn_tril_log_prob": lambda: [randn(k), randn(k), scale_tril()],
        "mvn_cov_log_prob": lambda: [randn(k), randn(k), random_spd(batch_shape, k, generator=generator)],
        "diag_normal_log_prob": lambda: [randn(k), randn(k), scale()],
        "squashed_diag_log_prob": lambda: [squashed_value(), randn(k), scale(), value_is_pre_tanh],
        "squashed_tril_log_prob": lambda: [squashed_value(), randn(k), scale_tril(), value_is_pre_tanh],
        "squashed_diag_rsample_log_prob": lambda: [randn(k), scale(), randn(k)],
        "squashed_tril_rsample_log_prob": lambda: [randn(k), scale_tril(), randn(k)],
        "mvn_packed_log_prob": lambda: [randn(k), randn(k), packed(), *PACKED_TRANSFORM],
        "squashed_packed_log_prob": lambda: [squashed_value(), randn(k), packed(), *PACKED_TRANSFORM,
                                             value_is_pre_tanh],
        # [loc | packed] rows, as a policy head outputs them; not squashed, from the value
        "packed_head_log_prob": lambda: [randn(k), torch.cat([randn(k), packed()], -1), *PACKED_TRANSFORM, False,
                                         False],
        "tanh_log_abs_det_jacobian": lambda: [randn(k)],
        "cholesky": lambda: [random_spd(batch_shape, k, generator=generator)],
        "packed_to_scale_tril": lambda: [packed(), *PACKED_TRANSFORM],
        "packed_scale_tril_log_det": lambda: [packed(), *PACKED_TRANSFORM],
    }
    if name not in arguments:
        raise ValueError(f"op_arguments: no op named {name!r}; the ops are {', '.join(OPS_AND_HEAD)}")
    return arguments[name]()


def op_cases(names=OPS_AND_HEAD) -> list[tuple[str, str, dict]]:
    """(label, op name, keyword arguments of :func:`op_arguments`) for each op of `names`; the
    squashed log-prob ops twice, from the pre-tanh value and from the action."""
    cases = []
    for name in names:
        if name.startswith("squashed") and not name.endswith("rsample_log_prob"):
            cases.append((f"{name} (pre-tanh)", name, {"value_is_pre_tanh": True}))
            cases.append((f"{name} (action)", name, {"value_is_pre_tanh": False}))
        else:
            cases.append((name, name, {}))
    return cases


def as_tuple(result) -> tuple:
    """An op's outputs as a tuple: a single tensor becomes a 1-tuple."""
    return result if isinstance(result, tuple) else (result,)


def call_op(name: str, args: list) -> tuple[torch.Tensor, ...]:
    """``fusedgauss.ops.<name>`` on `args` (ordered as :func:`op_arguments` gives them), on the
    backend chosen for them, with all the outputs that ``fusedgauss.reference.<name>`` returns
    (a log-prob op's log_det too), as a tuple."""
    op = getattr(ops, name)
    if name == "packed_head_log_prob":
        value, head, diag_transform, min_diag, squashed, value_is_pre_tanh = args
        return op(value, head, diag_transform, min_diag, squashed=squashed, value_is_pre_tanh=value_is_pre_tanh,
                  return_log_det=True)
    return as_tuple(op(*args, return_log_det=True) if name in ops.LOG_DET_LOG_PROB_OPS else op(*args))
