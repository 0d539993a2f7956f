"""DiagNormal, StableTanhTransform, TanhNormal and TanhMultivariateNormal: drop-in behaviour,
the gradient semantics of policy gradients and reparameterisation, the transform cache, and
saturation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributions as td
from helpers import hessian_vector_products, random_scale_tril

import fusedgauss
from fusedgauss import backends

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with backends.use(request.param):
        yield request.param


def torch_tanh_normal(loc, scale, low=None, high=None):
    """PyTorch's composition that TanhNormal drops in for."""
    transforms = [td.TanhTransform(cache_size=1)]
    if low is not None:
        transforms.append(td.AffineTransform((high + low) / 2, (high - low) / 2, event_dim=1, cache_size=1))
    return td.TransformedDistribution(td.Independent(td.Normal(loc, scale), 1), transforms)


def torch_tanh_mvn(loc, scale_tril):
    return td.TransformedDistribution(td.MultivariateNormal(loc, scale_tril=scale_tril), [td.TanhTransform(cache_size=1)])


# --- DiagNormal ---------------------------------------------------------------------------


def test_diag_normal_is_a_drop_in(backend):
    loc = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()  # shared, as a state-free log-std
    ours = fusedgauss.DiagNormal(loc, scale)
    theirs = td.Independent(td.Normal(loc, scale), 1)
    assert isinstance(ours, td.Independent)
    assert ours.batch_shape == theirs.batch_shape and ours.event_shape == theirs.event_shape
    value = torch.randn(3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(ours.log_prob(value), theirs.log_prob(value))
    (g_ours,) = torch.autograd.grad(ours.log_prob(value).sum(), scale)
    (g_theirs,) = torch.autograd.grad(theirs.log_prob(value).sum(), scale)
    torch.testing.assert_close(g_ours, g_theirs)
    for name in ("mean", "mode", "variance", "stddev"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    torch.testing.assert_close(ours.entropy(), theirs.entropy())
    other = fusedgauss.DiagNormal(loc.detach() + 1, scale.detach() * 2)
    torch.testing.assert_close(
        td.kl_divergence(ours, other), td.kl_divergence(theirs, td.Independent(td.Normal(loc + 1, scale * 2), 1))
    )
    torch.manual_seed(3)
    sample = ours.rsample((2,))
    torch.manual_seed(3)
    torch.testing.assert_close(sample, theirs.rsample((2,)))
    expanded = ours.expand((5, 6))
    assert expanded.batch_shape == (5, 6)
    torch.testing.assert_close(expanded.log_prob(value[0]), theirs.expand((5, 6)).log_prob(value[0]))


@pytest.mark.parametrize("scale_shape", [(4,), (6, 4), (6, 1), (1, 4), ()], ids=str)
def test_diag_normal_entropy(scale_shape):
    """The entropy, taken on the unbroadcast scale, and its gradient are the Independent
    Normal's for every way the scale broadcasts against loc (6, 4), expanded too."""
    loc = torch.randn(6, 4, dtype=torch.float64)
    scale = (torch.rand(scale_shape, dtype=torch.float64) + 0.5).requires_grad_()
    ours, theirs = fusedgauss.DiagNormal(loc, scale), td.Independent(td.Normal(loc, scale), 1)
    weights = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(ours.entropy(), theirs.entropy())
    (g_ours,) = torch.autograd.grad((ours.entropy() * weights).sum(), scale)
    (g_theirs,) = torch.autograd.grad((theirs.entropy() * weights).sum(), scale)
    torch.testing.assert_close(g_ours, g_theirs)
    torch.testing.assert_close(ours.expand((3, 6)).entropy(), theirs.expand((3, 6)).entropy())
    assert fusedgauss.DiagNormal(loc, 0.5).entropy().shape == (6,)


def test_diag_normal_kl_divergence():
    """KL between two DiagNormals: PyTorch's Independent/Normal numbers bit for bit, and on a
    zero-size batch too, where PyTorch's reshape to (0, -1) raises."""
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    ours = td.kl_divergence(fusedgauss.DiagNormal(loc, scale), fusedgauss.DiagNormal(loc + 1, scale * 2))
    theirs = td.kl_divergence(td.Independent(td.Normal(loc, scale), 1),
                              td.Independent(td.Normal(loc + 1, scale * 2), 1))
    assert torch.equal(ours, theirs)
    empty = fusedgauss.DiagNormal(torch.zeros(0, 3), torch.ones(0, 3))
    assert td.kl_divergence(empty, empty).shape == (0,)


def test_diag_normal_checks_its_arguments():
    with pytest.raises(ValueError, match="scale"):
        fusedgauss.DiagNormal(torch.zeros(3), -torch.ones(3), validate_args=True)
    with pytest.raises(ValueError, match="support"):
        fusedgauss.DiagNormal(torch.zeros(3), torch.ones(3), validate_args=True).log_prob(torch.tensor([0.0, math.nan, 0.0]))


# --- StableTanhTransform ------------------------------------------------------------------


def test_stable_tanh_transform_is_a_drop_in(backend):
    t = fusedgauss.StableTanhTransform()
    assert isinstance(t, td.transforms.TanhTransform) and t == td.TanhTransform()
    assert t._cache_size == 1 and t.with_cache(0)._cache_size == 0 and t.with_cache(1) is t
    x = torch.randn(50, dtype=torch.float64) * 3
    y = t(x)
    torch.testing.assert_close(y, torch.tanh(x))
    assert t.inv(y) is x  # the cache, by identity
    torch.testing.assert_close(t.inv(y.clone()), x)
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), td.TanhTransform().log_abs_det_jacobian(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_stable_tanh_inverse_clamps_by_dtype(dtype):
    y = torch.tensor([-1.0, 1.0, 0.25], dtype=dtype)
    x = fusedgauss.StableTanhTransform(cache_size=0).inv(y)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(x).all()
    expected = torch.atanh(torch.tensor([-(1 - eps), 1 - eps, 0.25], dtype=torch.float64))
    torch.testing.assert_close(x.double(), expected, rtol=2 * eps, atol=0)
    assert torch.isinf(td.TanhTransform().inv(y[:2])).all()  # PyTorch's


# --- TanhNormal and TanhMultivariateNormal: values against PyTorch ---------------------------


def make_squashed(kind, batch=8, k=3, dtype=torch.float64, scale_scale=1.0, loc_scale=1.0):
    """(ours, PyTorch's composition, leaves) for a diagonal or scale_tril base."""
    loc = (loc_scale * torch.randn(batch, k, dtype=dtype)).requires_grad_()
    if kind == "diag":
        scale = (scale_scale * (torch.rand(batch, k, dtype=dtype) + 0.5)).requires_grad_()
        return fusedgauss.TanhNormal(loc, scale), torch_tanh_normal(loc, scale), (loc, scale)
    L = (scale_scale * random_scale_tril((batch,), k, dtype=dtype)).requires_grad_()
    return fusedgauss.TanhMultivariateNormal(loc, scale_tril=L), torch_tanh_mvn(loc, L), (loc, L)


@pytest.mark.parametrize("kind", ["diag", "tril"])
def test_rsample_log_prob_is_torchs_reparameterised_composition(backend, kind):
    """The same draw, the same action and log-prob, and the same reparameterised gradients as
    PyTorch's rsample followed by log_prob of that very action (a cache hit)."""
    ours, theirs, leaves = make_squashed(kind)
    torch.manual_seed(5)
    action, log_prob = ours.rsample_log_prob((2,))
    torch.manual_seed(5)
    expected_action = theirs.rsample((2,))
    expected_log_prob = theirs.log_prob(expected_action)
    torch.testing.assert_close(action, expected_action)
    torch.testing.assert_close(log_prob, expected_log_prob)
    weights = torch.randn(action.shape, dtype=action.dtype)
    got = torch.autograd.grad((log_prob + (weights * action).sum(-1)).sum(), leaves)
    expected = torch.autograd.grad((expected_log_prob + (weights * expected_action).sum(-1)).sum(), leaves)
    if kind == "tril":
        # scale_tril is read through its lower triangle, as by log_prob; PyTorch's rsample
        # multiplies by the whole matrix and so also differentiates the zeros above it.
        assert (got[1].triu(1) == 0).all()
        expected = (expected[0], expected[1].tril())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", ["diag", "tril"])
def test_log_prob_of_stored_actions(backend, kind):
    """The PPO path: actions (and their pre-tanh values) stored detached, scored later; the
    same numbers and gradients as PyTorch's log_prob of the action."""
    ours, theirs, leaves = make_squashed(kind)
    with torch.no_grad():
        u = theirs.base_dist.sample()
    action = torch.tanh(u)
    expected = theirs.log_prob(action.clone())
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for kwargs in ({"pre_tanh": u}, {}):
        got = ours.log_prob(action.clone(), **kwargs)
        torch.testing.assert_close(got, expected)
        for g, e in zip(torch.autograd.grad(got.sum(), leaves), expected_grads):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", ["diag", "tril"])
def test_second_derivatives_match_pytorch(backend, kind):
    """Hessian-vector products (create_graph=True, then a gradient of the gradients) of the
    stored-action log-prob, the reparameterised SAC loss and DiagNormal's log-prob."""
    ours, theirs, leaves = make_squashed(kind)
    vectors = [torch.randn_like(leaf) for leaf in leaves]
    with torch.no_grad():
        u = theirs.base_dist.sample()
    pairs = [(ours.log_prob(torch.tanh(u), pre_tanh=u).sum(), theirs.log_prob(torch.tanh(u)).sum())]
    if kind == "diag":  # (PyTorch's rsample also differentiates the zeros above a scale_tril)
        torch.manual_seed(5)
        action, log_prob = ours.rsample_log_prob()
        torch.manual_seed(5)
        expected_action = theirs.rsample()
        value = torch.randn_like(u)
        pairs += [((log_prob - action.sum(-1)).sum(),
                   (theirs.log_prob(expected_action) - expected_action.sum(-1)).sum()),
                  (fusedgauss.DiagNormal(*leaves).log_prob(value).sum(),
                   td.Independent(td.Normal(*leaves), 1).log_prob(value).sum())]
    for ours_scalar, theirs_scalar in pairs:
        got = hessian_vector_products(ours_scalar, leaves, vectors)
        for g, w in zip(got, hessian_vector_products(theirs_scalar, leaves, vectors)):
            torch.testing.assert_close(g, w)


def test_bounds_rescale_like_an_affine_transform(backend):
    loc = torch.randn(8, 3, dtype=torch.float64)
    scale = torch.rand(8, 3, dtype=torch.float64) + 0.5
    low = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64)
    high = torch.tensor([2.0, 1.0, 5.0], dtype=torch.float64)
    ours = fusedgauss.TanhNormal(loc, scale, low=low, high=high)
    theirs = torch_tanh_normal(loc, scale, low, high)
    torch.manual_seed(2)
    action, log_prob = ours.rsample_log_prob()
    torch.manual_seed(2)
    expected_action = theirs.rsample()
    torch.testing.assert_close(action, expected_action)
    assert ((action >= low) & (action <= high)).all()
    torch.testing.assert_close(log_prob, theirs.log_prob(expected_action))
    torch.testing.assert_close(ours.log_prob(action.detach().clone()), theirs.log_prob(action.detach().clone()))
    torch.testing.assert_close(ours.deterministic_action, (high + low) / 2 + (high - low) / 2 * torch.tanh(loc))


def test_deterministic_action_expand_and_entropy(backend):
    ours, _, (loc, _) = make_squashed("diag")
    torch.testing.assert_close(ours.deterministic_action, torch.tanh(loc))
    expanded = ours.expand((4, 8))
    assert expanded.batch_shape == (4, 8) and expanded.sample().shape == (4, 8, 3)
    with pytest.raises(NotImplementedError, match="no closed-form entropy"):
        ours.entropy()
    with pytest.raises(NotImplementedError):
        torch_tanh_normal(loc, torch.ones_like(loc)).entropy()  # PyTorch raises too


def test_tanh_multivariate_normal_from_covariance(backend):
    loc = torch.randn(8, 3, dtype=torch.float64)
    L = random_scale_tril((8,), 3)
    ours = fusedgauss.TanhMultivariateNormal(loc, covariance_matrix=L @ L.mT)
    action = torch.tanh(torch.randn(8, 3, dtype=torch.float64))
    torch.testing.assert_close(ours.log_prob(action), torch_tanh_mvn(loc, L).log_prob(action.clone()))


# --- the transform cache --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["diag", "tril"])
def test_cache_hits_and_misses_like_pytorch(backend, kind):
    """Saturating samples tell a hit from a miss: a hit scores the exact pre-tanh value, a miss
    inverts an action that rounded to ±1 (PyTorch gets inf there, ours the clamped value).
    The very tensor the sample returned hits; a detached or cloned one misses, in both."""
    ours, theirs, _ = make_squashed(kind, dtype=torch.float32, loc_scale=12.0, scale_scale=0.1)
    torch.manual_seed(0)
    action, exact = ours.rsample_log_prob()
    torch.manual_seed(0)
    theirs_action = theirs.rsample()
    assert (action.abs() == 1).any()  # some entries saturated

    def hit(log_prob, reference):
        return bool(torch.isfinite(log_prob).all() and torch.allclose(log_prob, reference, rtol=1e-4, atol=1e-3))

    theirs_exact = theirs.log_prob(theirs_action)
    assert hit(ours.log_prob(action), exact) and hit(theirs_exact, exact)
    for derive in (torch.Tensor.detach, torch.Tensor.clone):
        ours.rsample_log_prob(), theirs.rsample()  # refill the caches
        torch.manual_seed(0)
        action, exact = ours.rsample_log_prob()
        torch.manual_seed(0)
        theirs_action = theirs.rsample()
        ours_missed = ours.log_prob(derive(action))
        assert not hit(ours_missed, exact) and torch.isfinite(ours_missed).all()
        assert not hit(theirs.log_prob(derive(theirs_action)), exact)
        # PyTorch's miss overwrote its cache, so the sample itself misses now; so does ours.
        assert not hit(ours.log_prob(action), exact)
        assert not hit(theirs.log_prob(theirs_action), exact)


def test_log_prob_with_pre_tanh_needs_no_cache(backend):
    """PPO's path with saturated actions: the stored (action, u) pair scored by a new
    distribution (its own, empty cache) gives the exact log-prob of the sample."""
    ours, _, (loc, scale) = make_squashed("diag", dtype=torch.float32, loc_scale=12.0, scale_scale=0.1)
    action, log_prob, u = ours.sample_log_prob(return_pre_tanh=True)
    assert not u.requires_grad and (action.abs() == 1).any()
    fresh = fusedgauss.TanhNormal(loc, scale)
    torch.testing.assert_close(fresh.log_prob(action, pre_tanh=u), log_prob)
    _, exact, u_rsample = ours.rsample_log_prob(return_pre_tanh=True)
    assert u_rsample.requires_grad  # the reparameterised u stays in the graph


# --- gradient semantics ---------------------------------------------------------------------


def test_undetached_pitfall_in_plain_torch_and_not_through_our_api(backend):
    """y = μ + σx. Scoring an undetached, reparameterised y with the transform cache (plain
    PyTorch) gives log p(y) = log N(x) - log σ: no dependence on μ, so a policy gradient
    through it is silently zero. Through our API, the policy-gradient log-prob depends on μ
    with the analytic derivative (y - μ)/σ²."""
    mu = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    pitfall = td.TransformedDistribution(td.Normal(torch.zeros(1, dtype=torch.float64), 1.0),
                                         [td.AffineTransform(mu, sigma, cache_size=1)])
    y = pitfall.rsample((1000,))
    (d_mu,) = torch.autograd.grad(pitfall.log_prob(y).sum(), mu, allow_unused=True)
    assert d_mu is None  # μ is not even in the graph: the policy gradient lost it

    ours = fusedgauss.DiagNormal(mu, sigma)
    action = ours.sample((1000,))  # data, detached, as a policy gradient needs
    assert not action.requires_grad
    (d_mu,) = torch.autograd.grad(ours.log_prob(action).sum(), mu)
    torch.testing.assert_close(d_mu, ((action - mu) / sigma**2).sum(0).detach())

    squashed = fusedgauss.TanhNormal(mu, sigma)
    action, log_prob = squashed.sample_log_prob((1000,))
    assert not action.requires_grad
    u = torch.atanh(action.double())
    (d_mu,) = torch.autograd.grad(log_prob.sum(), mu)
    torch.testing.assert_close(d_mu, ((u - mu) / sigma**2).sum(0).detach(), rtol=1e-6, atol=1e-6)


def gauss_expectation(f, mu, sigma, n=200001, width=12.0):
    """E f(μ + σ ε), ε ~ N(0, 1), by the trapezoid rule on a fine grid (f elementwise)."""
    eps = torch.linspace(-width, width, n, dtype=torch.float64)
    density = torch.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi)
    return torch.trapezoid(f(mu + sigma * eps, eps) * density, eps)


