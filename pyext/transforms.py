"""StableTanhTransform: torch.distributions' TanhTransform, safe at saturation."""

from __future__ import annotations

import torch
import torch.distributions as td

from . import ops, reference

__all__ = ["StableTanhTransform"]


class StableTanhTransform(td.transforms.TanhTransform):
    r"""y = tanh(x); a drop-in for :class:`torch.distributions.transforms.TanhTransform`.

    - The cache is PyTorch's, keyed on object identity, but on by default (``cache_size=1``):
      ``log_prob`` of the very tensor a sample returned finds its pre-tanh value without an
      atanh. A ``detach()``-ed or cloned action is a new object and misses, as in PyTorch.
    - The inverse clamps to the open interval first: ``atanh(clamp(y, -1 + ε, 1 - ε))`` with
      ε the epsilon of y's dtype, so an action that rounded to ±1 maps to a large finite x
      (about ±8.3 in float32, ±18.7 in float64) instead of ±inf.
    - ``log_abs_det_jacobian`` is the fused ``tanh_log_abs_det_jacobian``,
      ``2 (log 2 - x - softplus(-2x))``, finite for every x.
    """

    def __init__(self, cache_size: int = 1) -> None:
        super().__init__(cache_size=cache_size)

    def with_cache(self, cache_size: int = 1) -> StableTanhTransform:
        if self._cache_size == cache_size:
            return self
        return StableTanhTransform(cache_size=cache_size)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return reference.atanh_clamped(y, reference.action_epsilon(y.dtype))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ops.tanh_log_abs_det_jacobian(x)

    def cached_inverse(self, y: torch.Tensor) -> torch.Tensor | None:
        """The x cached for this very y (identity, as the cache itself compares), else None."""
        if self._cache_size == 0:
            return None
        x_old, y_old = self._cached_x_y
        return x_old if y is y_old else None

    def remember(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Caches the pair (x, y = tanh(x)), as calling the transform on x would."""
        if self._cache_size == 1:
            self._cached_x_y = x, y

    def forget(self) -> None:
        """Empties the cache: what a log_prob that missed it does, since it computes x inside its
        kernel instead of through this transform. A later lookup of the earlier sample then
        misses, as in PyTorch (whose inverse overwrote the cache). A repeated lookup of the
        missed value misses too where PyTorch's hits, with the same numbers and gradients: both
        take x = atanh(clamp(y)) of that value."""
        if self._cache_size == 1:
            self._cached_x_y = None, None
