"""Losses built on fusedgauss trace through torch.compile(fullgraph=True) and give the same
values and gradients as eager; a policy built on it exports with torch.export."""

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


class _PolicyHead(torch.nn.Module):
    """A full-covariance policy's head scoring stored actions, and a SAC actor's squashed
    sample from given noise: what an RL user exports with the policy."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.full = torch.nn.Linear(5, k + k * (k + 1) // 2)
        self.diag = torch.nn.Linear(5, 2 * k)

    def forward(self, obs, action, noise):
        dist = fusedgauss.MultivariateNormal.from_head(self.full(obs), validate_args=False)
        loc, log_scale = self.diag(obs).chunk(2, -1)
        return (dist.log_prob(action), dist.entropy(),
                *fusedgauss.squashed_diag_rsample_log_prob(loc, log_scale.exp(), noise))


@requires_compiled_cpu
def test_exported_policy_calls_the_fused_ops_and_matches_eager(tmp_path):
    """torch.export keeps the custom ops in the graph (their fake implementations trace them),
    and a saved and reloaded program gives eager's numbers."""
    torch.manual_seed(0)
    module = _PolicyHead()
    args = (torch.randn(8, 5), torch.randn(8, 3), torch.randn(8, 3))
    program = torch.export.export(module, args)
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"fusedgauss.packed_head_log_prob.default", "fusedgauss.squashed_diag_rsample_log_prob.default"} <= called
    torch.export.save(program, tmp_path / "policy.pt2")
    reloaded = torch.export.load(tmp_path / "policy.pt2").module()
    for got, expected in zip(reloaded(*args), module(*args)):
        torch.testing.assert_close(got, expected)