def estimate(loss_of_batch, params, batches=40):
    """Mean and standard error of the gradient estimates of `batches` independent batches."""
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_of_batch(), params)])
                         for _ in range(batches)])
    return grads.mean(0), grads.std(0) / math.sqrt(batches)


def test_policy_gradient_and_reparameterised_estimates_match_the_analytic_gradient(backend):
    """R(a) = Σ wᵢ aᵢ + aᵢ² for a = tanh(u), u ~ N(μ, diag σ²). ∂E[R]/∂μ and ∂E[R]/∂σ by
    quadrature, against the score-function (policy-gradient) estimate through sample_log_prob
    and the pathwise estimate through rsample_log_prob."""
    torch.manual_seed(11)
    mu = torch.tensor([0.4, -1.2], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.8, 0.5], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    n = 20000

    def reward(a):
        return (w * a + a**2).sum(-1)

    def path_derivative(i):
        """∂R/∂uᵢ = (wᵢ + 2 aᵢ)(1 - aᵢ²), as a function of (u, ε)."""
        return lambda u, e: (w[i] + 2 * torch.tanh(u)) * (1 - torch.tanh(u) ** 2)

    d_mu = torch.stack([gauss_expectation(path_derivative(i), mu[i].item(), sigma[i].item()) for i in range(2)])
    d_sigma = torch.stack([
        gauss_expectation(lambda u, e, i=i: path_derivative(i)(u, e) * e, mu[i].item(), sigma[i].item())
        for i in range(2)
    ])
    expected = torch.cat([d_mu, d_sigma])
    dist = fusedgauss.TanhNormal(mu.expand(n, 2), sigma.expand(n, 2))

    def policy_gradient():
        action, log_prob = dist.sample_log_prob()
        r = reward(action)
        return ((r - r.mean()) * log_prob).mean()

    def pathwise():
        action, _ = dist.rsample_log_prob()
        return reward(action).mean()

    for loss in (policy_gradient, pathwise):
        mean, stderr = estimate(loss, (mu, sigma))
        assert ((mean - expected).abs() <= 5 * stderr + 1e-4).all(), (loss.__name__, mean, expected, stderr)


