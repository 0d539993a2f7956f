"""fusedgauss: fused, numerically safe Gaussian policy distributions for PyTorch."""

from . import backends, ops, reference
from .distributions import DiagNormal, MultivariateNormal, TanhMultivariateNormal, TanhNormal
from .ops import (
    cholesky,
    diag_normal_log_prob,
    mvn_cov_log_prob,
    mvn_tril_log_prob,
    packed_scale_tril_log_det,
    packed_to_scale_tril,
    squashed_diag_log_prob,
    squashed_diag_rsample_log_prob,
    squashed_tril_log_prob,
    squashed_tril_rsample_log_prob,
    standard_normal,
    tanh_log_abs_det_jacobian,
)
from .transforms import StableTanhTransform

__version__ = "0.1.0"

__all__ = [
    "DiagNormal",
    "MultivariateNormal",
    "StableTanhTransform",
    "TanhMultivariateNormal",
    "TanhNormal",
    "backends",
    "cholesky",
    "diag_normal_log_prob",
    "mvn_cov_log_prob",
    "mvn_tril_log_prob",
    "ops",
    "packed_scale_tril_log_det",
    "packed_to_scale_tril",
    "reference",
    "squashed_diag_log_prob",
    "squashed_diag_rsample_log_prob",
    "squashed_tril_log_prob",
    "squashed_tril_rsample_log_prob",
    "standard_normal",
    "tanh_log_abs_det_jacobian",
]
