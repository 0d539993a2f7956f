"""fusedgauss: fused, numerically safe Gaussian policy distributions for PyTorch."""

from . import backends, ops, reference
from .distributions import MultivariateNormal
from .ops import cholesky, mvn_cov_log_prob, mvn_tril_log_prob

__version__ = "0.1.0"

__all__ = [
    "MultivariateNormal",
    "backends",
    "cholesky",
    "mvn_cov_log_prob",
    "mvn_tril_log_prob",
    "ops",
    "reference",
]
