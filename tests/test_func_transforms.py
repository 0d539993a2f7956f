"""torch.func transforms (grad, jacrev, jacfwd, hessian, vmap) and forward-mode AD through the
ops and the distribution classes. PyTorch runs no custom op's autograd formula or batching rule
under them, so there every op runs its plain-PyTorch formula (the torch backend:
backends.under_function_transform, backends.under_forward_ad), and the numbers are those of the
fused ops outside the transforms and of torch.distributions. Forcing a fused backend under a
transform raises.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributions as td
from conftest import requires_compiled_cpu
from helpers import random_scale_tril, random_spd
from test_autograd import sample_inputs

import fusedgauss
from fusedgauss import backends, ops, reference, testing

B, K = 4, 3


def test_the_torch_backend_runs_under_a_transform():
    chosen = []

    def record(x):
        chosen.append(backends.select("cpu", K))
        return x.sum()

    torch.func.grad(record)(torch.randn(K))
    torch.func.vmap(record)(torch.randn(2, K))
    torch.func.jvp(record, (torch.randn(K),), (torch.randn(K),))
    with torch.autograd.forward_ad.dual_level():
        record(torch.randn(K))
    assert chosen == ["torch"] * 4
    assert backends.select("cpu", K) == backends.default_backend("cpu", K)


@requires_compiled_cpu
def test_forcing_a_fused_backend_under_a_transform_raises():
    value, loc, L = sample_inputs("mvn_tril_log_prob")
    with backends.use("cpu"):
        ops.mvn_tril_log_prob(value, loc, L)  # outside a transform it runs
        with pytest.raises(backends.BackendUnavailableError, match="torch.func transform"):
            torch.func.grad(lambda m: ops.mvn_tril_log_prob(value, m, L).sum())(loc)


def _weighted_op(name: str):
    """The op's tensor sample inputs, and a weighted sum of its outputs as a function of them
    (its other arguments fixed)."""
    args = sample_inputs(name)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    op = getattr(ops, name)
    weights = [torch.randn_like(out) for out in testing.as_tuple(op(*args))]

    def loss(*tensors):
        call = list(args)
        for i, t in zip(positions, tensors):
            call[i] = t
        return sum((out * w).sum() for out, w in zip(testing.as_tuple(op(*call)), weights))

    return [args[i] for i in positions], loss


def _fused_gradients(loss, tensors):
    """torch.autograd.grad of loss at tensors, outside any transform: the compiled op and its
    backward kernel."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    return torch.autograd.grad(loss(*leaves), leaves)


@requires_compiled_cpu
@pytest.mark.parametrize("name", ops.OPS)
def test_op_gradients_under_grad_are_the_fused_ones(name):
    """torch.func.grad of a weighted sum of the op's outputs (the plain-PyTorch formula runs)
    against the fused backward's gradient."""
    tensors, loss = _weighted_op(name)
    under_grad = torch.func.grad(loss, argnums=tuple(range(len(tensors))))(*tensors)
    for got, expected in zip(under_grad, _fused_gradients(loss, tensors)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@requires_compiled_cpu
@pytest.mark.parametrize("name", ops.OPS)
def test_op_forward_derivatives_are_the_fused_gradients(name):
    """The directional derivative of a weighted sum of the op's outputs, by forward-mode AD (the
    plain-PyTorch formula runs), against the fused backward's gradient dotted with the
    direction. A covariance moves along symmetric directions (its gradient is symmetric)."""
    tensors, loss = _weighted_op(name)
    directions = [torch.randn_like(t) for t in tensors]
    for j, t in enumerate(tensors):
        if t.dim() >= 2 and t.shape[-1] == t.shape[-2] and torch.equal(t, t.mT):
            directions[j] = directions[j] + directions[j].mT
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(t, d) for t, d in zip(tensors, directions)]
        derivative = torch.autograd.forward_ad.unpack_dual(loss(*duals)).tangent
    expected = sum((g * d).sum() for g, d in zip(_fused_gradients(loss, tensors), directions))
    torch.testing.assert_close(derivative, expected, rtol=1e-10, atol=1e-10)


