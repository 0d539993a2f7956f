"""Property-based tests (hypothesis): every op on the CPU kernels against its float64
reference (fusedgauss.reference), over cases drawn from a space that the parametrised tests
cover only on a grid.

A case draws the event size k (1-18: the compile-time sizes up to 8, runtime ones beyond,
and beyond 16 the lanes of large per-sample factors), a batch shape of up to two dimensions
(zero-size ones included), and for each tensor argument its own broadcast of that shape
(leading dimensions dropped, others cut to size 1 and perhaps expanded back with stride 0)
and whether it is strided (every other element of a wider tensor); then the dtype (float32,
float64, float16 or bfloat16).
Checked: the outputs, and the gradients of a random weighting of all of them with respect to
every tensor argument, against the reference's by autograd in float64 on the same values.
Then each distribution class (every constructor: scale_tril, covariance, precision, diagonal,
packed factor, policy head; plain and tanh-squashed) against torch.distributions (a packed
factor through the plain-PyTorch head) on such drawn cases, a sample shape in front of the
value: log_prob and its gradients, entropy, mean, and rsample from one seed; and each squashed
class's rsample_log_prob against the plain composition, outputs and reparameterised gradients.

FUSEDGAUSS_HYPOTHESIS_EXAMPLES sets the examples per op (default 25; a search for new
failures runs thousands).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributions as td
from conftest import requires_compiled_cpu
from helpers import outputs_and_grads, plain_torch_scale_tril
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedgauss
from fusedgauss import reference, testing

EXAMPLES = int(os.environ.get("FUSEDGAUSS_HYPOTHESIS_EXAMPLES", "25"))
# Relative to the largest reference value of each output or gradient (at least 1).
TOLERANCE = {torch.float64: 1e-8, torch.float32: 3e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def squashed_from_value(name: str) -> bool:
    """Whether op `name` scores a value that may be given as its action or its pre-tanh value."""
    return name.startswith("squashed") and not name.endswith("rsample_log_prob")


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view whose every stride is doubled: every other element of a wider tensor."""
    wide = t.new_empty(t.shape + (2,))
    wide[..., 0] = t
    return wide[..., 0]


@st.composite
def broadcast_of(draw, t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """t (batch shape, then event dimensions) with leading batch dimensions dropped and others
    cut to size 1, each of those perhaps expanded back to its size (stride 0)."""
    drop = draw(st.integers(0, batch_dims))
    for _ in range(drop):
        if t.shape[0] == 0:  # a zero-size dimension has no element to keep
            break
        t = t[0]
        batch_dims -= 1
    for dim in range(batch_dims):
        size = t.shape[dim]
        if size > 1 and draw(st.booleans()):
            t = t.narrow(dim, 0, 1)
            if draw(st.booleans()):
                t = t.expand(*t.shape[:dim], size, *t.shape[dim + 1:])
    return t


@st.composite
def op_cases(draw, name: str):
    """(k, the op's arguments in their dtype, the same values in float64, the dtype)."""
    k = draw(st.integers(1, 18))
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, *HALF_DTYPES]))
    # An action is clamped to 1 - eps with the eps of its own dtype, and the float64 reference
    # would clamp a half action with float64's: half actions are scored from the pre-tanh value.
    from_action = squashed_from_value(name) and dtype not in HALF_DTYPES and draw(st.booleans())
    options = {"value_is_pre_tanh": not from_action} if squashed_from_value(name) else {}
    args, args64 = [], []
    for a in testing.op_arguments(name, batch, k, generator=generator, **options):
        if isinstance(a, torch.Tensor):
            a = draw(broadcast_of(a.to(dtype), len(batch)))
            if draw(st.booleans()):
                a = strided(a)
            args64.append(a.double())
        else:
            args64.append(a)
        args.append(a)
    return k, args, args64, dtype


def with_tensors(args: list, tensors) -> list:
    """args with its tensors replaced, in order, by `tensors`."""
    tensors = iter(tensors)
    return [next(tensors) if isinstance(a, torch.Tensor) else a for a in args]


