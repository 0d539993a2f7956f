"""Distribution classes that drop in for torch.distributions and run the fused ops."""

from __future__ import annotations

import math

import torch
import torch.distributions as td
from torch.distributions.kl import register_kl
from torch.distributions.multivariate_normal import _batch_mv

from . import backends, ops, reference, validation
from .transforms import StableTanhTransform

__all__ = ["DiagNormal", "MultivariateNormal", "TanhMultivariateNormal", "TanhNormal"]

_MATRIX_PARAMETERS = ("covariance_matrix", "precision_matrix", "scale_tril")


# The checks ask torch._is_any_true whether a mask has a True entry, as torch.distributions
# does: under torch.func.vmap that is one answer for the whole batch, where bool(mask.any())
# would be data-dependent control flow, which vmap refuses. Inside a torch.func transform the
# entries cannot be read, so the error names no batch index there.


def _first_index(mask: torch.Tensor) -> tuple[int, ...] | None:
    """The batch index of the first True entry of `mask` (row-major order); None inside a
    torch.func transform."""
    if backends.under_function_transform():
        return None
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape))


def _at_first(mask: torch.Tensor) -> str:
    """" at batch index (i, ...)" of the first True entry of `mask`, for an error message ("" inside
    a torch.func transform)."""
    index = _first_index(mask)
    return "" if index is None else f" at batch index {index}"


def _validate_value(dist: td.Distribution, value: torch.Tensor) -> None:
    """PyTorch's checks of a log-prob's value (``dist._validate_sample``). An empty value
    (a zero-size batch) gets its shape checks alone: PyTorch's support check of it reshapes it
    to (0, -1), which raises, and it has no entry to check."""
    if not isinstance(value, torch.Tensor) or value.numel() > 0:
        dist._validate_sample(value)
        return
    event_shape = dist.event_shape
    if value.shape[value.dim() - len(event_shape):] != event_shape:
        raise ValueError(f"The right-most size of value must match event_shape: {value.size()} vs {event_shape}.")
    try:
        torch.broadcast_shapes(value.shape, dist.batch_shape + event_shape)
    except RuntimeError:
        raise ValueError(f"Value is not broadcastable with batch_shape+event_shape: {value.size()} vs "
                         f"{dist.batch_shape + event_shape}.") from None


def _linalg_operand(matrix: torch.Tensor) -> torch.Tensor:
    """matrix in a dtype that torch.linalg takes on every device: float16 and bfloat16 (whose
    CPU factorisations and triangular solves PyTorch lacks) as float32, the precision the
    kernels compute half matrices in."""
    return matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix


def _check_positive_definite(name: str, matrix: torch.Tensor) -> None:
    asymmetric = ~torch.isclose(matrix, matrix.mT, atol=1e-6).all(-1).all(-1)
    if torch._is_any_true(asymmetric):
        raise ValueError(f"{name} is not symmetric{_at_first(asymmetric)}")
    info = torch.linalg.cholesky_ex(_linalg_operand(matrix)).info
    failed = info != 0
    if torch._is_any_true(failed):
        index = _first_index(failed)
        if index is None:
            raise ValueError(f"{name} is not positive-definite")
        order = int(info[index]) if index else int(info)
        raise ValueError(
            f"{name} is not positive-definite at batch index {index}: the leading minor of "
            f"order {order} is not positive-definite"
        )


def _check_lower_cholesky(scale_tril: torch.Tensor) -> None:
    above = (scale_tril.triu(1) != 0).any(-1).any(-1)
    if torch._is_any_true(above):
        raise ValueError(
            f"scale_tril must be lower-triangular, but{_at_first(above)} it has nonzero entries above the diagonal"
        )
    diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
    bad = ~(diagonal > 0).all(-1)
    if torch._is_any_true(bad):
        index = _first_index(bad)
        found = "" if index is None else f", but at batch index {index} its diagonal is {diagonal[index].tolist()}"
        raise ValueError(f"scale_tril must have a positive diagonal{found}")


def _parameters_batch_shape(loc: torch.Tensor, name: str, parameter_batch: torch.Size) -> torch.Size:
    """The broadcast of loc's batch shape and a parameter's, or an error naming both."""
    try:
        return validation.broadcast_shapes(parameter_batch, loc.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"the batch shapes of loc {tuple(loc.shape[:-1])} and {name} {tuple(parameter_batch)} do not broadcast"
        ) from None


