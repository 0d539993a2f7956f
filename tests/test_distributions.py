"""fusedgauss.MultivariateNormal against torch.distributions.MultivariateNormal."""

from __future__ import annotations

import pytest
import torch
import torch.distributions as td
from helpers import hessian_vector_products, random_scale_tril, random_spd

import fusedgauss
from fusedgauss import backends

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]
PARAMETERIZATIONS = ["scale_tril", "covariance_matrix", "precision_matrix"]


def make_params(parameterization, batch_shape=(4,), k=3, shared=False):
    loc = torch.randn(tuple(batch_shape) + (k,), dtype=torch.float64, requires_grad=True)
    matrix_batch = () if shared else tuple(batch_shape)
    if parameterization == "scale_tril":
        matrix = random_scale_tril(matrix_batch, k)
    else:
        matrix = random_spd(matrix_batch, k)
    return loc, {parameterization: matrix.requires_grad_()}


def both(parameterization, **kwargs):
    loc, params = make_params(parameterization, **kwargs)
    ours = fusedgauss.MultivariateNormal(loc, **params)
    theirs = td.MultivariateNormal(loc, **params)
    return ours, theirs, [loc, *params.values()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("shared", [False, True])
class TestSameAsTorch:
    def test_is_a_torch_multivariate_normal(self, backend, parameterization, shared):
        ours, theirs, _ = both(parameterization, shared=shared)
        assert isinstance(ours, td.MultivariateNormal)
        assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape

    def test_log_prob_and_gradients(self, backend, parameterization, shared):
        ours, theirs, leaves = both(parameterization, shared=shared)
        value = torch.randn(5, 4, 3, dtype=torch.float64)
        with backends.use(backend):
            lp = ours.log_prob(value)
            grads = torch.autograd.grad(lp.sum(), leaves)
        expected = theirs.log_prob(value)
        expected_grads = torch.autograd.grad(expected.sum(), leaves)
        assert lp.shape == expected.shape == (5, 4)
        torch.testing.assert_close(lp, expected)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e)

    def test_properties(self, backend, parameterization, shared):
        ours, theirs, _ = both(parameterization, shared=shared)
        with backends.use(backend):
            for name in ("mean", "mode", "variance", "stddev", "covariance_matrix",
                         "precision_matrix", "scale_tril"):
                torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), msg=name)
                assert getattr(ours, name).shape == getattr(theirs, name).shape, name

    def test_entropy(self, backend, parameterization, shared):
        ours, theirs, leaves = both(parameterization, shared=shared)
        with backends.use(backend):
            h = ours.entropy()
            grads = torch.autograd.grad(h.sum(), leaves[1:])
        expected = theirs.entropy()
        torch.testing.assert_close(h, expected)
        torch.testing.assert_close(grads[0], torch.autograd.grad(expected.sum(), leaves[1:])[0])

    def test_rsample_and_sample(self, backend, parameterization, shared):
        ours, theirs, leaves = both(parameterization, shared=shared)
        with backends.use(backend):
            torch.manual_seed(1)
            x = ours.rsample((6,))
            torch.manual_seed(1)
            y = ours.sample((2,))
        torch.manual_seed(1)
        x_expected = theirs.rsample((6,))
        torch.manual_seed(1)
        y_expected = theirs.sample((2,))
        torch.testing.assert_close(x, x_expected)
        torch.testing.assert_close(y, y_expected)
        assert x.requires_grad and not y.requires_grad
        g = torch.autograd.grad(x.sum(), leaves[1:])[0]
        torch.testing.assert_close(g, torch.autograd.grad(x_expected.sum(), leaves[1:])[0])

    def test_expand(self, backend, parameterization, shared):
        ours, theirs, _ = both(parameterization, shared=shared)
        big, big_expected = ours.expand((2, 4)), theirs.expand((2, 4))
        assert type(big) is fusedgauss.MultivariateNormal
        assert big.batch_shape == big_expected.batch_shape == (2, 4)
        value = torch.randn(2, 4, 3, dtype=torch.float64)
        with backends.use(backend):
            torch.testing.assert_close(big.log_prob(value), big_expected.log_prob(value))
            torch.testing.assert_close(big.scale_tril, big_expected.scale_tril)
            # A value with fewer batch dimensions gets the expanded batch shape, as in PyTorch.
            torch.testing.assert_close(big.log_prob(value[0]), big_expected.log_prob(value[0]))

    def test_kl_divergence(self, backend, parameterization, shared):
        ours_p, theirs_p, leaves = both(parameterization, shared=shared)
        ours_q, theirs_q, _ = both("scale_tril")
        with backends.use(backend):
            kl = td.kl_divergence(ours_p, ours_q)
            grads = torch.autograd.grad(kl.sum(), leaves)
        expected = td.kl_divergence(theirs_p, theirs_q)
        torch.testing.assert_close(kl, expected)
        for g, e in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
            torch.testing.assert_close(g, e)
        # A mixed pair falls back to torch's own formula, which reads our factor.
        torch.testing.assert_close(td.kl_divergence(ours_p, theirs_q), expected)

    def test_second_derivatives(self, backend, parameterization, shared):
        """TRPO's Fisher-vector product (the Hessian of KL(old ‖ new) times a vector) and a
        Hessian-vector product of the log-prob, as with torch.distributions."""
        loc, params = make_params(parameterization, shared=shared)
        old_loc, old_params = make_params(parameterization, shared=shared)
        leaves = [loc, *params.values()]
        value = torch.randn(5, 4, 3, dtype=torch.float64)
        vectors = [torch.randn_like(leaf) for leaf in leaves]

        def hessian_times_vectors(cls, of):
            # Fresh distributions: a lazily computed factor holds a graph that one pass frees.
            scalar = of(cls(loc, **params), cls(old_loc.detach(), **{n: m.detach() for n, m in old_params.items()}))
            return hessian_vector_products(scalar, leaves, vectors)

        for of in (lambda new, old: td.kl_divergence(old, new).mean(), lambda new, old: new.log_prob(value).sum()):
            with backends.use(backend):
                got = hessian_times_vectors(fusedgauss.MultivariateNormal, of)
            for g, w in zip(got, hessian_times_vectors(td.MultivariateNormal, of)):
                torch.testing.assert_close(g, w)


