"""Losses built on fusedgauss trace through torch.compile(fullgraph=True) and give the same
values and gradients as eager."""

from __future__ import annotations

import pytest
import torch
from helpers import random_scale_tril, random_spd

import fusedgauss
from fusedgauss import backends

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]


def policy_loss(loc, matrix, actions, advantages, parameterization):
    if parameterization == "packed":  # a policy head's flat output
        dist = fusedgauss.MultivariateNormal.from_packed(loc, matrix, "softplus", 1e-3, validate_args=False)
    elif parameterization == "head":  # all of it, [loc | packed]: the head op, traced by fake
        dist = fusedgauss.MultivariateNormal.from_head(torch.cat([loc, matrix], -1), "softplus", 1e-3,
                                                       validate_args=False)
    else:
        dist = fusedgauss.MultivariateNormal(loc, validate_args=False, **{parameterization: matrix})
    return -(dist.log_prob(actions) * advantages).mean() - 0.01 * dist.entropy().mean()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("parameterization", ["scale_tril", "covariance_matrix", "packed", "head"])
@pytest.mark.parametrize("shared", [False, True])
def test_compiled_loss_matches_eager(backend, parameterization, shared):
    if parameterization == "head" and shared:
        pytest.skip("a head is one output per sample")
    torch._dynamo.reset()
    B, k = 32, 4
    batch = () if shared else (B,)
    if parameterization in ("packed", "head"):
        matrix = torch.randn(batch + (k * (k + 1) // 2,))
    else:
        make = random_scale_tril if parameterization == "scale_tril" else random_spd
        matrix = make(batch, k, dtype=torch.float32)
    inputs = [torch.randn(B, k), matrix, torch.randn(B, k), torch.randn(B)]
    compiled = torch.compile(policy_loss, fullgraph=True, backend="aot_eager" if backend == "cpu" else "inductor")

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs[:2]]
        with backends.use(backend):
            loss = fn(*leaves, *inputs[2:], parameterization)
        return loss, torch.autograd.grad(loss, leaves)

    eager_loss, eager_grads = run(policy_loss)
    compiled_loss, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


@requires_compiled_cpu
def test_inductor_compiles_the_fused_op():
    """The default inductor backend keeps the custom op in the graph and calls it."""
    torch._dynamo.reset()
    loc = torch.randn(16, 3, requires_grad=True)
    L = random_scale_tril((16,), 3, dtype=torch.float32).requires_grad_()
    value = torch.randn(16, 3)

    def loss(loc, L):
        return fusedgauss.MultivariateNormal(loc, scale_tril=L, validate_args=False).log_prob(value).sum()

    with backends.use("cpu"):
        expected = loss(loc, L)
        got = torch.compile(loss, fullgraph=True)(loc, L)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, L)[0], torch.autograd.grad(expected, L)[0])