def assert_close_to(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, the reference's {tuple(theirs.shape)}"
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), theirs, rtol=tolerance, atol=tolerance * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_close_with_gradients(ours: dict, theirs: tuple, leaves: list, leaves64: list, dtype: torch.dtype,
                                what: str) -> None:
    """Each output of `ours` (name: tensor in dtype) close to its float64 counterpart in
    `theirs`, and the gradients of a random weighting of all of them with respect to `leaves`
    close to those of theirs with respect to `leaves64` (the same values in float64)."""
    weights = [torch.randn(t.shape, dtype=torch.float64) for t in theirs]
    for (name, o), t in zip(ours.items(), theirs):
        assert o.dtype == dtype, f"{what} {name} is {o.dtype}"
        assert_close_to(o.detach(), t.detach(), dtype, f"{what} {name}")
    loss = sum((o.double() * w).sum() for o, w in zip(ours.values(), weights))
    want_loss = sum((t * w).sum() for t, w in zip(theirs, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    want_grads = torch.autograd.grad(want_loss, leaves64, allow_unused=True, materialize_grads=True)
    for index, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close_to(g, w, dtype, f"{what} gradient of parameter {index}")


@requires_compiled_cpu
@pytest.mark.parametrize("name", testing.OPS_AND_HEAD)
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_op_matches_its_reference(name, data):
    """Op `name` on drawn arguments: its outputs and gradients against its float64 reference's."""
    k, args, args64, dtype = data.draw(op_cases(name), label="k, arguments, float64 arguments, dtype")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors64 = [a for a in args64 if isinstance(a, torch.Tensor)]
    outputs, grads = outputs_and_grads(lambda *t: testing.call_op(name, with_tensors(args, t)), tensors)
    want_outputs, want_grads = outputs_and_grads(
        lambda *t: testing.as_tuple(getattr(reference, name)(*with_tensors(args64, t))), tensors64)
    assert len(outputs) == len(want_outputs)
    for index, (ours, theirs) in enumerate(zip(outputs, want_outputs)):
        assert ours.dtype == dtype, f"output {index} is {ours.dtype}, its inputs {dtype}"
        assert_close_to(ours, theirs, dtype, f"{name} k={k} output {index}")
    for index, (ours, theirs) in enumerate(zip(grads, want_grads)):
        assert_close_to(ours, theirs, dtype, f"{name} k={k} gradient of tensor argument {index}")


# --- the distributions against torch.distributions -----------------------------------------

KINDS = ("scale_tril", "covariance_matrix", "precision_matrix", "diag", "tanh_diag", "tanh_tril", "packed",
         "tanh_packed", "head", "tanh_head")


def fusedgauss_distribution(kind: str, *parameters: torch.Tensor, bounds: dict | None = None) -> td.Distribution:
    """fusedgauss's distribution of `kind` on its parameters (loc and a factor, covariance or
    precision matrix, diagonal scale or packed factor; or a policy head's [loc | packed]), a
    squashed one with the action `bounds` (low, high) when given, validating its arguments and
    values, as by default."""
    squashed = kind.startswith("tanh")
    bounds = bounds or {}
    if kind.endswith("diag"):
        return fusedgauss.TanhNormal(*parameters, **bounds) if squashed else fusedgauss.DiagNormal(*parameters)
    cls = fusedgauss.TanhMultivariateNormal if squashed else fusedgauss.MultivariateNormal
    if kind.endswith("packed"):
        return cls.from_packed(*parameters, *testing.PACKED_TRANSFORM, **bounds)
    if kind.endswith("head"):
        return cls.from_head(*parameters, *testing.PACKED_TRANSFORM, **bounds)
    loc, matrix = parameters
    return cls(loc, **{"scale_tril" if squashed else kind: matrix}, **bounds)


def torch_distribution(kind: str, *parameters: torch.Tensor, bounds: dict | None = None) -> td.Distribution:
    """torch.distributions' own, without validation (PyTorch's raises on a zero-size batch: an
    IndependentConstraint reshape to (0, -1)); a packed factor through the plain-PyTorch head
    (zeros, index assignment, softplus, tril); action bounds through an AffineTransform."""
    off = {"validate_args": False}
    if kind.endswith("head"):
        k = reference.event_size_of_head(parameters[0].shape[-1])
        parameters = reference.split_head(parameters[0], k)
    loc, matrix = parameters
    if kind.endswith("diag"):
        base = td.Independent(td.Normal(loc, matrix, **off), 1, **off)
    elif kind.endswith("packed") or kind.endswith("head"):
        base = td.MultivariateNormal(loc, scale_tril=plain_torch_scale_tril(matrix, *testing.PACKED_TRANSFORM), **off)
    else:
        base = td.MultivariateNormal(loc, **{"scale_tril" if kind == "tanh_tril" else kind: matrix}, **off)
    if not kind.startswith("tanh"):
        return base
    transforms = [td.TanhTransform()]
    if bounds:
        # Numbers stay numbers: PyTorch's AffineTransform counts a 0-dim tensor scale's
        # log-Jacobian once per event, not once per dimension.
        low, high = bounds["low"], bounds["high"]
        transforms.append(td.AffineTransform((high + low) / 2, (high - low) / 2, event_dim=1))
    return td.TransformedDistribution(base, transforms, **off)


@st.composite
def distribution_cases(draw, kinds=KINDS):
    """(kind, k, parameters, value, sample shape, dtype, bounds): each parameter with its own
    broadcast of a batch shape (a head's loc and packed factor are one tensor), value with a
    sample shape in front of a third; a squashed kind's action bounds none (-1 and 1), numbers
    or per-dimension tensors, with its values inside them."""
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(1, 18))
    batch = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    sample_shape = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, *HALF_DTYPES]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    loc = torch.randn(batch + (k,), dtype=torch.float64, generator=generator)
    if kind.endswith("diag"):
        matrix = 0.5 + torch.rand(batch + (k,), dtype=torch.float64, generator=generator)
    elif kind in ("covariance_matrix", "precision_matrix"):
        matrix = testing.random_spd(batch, k, generator=generator)
    elif kind.endswith("packed") or kind.endswith("head"):
        matrix = testing.random_packed(batch, k, generator=generator)
    else:
        matrix = testing.random_scale_tril(batch, k, generator=generator)
    value = torch.randn(sample_shape + batch + (k,), dtype=torch.float64, generator=generator).to(dtype)
    bounds = {}
    if kind.startswith("tanh"):
        # Inside the clamp of an action (1 - eps of its dtype), where torch's atanh agrees
        # with ours (a half tanh rounds to exactly 1 from |u| > 3.4 in bfloat16), and far
        # enough from it that the dtype's rounding of the map to the bounds and back, which
        # atanh's slope 1/(1 - y^2) amplifies, stays within the tolerance.
        bound = 1 - 64 * torch.finfo(dtype).eps
        value = torch.tanh(value).clamp(-bound, bound)
        bounds_kind = draw(st.sampled_from(["none", "numbers", "per dimension"]))
        if bounds_kind == "numbers":
            low = draw(st.sampled_from([-2.0, 0.0, 0.5]))
            bounds = {"low": low, "high": low + draw(st.sampled_from([0.5, 1.0, 3.0]))}
        elif bounds_kind == "per dimension":
            low = -0.5 - torch.rand(k, dtype=torch.float64, generator=generator)
            bounds = {"low": low.to(dtype), "high": (low + 0.5 + torch.rand(k, dtype=torch.float64,
                                                                            generator=generator)).to(dtype)}
        if bounds:
            low, high = (torch.as_tensor(bounds[b], dtype=dtype) for b in ("low", "high"))
            value = (high + low) / 2 + (high - low) / 2 * value
    parameters = (torch.cat([loc, matrix], -1),) if kind.endswith("head") else (loc, matrix)
    parameters = tuple(draw(broadcast_of(t.to(dtype), len(batch))) for t in parameters)
    value = draw(broadcast_of(value, len(sample_shape) + len(batch)))
    return kind, k, parameters, value, sample_shape, dtype, bounds