def _cases():
    """(fusedgauss function, torch.distributions function) of the parameters (loc, scale
    parameter), each a scalar: the log-prob of fixed values summed, or a KL summed."""
    value = torch.randn(B, K, dtype=torch.float64)
    u = torch.randn(B, K, dtype=torch.float64)

    def mvn(param):
        return lambda dist: lambda loc, p: dist(loc, **{param: p}).log_prob(value).sum()

    def diag(dist):
        return lambda loc, s: dist(loc, s).log_prob(value).sum()

    other_scale_tril = random_scale_tril((B,), K)

    def kl(dist):
        other = dist(value, scale_tril=other_scale_tril)
        return lambda loc, L: td.kl_divergence(dist(loc, scale_tril=L), other).sum()

    def torch_tanh_normal(loc, s):
        return td.TransformedDistribution(td.Independent(td.Normal(loc, s), 1), [td.TanhTransform()])

    return {
        "mvn scale_tril": ("scale_tril", *map(mvn("scale_tril"), (fusedgauss.MultivariateNormal, td.MultivariateNormal))),
        "mvn covariance": ("covariance", *map(mvn("covariance_matrix"),
                                              (fusedgauss.MultivariateNormal, td.MultivariateNormal))),
        "mvn kl": ("scale_tril", kl(fusedgauss.MultivariateNormal), kl(td.MultivariateNormal)),
        "diag": ("scale", diag(fusedgauss.DiagNormal), diag(lambda loc, s: td.Independent(td.Normal(loc, s), 1))),
        "tanh normal, pre-tanh": ("scale", lambda loc, s: fusedgauss.TanhNormal(loc, s).log_prob(u.tanh(), pre_tanh=u).sum(),
                                  lambda loc, s: torch_tanh_normal(loc, s).log_prob(u.tanh()).sum()),
        "tanh mvn, pre-tanh": (
            "scale_tril",
            lambda loc, L: fusedgauss.TanhMultivariateNormal(loc, scale_tril=L).log_prob(u.tanh(), pre_tanh=u).sum(),
            lambda loc, L: td.MultivariateNormal(loc, scale_tril=L).log_prob(u).sum()
            - reference.tanh_log_abs_det_jacobian(u).sum(),
        ),
    }


def _parameters(kind: str):
    loc = torch.randn(B, K, dtype=torch.float64)
    if kind == "scale":
        return loc, torch.rand(B, K, dtype=torch.float64) + 0.5
    return loc, random_spd((B,), K) if kind == "covariance" else random_scale_tril((B,), K)


