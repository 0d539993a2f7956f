"""Distribution classes that drop in for torch.distributions and run the fused ops."""

from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch.distributions.kl import register_kl

from . import ops

__all__ = ["MultivariateNormal"]

_MATRIX_PARAMETERS = ("covariance_matrix", "precision_matrix", "scale_tril")


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The batch index of the first True entry of `mask` (row-major order)."""
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape))


def _check_positive_definite(name: str, matrix: torch.Tensor) -> None:
    symmetric = torch.isclose(matrix, matrix.mT, atol=1e-6).all(-1).all(-1)
    if not bool(symmetric.all()):
        raise ValueError(f"{name} is not symmetric at batch index {_first_index(~symmetric)}")
    info = torch.linalg.cholesky_ex(matrix).info
    failed = info != 0
    if bool(failed.any()):
        index = _first_index(failed)
        order = int(info[index]) if index else int(info)
        raise ValueError(
            f"{name} is not positive-definite at batch index {index}: the leading minor of "
            f"order {order} is not positive-definite"
        )


def _check_lower_cholesky(scale_tril: torch.Tensor) -> None:
    above = (scale_tril.triu(1) != 0).any(-1).any(-1)
    if bool(above.any()):
        raise ValueError(
            f"scale_tril must be lower-triangular, but at batch index {_first_index(above)} it has "
            "nonzero entries above the diagonal"
        )
    diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
    bad = ~(diagonal > 0).all(-1)
    if bool(bad.any()):
        index = _first_index(bad)
        raise ValueError(
            f"scale_tril must have a positive diagonal, but at batch index {index} its diagonal "
            f"is {diagonal[index].tolist()}"
        )


class MultivariateNormal(td.MultivariateNormal):
    r"""Multivariate normal with fused log-prob kernels; a drop-in for
    :class:`torch.distributions.MultivariateNormal`.

    Same constructor, properties and methods, and the same numbers. It is a subclass, so
    ``isinstance`` checks and ``torch.distributions.kl_divergence`` keep working.

    - Built from ``scale_tril``: :meth:`log_prob` runs ``mvn_tril_log_prob``.
    - Built from ``covariance_matrix``: :meth:`log_prob` runs ``mvn_cov_log_prob``, which
      factorises inside the kernel without forming L; L is computed (by the fused
      ``cholesky``) only when something needs it (``rsample``, ``entropy``, ``scale_tril``...),
      and then once.
    - Built from ``precision_matrix``: L is derived as PyTorch does it.

    Parameters are kept unbroadcast, so a ``scale_tril`` shared by the whole batch reaches
    the kernel once and its gradient is reduced in the kernel.

    With ``validate_args`` on (PyTorch's default outside ``python -O``), the parameters are
    checked at construction, with errors naming the first failing batch index; this
    synchronises with the device. With it off, nothing synchronises, and a matrix that is not
    positive-definite makes NaN for its own samples only.
    """

    def __init__(
        self,
        loc: torch.Tensor,
        covariance_matrix: torch.Tensor | None = None,
        precision_matrix: torch.Tensor | None = None,
        scale_tril: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if loc.dim() < 1:
            raise ValueError("loc must be at least one-dimensional.")
        given = {
            name: matrix
            for name, matrix in zip(_MATRIX_PARAMETERS, (covariance_matrix, precision_matrix, scale_tril))
            if matrix is not None
        }
        if len(given) != 1:
            raise ValueError(
                "Exactly one of covariance_matrix or precision_matrix or scale_tril may be specified."
            )
        ((name, matrix),) = given.items()
        if matrix.dim() < 2:
            raise ValueError(
                f"{name} must be at least two-dimensional, with optional leading batch dimensions"
            )
        k = loc.shape[-1]
        if matrix.shape[-2:] != (k, k):
            raise ValueError(
                f"{name} must have shape (*, {k}, {k}) to match loc's event size {k}, "
                f"got {tuple(matrix.shape)}"
            )
        try:
            batch_shape = torch.broadcast_shapes(matrix.shape[:-2], loc.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"the batch shapes of loc {tuple(loc.shape[:-1])} and {name} "
                f"{tuple(matrix.shape[:-2])} do not broadcast"
            ) from None

        self._parameterization = name
        self._unbroadcasted_loc = loc
        self._unbroadcasted_matrix = matrix
        # Instance attributes shadow the lazy properties of the parent class.
        setattr(self, name, matrix.expand(batch_shape + (k, k)))
        self.loc = loc.expand(batch_shape + (k,))
        td.Distribution.__init__(self, batch_shape, self.loc.shape[-1:], validate_args=False)
        if validate_args is None:
            validate_args = td.Distribution._validate_args
        self._validate_args = validate_args
        if validate_args:
            self._check_parameters()
        if name == "scale_tril":
            self._unbroadcasted_scale_tril = matrix

    def _check_parameters(self) -> None:
        loc_nan = torch.isnan(self._unbroadcasted_loc).any(-1)
        if bool(loc_nan.any()):
            raise ValueError(f"loc contains NaN at batch index {_first_index(loc_nan)}")
        if self._parameterization == "scale_tril":
            _check_lower_cholesky(self._unbroadcasted_matrix)
        else:
            _check_positive_definite(self._parameterization, self._unbroadcasted_matrix)

    @property
    def _unbroadcasted_scale_tril(self) -> torch.Tensor:
        """The Cholesky factor, unbroadcast; computed on first use when not given."""
        L = self.__dict__.get("_cholesky_factor")
        if L is None:
            if self._parameterization == "covariance_matrix":
                L = ops.cholesky(self._unbroadcasted_matrix)
            else:
                L = _precision_to_scale_tril(self._unbroadcasted_matrix)
            self.__dict__["_cholesky_factor"] = L
        return L

    @_unbroadcasted_scale_tril.setter
    def _unbroadcasted_scale_tril(self, L: torch.Tensor) -> None:
        self.__dict__["_cholesky_factor"] = L

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MultivariateNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        matrix_shape = batch_shape + self.event_shape + self.event_shape
        new._parameterization = self._parameterization
        new._unbroadcasted_loc = self._unbroadcasted_loc
        new._unbroadcasted_matrix = self._unbroadcasted_matrix
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        if "_cholesky_factor" in self.__dict__:
            new.__dict__["_cholesky_factor"] = self.__dict__["_cholesky_factor"]
        for name in _MATRIX_PARAMETERS:
            if name in self.__dict__:
                setattr(new, name, self.__dict__[name].expand(matrix_shape))
        td.Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if self._parameterization == "covariance_matrix":
            return ops.mvn_cov_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_matrix)
        return ops.mvn_tril_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_scale_tril)


def _precision_to_scale_tril(P: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = P⁻¹, through the Cholesky factor of P with rows and columns reversed
    (PyTorch's construction, so the numbers match)."""
    Lf = ops.cholesky(torch.flip(P, (-2, -1)))
    L_inv = torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False)


@register_kl(MultivariateNormal, MultivariateNormal)
def _kl_multivariate_normal(p: MultivariateNormal, q: MultivariateNormal) -> torch.Tensor:
    r"""KL(p ‖ q) = ½‖L_q⁻¹ L_p‖²_F - H(p) - log q(μ_p), where H(p) is p's entropy
    ½k(1 + log 2π) + Σ log L_p,ii: the Mahalanobis term and q's log-determinant come from
    the fused log-prob of p's mean under q."""
    if p.event_shape != q.event_shape:
        raise ValueError(
            "KL-divergence between two Multivariate Normals with different event shapes cannot be computed"
        )
    k = p.event_shape[0]
    L_p = p._unbroadcasted_scale_tril
    L_q = q._unbroadcasted_scale_tril
    log_q_of_p_mean = ops.mvn_tril_log_prob(p._unbroadcasted_loc, q._unbroadcasted_loc, L_q)
    M = torch.linalg.solve_triangular(L_q, L_p, upper=False)
    entropy_p = 0.5 * k * (1.0 + math.log(2 * math.pi)) + L_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    kl = 0.5 * M.pow(2).sum((-2, -1)) - entropy_p - log_q_of_p_mean
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))