def test_policy_gradient_for_a_full_covariance_base(backend):
    """R(a) = Σ wᵢ aᵢ with a = tanh(u), u ~ N(μ, L Lᵀ): uᵢ's marginal is N(μᵢ, Σᵢᵢ), so by
    quadrature ∂E[R]/∂μᵢ = wᵢ E[1 - tanh²] and ∂E[R]/∂Lᵢⱼ = ∂E[R]/∂σᵢ · Lᵢⱼ/σᵢ; the policy-gradient
    estimate through TanhMultivariateNormal.sample_log_prob agrees."""
    torch.manual_seed(12)
    k, n = 2, 20000
    mu = torch.tensor([0.2, -0.6], dtype=torch.float64, requires_grad=True)
    L = torch.tensor([[0.7, 0.0], [0.4, 0.5]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.5, -1.0], dtype=torch.float64)
    sigma = (L.detach() ** 2).sum(-1).sqrt()
    d_mu = torch.stack([w[i] * gauss_expectation(lambda u, e: 1 - torch.tanh(u) ** 2, mu[i].item(), sigma[i].item()) for i in range(k)])
    d_sigma = torch.stack([w[i] * gauss_expectation(lambda u, e: (1 - torch.tanh(u) ** 2) * e, mu[i].item(), sigma[i].item()) for i in range(k)])
    d_L = (d_sigma / sigma)[:, None] * L.detach()
    expected = torch.cat([d_mu, d_L.tril().reshape(-1)])
    dist = fusedgauss.TanhMultivariateNormal(mu.expand(n, k), scale_tril=L)

    def policy_gradient():
        action, log_prob = dist.sample_log_prob()
        r = (w * action).sum(-1)
        return ((r - r.mean()) * log_prob).mean()

    mean, stderr = estimate(policy_gradient, (mu, L))
    upper = torch.tensor([False, False, False, True, False, False])  # L's (0, 1) entry: no gradient
    assert (mean[upper] == 0).all()
    assert ((mean - expected).abs() <= 5 * stderr + 1e-4).all(), (mean, expected, stderr)