def _expanded(t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """t expanded to `shape`, or t itself when it has that shape already: an expand to the same
    shape is still a view and an autograd node, whose backward is one more step per minibatch."""
    return t if t.shape == shape else t.expand(shape)


def _with_batch_shape(log_prob: torch.Tensor, value: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """A log-prob computed from unbroadcast parameters, broadcast to the shape PyTorch gives:
    value's batch dimensions against the distribution's (which expand() may have grown)."""
    return _expanded(log_prob, validation.broadcast_shapes(value.shape[:-1], batch_shape))


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
    - :meth:`rsample` and :meth:`sample` are PyTorch's formula with the noise of
      :func:`fusedgauss.standard_normal`: PyTorch's numbers, drawn faster on the CPU.

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
        batch_shape = _parameters_batch_shape(loc, name, matrix.shape[:-2])

        self._parameterization = name
        self._unbroadcasted_loc = loc
        self._unbroadcasted_matrix = matrix
        # Instance attributes shadow the lazy properties of the parent class.
        setattr(self, name, _expanded(matrix, batch_shape + (k, k)))
        self.loc = _expanded(loc, batch_shape + (k,))
        td.Distribution.__init__(self, batch_shape, self.loc.shape[-1:], validate_args=False)
        if validate_args is None:
            validate_args = td.Distribution._validate_args
        self._validate_args = validate_args
        if validate_args:
            self._check_parameters()
        if name == "scale_tril":
            self._unbroadcasted_scale_tril = matrix

    @classmethod
    def from_packed(
        cls,
        loc: torch.Tensor,
        packed: torch.Tensor,
        diag_transform: str = "softplus",
        min_diag: float = 0.0,
        validate_args: bool | None = None,
    ) -> "MultivariateNormal":
        r"""A full-covariance policy's distribution straight from its network's outputs: loc
        (*, k) and packed (*, k(k+1)/2), the lower triangle of scale_tril row by row as
        ``torch.tril_indices(k, k)`` lists it, with ``Lᵢᵢ = diag_transform(xᵢᵢ) + min_diag``
        (``"softplus"``, ``"exp"`` or ``"none"``; see :func:`fusedgauss.packed_to_scale_tril`).
        It replaces a plain-PyTorch head's zeros, index assignment, softplus and tril.

        :meth:`log_prob` reads the packed values directly (``mvn_packed_log_prob``: L is
        unpacked inside the kernel and never written), and :meth:`entropy` reads only the
        diagonal entries (``packed_scale_tril_log_det``). L itself is built (by the fused
        ``packed_to_scale_tril``) only when something needs it (``rsample``, ``scale_tril``,
        KL...), and then once.

        An :meth:`entropy` after a :meth:`log_prob` of the batch's shape (PPO's loss) costs
        nothing of its own (see :meth:`entropy`); otherwise it runs
        ``packed_scale_tril_log_det``."""
        validation.packed_scale_tril("MultivariateNormal.from_packed", packed, diag_transform, min_diag)
        k = loc.shape[-1] if loc.dim() >= 1 else None
        if k is None or packed.shape[-1] != k * (k + 1) // 2:
            raise ValueError(
                f"from_packed: packed must hold k(k+1)/2 values for loc's event size k, got loc "
                f"{tuple(loc.shape)} and packed {tuple(packed.shape)}"
            )
        batch_shape = _parameters_batch_shape(loc, "packed", packed.shape[:-1])
        new = cls.__new__(cls)
        new._parameterization = "packed"
        new._unbroadcasted_loc = loc
        new._unbroadcasted_matrix = packed
        new._packed_transform = (diag_transform, float(min_diag))
        new.loc = _expanded(loc, batch_shape + (k,))
        td.Distribution.__init__(new, batch_shape, (k,), validate_args=False)
        new._validate_args = td.Distribution._validate_args if validate_args is None else validate_args
        if new._validate_args:
            new._check_parameters()
        return new

    @classmethod
    def from_head(
        cls,
        head: torch.Tensor,
        diag_transform: str = "softplus",
        min_diag: float = 0.0,
        validate_args: bool | None = None,
    ) -> "MultivariateNormal":
        r""":meth:`from_packed` of a policy head's whole output: head (*, k + k(k+1)/2) holds
        ``[loc | packed]`` in each row, as one linear layer outputs them (k follows from the
        width). :meth:`log_prob` then hands the head its gradient in one tensor, written by the
        kernel (:func:`fusedgauss.ops.packed_head_log_prob`), where ``head.split`` and
        :meth:`from_packed` give two that the split's backward copies into a new one (a k=17
        PPO minibatch of 4096: 2.8 MB a step). Otherwise the same distribution."""
        k = reference.event_size_of_head(head.shape[-1]) if head.dim() >= 1 else None
        if k is None:
            raise ValueError(
                f"from_head: head must hold k + k(k+1)/2 values per sample (loc, then the packed scale_tril), "
                f"got shape {tuple(head.shape)}"
            )
        new = cls.from_packed(*reference.split_head(head, k), diag_transform, min_diag, validate_args)
        new._head = head
        return new

    def _check_parameters(self) -> None:
        loc_nan = torch.isnan(self._unbroadcasted_loc).any(-1)
        if torch._is_any_true(loc_nan):
            raise ValueError(f"loc contains NaN{_at_first(loc_nan)}")
        if self._parameterization == "scale_tril":
            _check_lower_cholesky(self._unbroadcasted_matrix)
        elif self._parameterization == "packed":
            _check_lower_cholesky(self._unbroadcasted_scale_tril)
        else:
            _check_positive_definite(self._parameterization, self._unbroadcasted_matrix)

    @property
    def _unbroadcasted_scale_tril(self) -> torch.Tensor:
        """The Cholesky factor, unbroadcast; computed on first use when not given."""
        L = self.__dict__.get("_cholesky_factor")
        if L is None:
            if self._parameterization == "covariance_matrix":
                L = ops.cholesky(self._unbroadcasted_matrix)
            elif self._parameterization == "packed":
                L = ops.packed_to_scale_tril(self._unbroadcasted_matrix, *self._packed_transform)
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
        if self._parameterization == "packed":
            new._packed_transform = self._packed_transform
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
            _validate_value(self, value)
        if self._parameterization == "covariance_matrix":
            log_prob = ops.mvn_cov_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_matrix)
        elif "_head" in self.__dict__:
            log_prob, log_det = ops.packed_head_log_prob(value, self._head, *self._packed_transform,
                                                         return_log_det=True)
            self._keep_log_det(log_det)
        elif self._parameterization == "packed":
            log_prob, log_det = ops.mvn_packed_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_matrix,
                                                        *self._packed_transform, return_log_det=True)
            self._keep_log_det(log_det)
        else:
            log_prob, log_det = ops.mvn_tril_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_scale_tril,
                                                      return_log_det=True)
            self._keep_log_det(log_det)
        return _with_batch_shape(log_prob, value, self.batch_shape)

    def entropy(self) -> torch.Tensor:
        """PyTorch's entropy, ``½k(1 + log 2π) + Σᵢ log Lᵢᵢ``. After a :meth:`log_prob` of the
        batch's shape from ``scale_tril`` or :meth:`from_packed` (PPO's loss), it is built from
        the ``Σᵢ log Lᵢᵢ`` that the log-prob kernel also returned: it costs no pass of its own,
        and its gradient joins the log-prob's in one backward pass, instead of a dense (*, k, k)
        gradient of L's diagonal summed into the log-prob's. This holds in the grad mode of the
        log-prob, unless ``loc`` or the matrix is a leaf that requires grad (a policy head's are
        a network's outputs). The entropy's graph then runs through the log-prob's: backward
        them together (one loss), or keep the graph (``retain_graph=True``) between two
        backward calls, as for any two outputs of one network."""
        kept = self.__dict__.get("_log_prob_log_det")
        if kept is not None and kept[0] == torch.is_grad_enabled():
            log_det = kept[1]
        elif self._parameterization == "packed":  # from the packed diagonal alone, fused
            log_det = ops.packed_scale_tril_log_det(self._unbroadcasted_matrix, *self._packed_transform)
        else:
            return super().entropy()
        return _gaussian_entropy(self.event_shape[0], log_det, self.batch_shape)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        noise = ops.standard_normal(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + _batch_mv(self._unbroadcasted_scale_tril, noise)

    def _keep_log_det(self, log_det: torch.Tensor) -> None:
        """Keeps a log-prob's Σᵢ log Lᵢᵢ for :meth:`entropy`: when it has the batch shape, and
        when reusing its graph is no surprise, that is, unless a parameter is a leaf that
        requires grad (whose entropy-only backward would then also pass through the log-prob,
        and give zeros where PyTorch gives no gradient). It keeps the log-prob's graph alive
        while the distribution lives, as a kept log-prob would."""
        parameters = (self._unbroadcasted_loc, self._unbroadcasted_matrix)
        if log_det.shape == self.batch_shape and not any(t.requires_grad and t.is_leaf for t in parameters):
            self.__dict__["_log_prob_log_det"] = (torch.is_grad_enabled(), log_det)


def _gaussian_entropy(k: int, log_det: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """½k(1 + log 2π) + Σᵢ log Lᵢᵢ of a k-dimensional Gaussian from its `log_det` = Σᵢ log Lᵢᵢ
    (unbroadcast), expanded to the batch shape."""
    return _expanded(0.5 * k * (1.0 + math.log(2 * math.pi)) + log_det, batch_shape)


def _precision_to_scale_tril(P: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = P⁻¹, through the Cholesky factor of P with rows and columns reversed
    (PyTorch's construction, so the numbers match)."""
    Lf = ops.cholesky(torch.flip(P, (-2, -1)))
    L_inv = _linalg_operand(torch.transpose(torch.flip(Lf, (-2, -1)), -2, -1))
    eye = torch.eye(P.shape[-1], dtype=L_inv.dtype, device=P.device)
    return torch.linalg.solve_triangular(L_inv, eye, upper=False).to(P.dtype)


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
    M = torch.linalg.solve_triangular(_linalg_operand(L_q), _linalg_operand(L_p), upper=False)
    entropy_p = 0.5 * k * (1.0 + math.log(2 * math.pi)) + L_p.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    kl = 0.5 * M.pow(2).sum((-2, -1)) - entropy_p - log_q_of_p_mean
    kl = kl.to(torch.promote_types(L_p.dtype, L_q.dtype))  # M is float32 for half factors
    return kl.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


class DiagNormal(td.Independent):
    r"""Gaussian with diagonal covariance over the last dimension; a drop-in for
    ``Independent(Normal(loc, scale), 1)``, which it subclasses (so ``isinstance`` checks and
    the KL registry keep working: KL between two of them is PyTorch's Independent/Normal
    formula, registered for the pair so that a zero-size batch works too).

    :meth:`log_prob` runs the fused ``diag_normal_log_prob`` on the unbroadcast parameters,
    so a ``scale`` shared by the batch (a state-independent log-std) is read once and its
    gradient reduced in the kernel; :meth:`entropy` is taken on the unbroadcast scale too.
    :meth:`rsample` and :meth:`sample` are the Normal's formula with the noise of
    :func:`fusedgauss.standard_normal` (PyTorch's numbers, drawn faster on the CPU); mean,
    mode, variance and stddev are the Normal's.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None) -> None:
        super().__init__(td.Normal(loc, scale, validate_args=validate_args), 1, validate_args=validate_args)
        # Numbers become tensors in the Normal; take its (broadcast) ones then.
        self._unbroadcasted_loc = loc if isinstance(loc, torch.Tensor) else self.base_dist.loc
        self._unbroadcasted_scale = scale if isinstance(scale, torch.Tensor) else self.base_dist.scale

    @property
    def loc(self) -> torch.Tensor:
        return self.base_dist.loc

    @property
    def scale(self) -> torch.Tensor:
        return self.base_dist.scale

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.base_dist = self.base_dist.expand(batch_shape + self.event_shape)
        new.reinterpreted_batch_ndims = self.reinterpreted_batch_ndims
        new._unbroadcasted_loc = self._unbroadcasted_loc
        new._unbroadcasted_scale = self._unbroadcasted_scale
        td.Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        base = self.base_dist
        noise = ops.standard_normal(base._extended_shape(sample_shape), dtype=base.loc.dtype, device=base.loc.device)
        return base.loc + noise * base.scale

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """The Normal's sample (torch.normal: the same noise, times scale, plus loc) is
        :meth:`rsample`'s numbers."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            _validate_value(self, value)
        log_prob = ops.diag_normal_log_prob(value, self._unbroadcasted_loc, self._unbroadcasted_scale)
        return _with_batch_shape(log_prob, value, self.batch_shape)

    def entropy(self) -> torch.Tensor:
        """On the unbroadcast scale: a scale shared by the batch (a state-independent log-std)
        takes k logs, not one per sample and entry."""
        scale = _expanded(self._unbroadcasted_scale, self._unbroadcasted_scale.shape[:-1] + self.event_shape)
        return _gaussian_entropy(self.event_shape[0], scale.log().sum(-1), self.batch_shape)


@register_kl(DiagNormal, DiagNormal)
def _kl_diag_normal(p: DiagNormal, q: DiagNormal) -> torch.Tensor:
    r"""PyTorch's Independent/Normal KL: its Normal/Normal KL per entry, summed with
    ``sum(-1)`` where PyTorch's Independent reshapes to (batch, -1), which raises on a
    zero-size batch."""
    return td.kl_divergence(p.base_dist, q.base_dist).sum(-1)


class _TanhSquashedGaussian(td.TransformedDistribution):
    r"""a = center + half_range · tanh(u), u ~ a Gaussian base: the shared machinery of
    :class:`TanhNormal` and :class:`TanhMultivariateNormal`.

    Subclasses give the base distribution and its fused ops (``_log_prob_op(value, value_is_pre_tanh)``
    and ``_rsample_op(eps)``). With the default bounds (-1, 1) there is no affine step.
    """

    def _init_squash(self, base: td.Distribution, low, high, validate_args: bool | None) -> None:
        self._squash = StableTanhTransform()
        transforms: list[td.Transform] = [self._squash]
        self._rescale: td.AffineTransform | None = None
        self._low, self._high = low, high
        if not (_is_number(low, -1.0) and _is_number(high, 1.0)):
            low_t, high_t = (torch.as_tensor(b, dtype=base.mean.dtype, device=base.mean.device) for b in (low, high))
            self._rescale = td.AffineTransform(loc=(high_t + low_t) / 2, scale=(high_t - low_t) / 2, event_dim=1, cache_size=1)
            transforms.append(self._rescale)
        super().__init__(base, transforms, validate_args=validate_args)

    def _log_prob_op(self, value: torch.Tensor, value_is_pre_tanh: bool) -> torch.Tensor:
        raise NotImplementedError

    def _rsample_op(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _less_log_half_range(self, log_prob: torch.Tensor) -> torch.Tensor:
        """A log-prob of the squashed u, less Σᵢ log((highᵢ - lowᵢ)/2), the log-Jacobian of the
        affine step; as it is without one (no subtraction of a zero: one op and one autograd
        node less per call)."""
        if self._rescale is None:
            return log_prob
        return log_prob - self._rescale.scale.log().expand(self.event_shape).sum(-1)

    def _validate_action(self, value: torch.Tensor) -> None:
        low = -1.0 if self._rescale is None else self._rescale.loc - self._rescale.scale
        high = 1.0 if self._rescale is None else self._rescale.loc + self._rescale.scale
        outside = ((value < low) | (value > high) | value.isnan()).any(-1)
        if torch._is_any_true(outside):
            index = _first_index(outside)
            where, found = ("", "") if index is None else (f" at batch index {index}", f": {value[index].tolist()}")
            raise ValueError(
                f"{type(self).__name__}.log_prob: the action{where} lies outside "
                f"[low, high] = [{self._low}, {self._high}]{found}"
            )

    def _noise(self, sample_shape) -> torch.Tensor:
        """Standard-normal noise for a sample: the numbers torch.distributions draws
        (:func:`fusedgauss.standard_normal`), so that a seed gives PyTorch's samples."""
        mean = self.base_dist.mean
        return ops.standard_normal(self._extended_shape(sample_shape), dtype=mean.dtype, device=mean.device)

    def _set_cache(self, pre_tanh: torch.Tensor, squashed: torch.Tensor) -> torch.Tensor:
        """Caches a sample as the transforms would when applied to it; returns the action."""
        self._squash.remember(pre_tanh, squashed)
        return squashed if self._rescale is None else self._rescale(squashed)

    def log_prob(self, value: torch.Tensor, pre_tanh: torch.Tensor | None = None) -> torch.Tensor:
        r"""log-prob of the action `value`, in one fused pass.

        - With ``pre_tanh`` (the u the action came from): no atanh at all. This is the way to
          score stored actions in a policy gradient: pass the stored u, detached like the
          action, and gradients reach the parameters only.
        - Without it: the transforms' cache (as PyTorch's, by object identity) supplies u when
          `value` is the very tensor the last sample returned. Otherwise
          u = atanh(clamp(y, -1 + ε, 1 - ε)) with ε the epsilon of the action's dtype, inside
          the kernel, so an action at exactly ±1 gets a finite (clamped) log-prob.
        """
        if self._validate_args:
            self._validate_action(value)
        if pre_tanh is None:
            squashed = value
            if self._rescale is not None:
                squashed = self._rescale.inv(value)  # cached for the sample itself, else (a - c)/h
            pre_tanh = self._squash.cached_inverse(squashed)
            if pre_tanh is None:
                self._squash.forget()
                log_prob = self._log_prob_op(squashed, False)
            else:
                log_prob = self._log_prob_op(pre_tanh, True)
        else:
            log_prob = self._log_prob_op(pre_tanh, True)
        return self._less_log_half_range(_with_batch_shape(log_prob, value, self.batch_shape))

    def rsample_log_prob(self, sample_shape=torch.Size(), return_pre_tanh: bool = False):
        r"""A reparameterised action and its log-prob, from one fused pass over standard-normal
        noise ε: u = base(ε), action = squash(u), log-prob with no solve and no atanh. Gradients
        are the total derivatives through u (SAC's actor loss, entropy terms). The transforms'
        cache holds the sample, as after :meth:`rsample`. With ``return_pre_tanh``, u comes
        third."""
        squashed, pre_tanh, log_prob = self._rsample_op(self._noise(sample_shape))
        out = (self._set_cache(pre_tanh, squashed), self._less_log_half_range(log_prob))
        return (*out, pre_tanh) if return_pre_tanh else out

    def sample_log_prob(self, sample_shape=torch.Size(), return_pre_tanh: bool = False):
        r"""An action, detached, and its log-prob for a policy gradient: the log-prob is taken
        at the detached pre-tanh value, so gradients reach the parameters only, never through
        the action (the undetached pitfall cannot happen). With ``return_pre_tanh``, that u
        (detached) comes third: store it with the action to score it later with
        ``log_prob(action, pre_tanh=u)``."""
        with torch.no_grad():
            squashed, pre_tanh, _ = self._rsample_op(self._noise(sample_shape))
            action = self._set_cache(pre_tanh, squashed)
        out = (action, self._less_log_half_range(self._log_prob_op(pre_tanh, True)))
        return (*out, pre_tanh) if return_pre_tanh else out

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.rsample_log_prob(sample_shape)[0]

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    @property
    def deterministic_action(self) -> torch.Tensor:
        """The base distribution's mean pushed through the squash: center + half_range ·
        tanh(mean). The usual evaluation action; it is not the mode (nor the mean) of the
        squashed distribution."""
        squashed = torch.tanh(self.base_dist.mean)
        return squashed if self._rescale is None else self._rescale(squashed)

    def entropy(self) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no closed-form entropy (PyTorch's TransformedDistribution "
            "raises too); estimate it as -rsample_log_prob()[1], averaged over samples"
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.base_dist = self.base_dist.expand(batch_shape)
        # The transforms (and their caches) are shared, as PyTorch's expand shares them.
        new._squash, new._rescale = self._squash, self._rescale
        new._low, new._high = self._low, self._high
        new.transforms = self.transforms
        td.Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


def _is_number(bound, value: float) -> bool:
    return isinstance(bound, (int, float)) and float(bound) == value


class TanhNormal(_TanhSquashedGaussian):
    r"""a = center + half_range · tanh(u), u ~ N(loc, diag(scale)²), with center and
    half_range from [low, high]: SAC's squashed Gaussian policy, as
    ``TransformedDistribution(Independent(Normal(loc, scale), 1), [TanhTransform(cache_size=1),
    AffineTransform(...)])`` with fused, saturation-safe kernels.

    - ``log_prob(a, pre_tanh=None)``: see :meth:`_TanhSquashedGaussian.log_prob`.
    - ``rsample_log_prob()``: the SAC path, one fused pass, reparameterised.
    - ``sample_log_prob()``: a detached action and its policy-gradient log-prob.
    - ``deterministic_action``: center + half_range · tanh(loc).
    - ``entropy()`` raises, as PyTorch's TransformedDistribution does.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, low=-1.0, high=1.0,
                 validate_args: bool | None = None) -> None:
        self._init_squash(DiagNormal(loc, scale, validate_args=validate_args), low, high, validate_args)

    def _log_prob_op(self, value: torch.Tensor, value_is_pre_tanh: bool) -> torch.Tensor:
        base = self.base_dist
        return ops.squashed_diag_log_prob(value, base._unbroadcasted_loc, base._unbroadcasted_scale, value_is_pre_tanh)

    def _rsample_op(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.base_dist
        return ops.squashed_diag_rsample_log_prob(base._unbroadcasted_loc, base._unbroadcasted_scale, eps)


class TanhMultivariateNormal(_TanhSquashedGaussian):
    r"""a = center + half_range · tanh(u), u ~ N(loc, Σ) with a full covariance given as
    ``scale_tril`` or ``covariance_matrix``: the squashed full-covariance policy, with the
    same methods as :class:`TanhNormal`. Built from a covariance, its Cholesky factor comes
    from the fused ``cholesky``, once.
    """

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor | None = None,
                 covariance_matrix: torch.Tensor | None = None, low=-1.0, high=1.0,
                 validate_args: bool | None = None) -> None:
        base = MultivariateNormal(loc, covariance_matrix=covariance_matrix, scale_tril=scale_tril,
                                  validate_args=validate_args)
        self._init_squash(base, low, high, validate_args)

    @classmethod
    def from_packed(cls, loc: torch.Tensor, packed: torch.Tensor, diag_transform: str = "softplus",
                    min_diag: float = 0.0, low=-1.0, high=1.0,
                    validate_args: bool | None = None) -> "TanhMultivariateNormal":
        r"""The squashed policy straight from its network's outputs, as
        :meth:`MultivariateNormal.from_packed`: :meth:`log_prob` reads the packed values directly
        (``squashed_packed_log_prob``), and L is built only for sampling."""
        new = cls.__new__(cls)
        base = MultivariateNormal.from_packed(loc, packed, diag_transform, min_diag, validate_args=validate_args)
        new._init_squash(base, low, high, validate_args)
        return new

    @classmethod
    def from_head(cls, head: torch.Tensor, diag_transform: str = "softplus", min_diag: float = 0.0, low=-1.0,
                  high=1.0, validate_args: bool | None = None) -> "TanhMultivariateNormal":
        r"""The squashed policy from a policy head's whole output ``[loc | packed]``, as
        :meth:`MultivariateNormal.from_head`: :meth:`log_prob` hands the head its gradient in one
        tensor."""
        new = cls.__new__(cls)
        base = MultivariateNormal.from_head(head, diag_transform, min_diag, validate_args=validate_args)
        new._init_squash(base, low, high, validate_args)
        return new

    def _log_prob_op(self, value: torch.Tensor, value_is_pre_tanh: bool) -> torch.Tensor:
        base = self.base_dist
        if "_head" in base.__dict__:
            log_prob, log_det = ops.packed_head_log_prob(
                value, base._head, *base._packed_transform, squashed=True, value_is_pre_tanh=value_is_pre_tanh,
                return_log_det=True)
        elif base._parameterization == "packed":
            log_prob, log_det = ops.squashed_packed_log_prob(
                value, base._unbroadcasted_loc, base._unbroadcasted_matrix, *base._packed_transform,
                value_is_pre_tanh, return_log_det=True)
        else:
            log_prob, log_det = ops.squashed_tril_log_prob(
                value, base._unbroadcasted_loc, base._unbroadcasted_scale_tril, value_is_pre_tanh,
                return_log_det=True)
        base._keep_log_det(log_det)  # for base_dist.entropy(), as MultivariateNormal.log_prob does
        return log_prob

    def _rsample_op(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.base_dist
        return ops.squashed_tril_rsample_log_prob(base._unbroadcasted_loc, base._unbroadcasted_scale_tril, eps)