def reparameterised(kind: str, base: td.Distribution, eps: torch.Tensor) -> torch.Tensor:
    """PyTorch's rsample formula of `base` on the noise eps: loc + scale eps, or loc + L eps with
    L read through its lower triangle, as log_prob reads it (PyTorch's rsample would hand its
    upper triangle a gradient too: tests/test_squashed_distributions.py)."""
    if kind.endswith("diag"):
        return base.mean + base.stddev * eps
    return base.loc + (base._unbroadcasted_scale_tril.tril() @ eps.unsqueeze(-1)).squeeze(-1)


def assert_empty_results(dist, log_prob, value, leaves, sample_shape) -> None:
    """Of a zero-size batch: the shapes of a log_prob, its gradients, the entropy and a sample."""
    assert log_prob.shape == torch.broadcast_shapes(value.shape[:-1], dist.batch_shape)
    grads = torch.autograd.grad(log_prob.sum(), leaves, allow_unused=True, materialize_grads=True)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    if not isinstance(dist, td.TransformedDistribution):
        assert dist.entropy().shape == dist.batch_shape
    assert dist.rsample(sample_shape).shape == sample_shape + dist.batch_shape + dist.event_shape


@requires_compiled_cpu
@settings(max_examples=4 * EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_distribution_matches_torch(data):
    """log_prob and its gradients, entropy, mean, and rsample from one seed: fusedgauss's
    distribution in the drawn dtype against torch.distributions' in float64 on the same values
    (rsample: PyTorch's formula on the noise torch.randn draws in that dtype; PyTorch itself
    builds no float16 or bfloat16 covariance or precision MultivariateNormal on the CPU,
    as its Cholesky factorisation there takes neither)."""
    kind, k, parameters, value, sample_shape, dtype, bounds = data.draw(distribution_cases(), label="case")
    what = f"{kind} k={k} {dtype} bounds {bounds}"
    leaves = [t.detach().requires_grad_() for t in parameters]
    leaves64 = [t.detach().double().requires_grad_() for t in parameters]
    bounds64 = {b: v.double() if isinstance(v, torch.Tensor) else v for b, v in bounds.items()}
    ours = fusedgauss_distribution(kind, *leaves, bounds=bounds)
    theirs = torch_distribution(kind, *leaves64, bounds=bounds64)
    log_prob = ours.log_prob(value)
    assert log_prob.dtype == dtype
    size = "empty" if log_prob.numel() == 0 else "k > 8" if k > 8 else "k <= 8"
    event(f"{kind}, {size}")  # hypothesis's statistics (--hypothesis-show-statistics) count the cases
    if log_prob.numel() == 0:  # torch.distributions raises on zero-size batches (its Mahalanobis)
        assert_empty_results(ours, log_prob, value, leaves, sample_shape)
        return
    want = theirs.log_prob(value.double())
    assert_close_with_gradients({"log_prob": log_prob}, (want,), leaves, leaves64, dtype, what)
    if not kind.startswith("tanh"):
        assert_close_to(ours.entropy().detach(), theirs.entropy().detach(), dtype, f"{what} entropy")
        assert_close_to(ours.mean.detach(), theirs.mean.detach(), dtype, f"{what} mean")
    else:  # from the stored pre-tanh value, as PPO scores its actions
        squashed = value.double()
        for transform in reversed(theirs.transforms[1:]):  # the bounds' affine map
            squashed = transform.inv(squashed)
        pre_tanh = torch.atanh(squashed)
        assert_close_to(ours.log_prob(value, pre_tanh=pre_tanh.to(dtype)).detach(), want.detach(), dtype,
                        f"{what} log_prob from the pre-tanh value")
    torch.manual_seed(1)
    sample = ours.rsample(sample_shape)
    assert sample.dtype == dtype
    torch.manual_seed(1)  # PyTorch's rsample: its formula on torch.randn's numbers after the seed
    eps = torch.randn(sample_shape + ours.batch_shape + ours.event_shape, dtype=dtype).double()
    want_sample = reparameterised(kind, theirs.base_dist if kind.startswith("tanh") else theirs, eps)
    if kind.startswith("tanh"):
        want_sample = torch.tanh(want_sample)
        for transform in theirs.transforms[1:]:
            want_sample = transform(want_sample)
    assert_close_to(sample.detach(), want_sample.detach(), dtype, f"{what} rsample")


@requires_compiled_cpu
@settings(max_examples=2 * EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rsample_log_prob_matches_the_plain_composition(data):
    """A squashed distribution's rsample_log_prob against the plain-PyTorch composition in
    float64 from the same noise (torch.randn after the same seed): u = base(ε), tanh(u), the
    base's log-prob of u less log|d tanh/du|; the outputs and the reparameterised gradients of
    a random weighting of both outputs."""
    kind, k, parameters, _, sample_shape, dtype, _ = data.draw(
        distribution_cases([kind for kind in KINDS if kind.startswith("tanh")]), label="case")
    leaves = [t.detach().requires_grad_() for t in parameters]
    leaves64 = [t.detach().double().requires_grad_() for t in parameters]
    ours, theirs = fusedgauss_distribution(kind, *leaves), torch_distribution(kind, *leaves64)
    torch.manual_seed(1)
    action, log_prob, pre_tanh = ours.rsample_log_prob(sample_shape, return_pre_tanh=True)
    if action.numel() == 0:  # torch.distributions' log-prob raises on zero-size batches
        assert action.shape == pre_tanh.shape == sample_shape + ours.batch_shape + ours.event_shape
        assert log_prob.shape == sample_shape + ours.batch_shape
        return
    torch.manual_seed(1)
    eps = torch.randn(theirs.base_dist._extended_shape(sample_shape), dtype=dtype).double()
    base = theirs.base_dist
    u = reparameterised(kind, base, eps)
    want = (torch.tanh(u), base.log_prob(u) - td.TanhTransform().log_abs_det_jacobian(u, None).sum(-1))
    what = f"{kind} k={k} {dtype}"
    assert_close_to(pre_tanh.detach(), u.detach(), dtype, f"{what} pre-tanh value")
    assert_close_with_gradients({"action": action, "log_prob": log_prob}, want, leaves, leaves64, dtype, what)


def nearby_parameters(kind: str, parameters: tuple, generator: torch.Generator) -> tuple:
    """Another distribution's parameters of `kind`, of the same shapes: each entry moved or
    scaled so that it stays valid (a factor's positive diagonal, a covariance's definiteness)."""
    def like(t):
        return torch.randn(t.shape, dtype=torch.float64, generator=generator).to(t.dtype)

    def factor(t):
        return (0.5 + torch.rand(t.shape, dtype=torch.float64, generator=generator)).to(t.dtype)

    if kind.endswith("head"):
        return (parameters[0] + 0.1 * like(parameters[0]),)
    loc, matrix = parameters
    if kind in ("covariance_matrix", "precision_matrix"):
        moved = matrix + 0.5 * torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    elif kind.endswith("packed"):
        moved = matrix + 0.1 * like(matrix)
    else:
        moved = matrix * factor(matrix)
    return loc + like(loc), moved


@requires_compiled_cpu
@settings(max_examples=2 * EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kl_divergence_matches_torch(data):
    """torch.distributions.kl_divergence of two fusedgauss distributions of one kind (the
    fused KL of two MultivariateNormals) against PyTorch's in float64, and its gradients."""
    kind, k, parameters, _, _, dtype, _ = data.draw(
        distribution_cases([kind for kind in KINDS if not kind.startswith("tanh")]), label="case")
    other = nearby_parameters(kind, parameters, torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1))))
    leaves = [t.detach().requires_grad_() for t in (*parameters, *other)]
    leaves64 = [t.detach().double().requires_grad_() for t in (*parameters, *other)]
    half = len(parameters)
    p, q = fusedgauss_distribution(kind, *leaves[:half]), fusedgauss_distribution(kind, *leaves[half:])
    kl = td.kl_divergence(p, q)
    assert kl.dtype == dtype and kl.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    if kl.numel() == 0:  # torch.distributions raises on zero-size batches
        return
    want = td.kl_divergence(torch_distribution(kind, *leaves64[:half]), torch_distribution(kind, *leaves64[half:]))
    assert_close_with_gradients({"KL": kl}, (want,), leaves, leaves64, dtype, f"{kind} k={k} {dtype}")