# --- saturation and validation -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["diag", "tril"])
def test_saturated_samples_stay_finite(backend, kind):
    """|u| up to 20 in float32: rsample_log_prob, log_prob of the sample (cache hit) and with
    pre_tanh are finite, agree with each other, and have finite gradients."""
    ours, _, leaves = make_squashed(kind, dtype=torch.float32, loc_scale=20.0, scale_scale=0.05)
    action, log_prob = ours.rsample_log_prob()
    assert (action.abs() == 1).any()
    u = ours._squash._cached_x_y[0]
    for lp in (log_prob, ours.log_prob(action), ours.log_prob(action.detach(), pre_tanh=u.detach())):
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(lp, log_prob, rtol=1e-5, atol=1e-3)
    grads = torch.autograd.grad((log_prob + action.sum(-1)).sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_actions_at_the_bounds_and_outside(backend):
    loc, scale = torch.zeros(2, 3), torch.ones(2, 3)
    dist = fusedgauss.TanhNormal(loc, scale, validate_args=True)
    at_bounds = torch.tensor([[1.0, -1.0, 0.0], [0.5, 1.0, -1.0]])
    assert torch.isfinite(dist.log_prob(at_bounds)).all()
    with pytest.raises(ValueError, match=r"batch index \(1,\) lies outside \[low, high\] = \[-1.0, 1.0\]"):
        dist.log_prob(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.5, 0.0]]))
    bounded = fusedgauss.TanhNormal(loc, scale, low=0.0, high=2.0, validate_args=True)
    with pytest.raises(ValueError, match="outside"):
        bounded.log_prob(torch.full((2, 3), -0.5))
    unchecked = fusedgauss.TanhNormal(loc, scale, validate_args=False)
    assert unchecked.log_prob(torch.full((2, 3), 1.5)).shape == (2,)  # no check, no sync