TRANSFORMS = {
    "grad": lambda f: torch.func.grad(f, argnums=(0, 1)),
    "jacrev": lambda f: torch.func.jacrev(f, argnums=(0, 1)),
    "jacfwd": lambda f: torch.func.jacfwd(f, argnums=(0, 1)),
    "hessian of loc": lambda f: lambda loc, p: torch.func.hessian(f, argnums=0)(loc, p),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", _cases())
def test_distributions_under_transforms_match_torch(case, transform):
    kind, fused, plain = _cases()[case]
    loc, parameter = _parameters(kind)
    got = TRANSFORMS[transform](fused)(loc, parameter)
    expected = TRANSFORMS[transform](plain)(loc, parameter)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_a_compiled_transform_runs_with_the_torch_backend_forced():
    """torch.compile cannot tell a transform from its own tracing, so the fused ops fail in a
    compiled torch.func.grad (as PyTorch's own custom ops do); forcing the torch backend
    compiles it, with torch.distributions' numbers."""
    kind, fused, plain = _cases()["mvn scale_tril"]
    loc, parameter = _parameters(kind)
    torch._dynamo.reset()
    with backends.use("torch"):
        got = torch.compile(torch.func.grad(fused, argnums=(0, 1)), fullgraph=True, backend="aot_eager")(loc, parameter)
    expected = torch.func.grad(plain, argnums=(0, 1))(loc, parameter)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_log_prob_under_vmap_is_the_batched_one():
    loc, L = _parameters("scale_tril")
    values = torch.randn(5, B, K, dtype=torch.float64)
    dist = fusedgauss.MultivariateNormal(loc, scale_tril=L)
    torch.testing.assert_close(torch.func.vmap(dist.log_prob)(values), dist.log_prob(values), rtol=1e-12, atol=1e-12)
    head = torch.randn(5, B, K + K * (K + 1) // 2, dtype=torch.float64)
    value = values[0]
    torch.testing.assert_close(
        torch.func.vmap(lambda h: fusedgauss.MultivariateNormal.from_head(h).log_prob(value))(head),
        fusedgauss.MultivariateNormal.from_head(head).log_prob(value), rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("base", ["diag", "tril"])
def test_reparameterised_sample_under_grad_is_torchs(base):
    """With a seed, rsample_log_prob under torch.func.grad draws torch's noise and gives the
    gradient of torch's TransformedDistribution (rsample, then the log-prob of that action)."""
    loc, parameter = _parameters("scale" if base == "diag" else "scale_tril")

    def fused(loc, p):
        torch.manual_seed(3)
        squashed = fusedgauss.TanhNormal(loc, p) if base == "diag" else fusedgauss.TanhMultivariateNormal(loc, scale_tril=p)
        action, log_prob = squashed.rsample_log_prob()
        return action.square().sum() + log_prob.sum()

    def plain(loc, p):
        torch.manual_seed(3)
        base_dist = td.Independent(td.Normal(loc, p), 1) if base == "diag" else td.MultivariateNormal(loc, scale_tril=p)
        dist = td.TransformedDistribution(base_dist, [td.TanhTransform(cache_size=1)])
        action = dist.rsample()
        return action.square().sum() + dist.log_prob(action).sum()

    got = torch.func.grad(fused, argnums=(0, 1))(loc, parameter)
    expected = torch.func.grad(plain, argnums=(0, 1))(loc, parameter)
    if base == "tril":
        # Read through its lower triangle, as outside the transform; PyTorch's rsample multiplies
        # by the whole matrix and so differentiates the zeros above it too.
        assert (got[1].triu(1) == 0).all()
        expected = (expected[0], expected[1].tril())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_bad_parameters_under_a_transform_raise_the_usual_error():
    """Validation asks one question of the whole batch under vmap (torch._is_any_true); the
    batch index of the bad entry cannot be read there, and the message goes without it.
    validate_args is passed: torch.compile's first call turns the default off for the process."""
    loc, L = _parameters("scale_tril")
    value = torch.randn(B, K, dtype=torch.float64)
    locs = torch.randn(5, B, K, dtype=torch.float64)
    locs[3, 1, 2] = float("nan")

    def mvn_log_prob(loc, scale_tril=L):
        return fusedgauss.MultivariateNormal(loc, scale_tril=scale_tril, validate_args=True).log_prob(value)

    torch.func.vmap(mvn_log_prob)(locs[:3])  # the good ones pass
    with pytest.raises(ValueError, match=r"^loc contains NaN$"):
        torch.func.vmap(mvn_log_prob)(locs)
    with pytest.raises(ValueError, match=r"^scale_tril must have a positive diagonal$"):
        torch.func.grad(lambda m: mvn_log_prob(m, -L).sum())(loc)
    squashed = fusedgauss.TanhNormal(loc, L.diagonal(dim1=-2, dim2=-1), validate_args=True)
    actions = torch.rand(5, B, K, dtype=torch.float64) * 2 - 1
    actions[2, 0, 1] = 1.5
    torch.func.vmap(squashed.log_prob)(actions[:2])
    with pytest.raises(ValueError, match=r"the action lies outside \[low, high\] = \[-1.0, 1.0\]$"):
        torch.func.vmap(squashed.log_prob)(actions)