@requires_compiled_cpu
def test_covariance_log_prob_does_not_form_the_factor():
    loc, params = make_params("covariance_matrix")
    dist = fusedgauss.MultivariateNormal(loc, **params)
    dist.log_prob(torch.randn(4, 3, dtype=torch.float64))
    assert "_cholesky_factor" not in dist.__dict__
    dist.rsample()
    assert "_cholesky_factor" in dist.__dict__


def test_shared_scale_tril_gradient_has_its_own_shape():
    loc = torch.randn(1000, 4, requires_grad=True)
    L = random_scale_tril((), 4, dtype=torch.float32).requires_grad_()
    fusedgauss.MultivariateNormal(loc, scale_tril=L).log_prob(torch.randn(1000, 4)).sum().backward()
    assert L.grad.shape == (4, 4)


@pytest.mark.parametrize("validate_args", [None, False])
def test_validate_args_follows_torch(validate_args):
    loc, params = make_params("scale_tril")
    ours = fusedgauss.MultivariateNormal(loc, **params, validate_args=validate_args)
    theirs = td.MultivariateNormal(loc, **params, validate_args=validate_args)
    assert ours._validate_args == theirs._validate_args


@pytest.mark.parametrize("make", [
    lambda loc: fusedgauss.MultivariateNormal(loc, scale_tril=torch.eye(3).expand(0, 3, 3), validate_args=True),
    lambda loc: fusedgauss.DiagNormal(loc, torch.ones(0, 3), validate_args=True),
], ids=["MultivariateNormal", "DiagNormal"])
def test_log_prob_of_a_zero_size_batch_with_validation(make):
    """An empty batch's log-prob is an empty tensor with validation on (PyTorch's own support
    check reshapes the value to (0, -1) and raises there); its shape is still checked."""
    loc = torch.zeros(0, 3, requires_grad=True)
    dist = make(loc)
    log_prob = dist.log_prob(torch.zeros(0, 3))
    assert log_prob.shape == (0,)
    (grad,) = torch.autograd.grad(log_prob.sum(), loc)
    assert grad.shape == (0, 3)
    with pytest.raises(ValueError, match="right-most size of value must match event_shape"):
        dist.log_prob(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="not broadcastable with batch_shape"):
        dist.log_prob(torch.zeros(0, 2, 3))  # batch (0,) against (0, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("parameterization", ["covariance_matrix", "precision_matrix"])
def test_half_precision_covariance_and_precision(parameterization, dtype):
    """float16 and bfloat16 covariance and precision matrices, validated: PyTorch's CPU Cholesky
    and triangular solve take neither dtype (its own MultivariateNormal raises there), so the
    check and the precision's factor run in float32; the numbers match float64 PyTorch's."""
    loc, params = make_params(parameterization, batch_shape=(5,), k=4)
    loc, matrix = loc.detach().to(dtype), params[parameterization].detach().to(dtype)
    ours = fusedgauss.MultivariateNormal(loc, validate_args=True, **{parameterization: matrix})
    theirs = td.MultivariateNormal(loc.double(), **{parameterization: matrix.double()})
    value = torch.randn(5, 4).to(dtype)
    tolerance = {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(ours.log_prob(value).double(), theirs.log_prob(value.double()), **tolerance)
    torch.testing.assert_close(ours.entropy().double(), theirs.entropy(), **tolerance)
    torch.testing.assert_close(ours.scale_tril.double(), theirs.scale_tril, **tolerance)
    assert ours.rsample((2,)).dtype == dtype
    with pytest.raises(ValueError, match="not positive-definite"):
        fusedgauss.MultivariateNormal(loc, validate_args=True, **{parameterization: -matrix})