# --- torch.compile -------------------------------------------------------------------------


def sac_actor_loss(loc, scale, q_weights):
    dist = fusedgauss.TanhNormal(loc, scale, validate_args=False)
    action, log_prob = dist.rsample_log_prob()
    return (0.2 * log_prob - (q_weights * action).sum(-1)).mean()


def ppo_loss(loc, scale, actions, pre_tanh, advantages):
    dist = fusedgauss.TanhNormal(loc, scale, validate_args=False)
    return -(dist.log_prob(actions, pre_tanh=pre_tanh) * advantages).mean()


def diag_loss(loc, scale, actions, advantages):
    return -(fusedgauss.DiagNormal(loc, scale, validate_args=False).log_prob(actions) * advantages).mean()


@pytest.mark.parametrize("loss", [sac_actor_loss, ppo_loss, diag_loss])
def test_compiled_losses_match_eager(backend, loss):
    torch._dynamo.reset()
    B, k = 32, 4
    u = torch.randn(B, k)
    data = {
        sac_actor_loss: (torch.randn(k),),
        ppo_loss: (torch.tanh(u), u, torch.randn(B)),
        diag_loss: (torch.randn(B, k), torch.randn(B)),
    }[loss]
    leaves = (torch.randn(B, k), torch.rand(k) + 0.5)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")

    def run(fn):
        params = [t.clone().requires_grad_() for t in leaves]
        torch.manual_seed(4)
        value = fn(*params, *data)
        return value, torch.autograd.grad(value, params)

    eager_value, eager_grads = run(loss)
    compiled_value, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_value, eager_value)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)
