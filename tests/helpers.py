"""Random inputs and oracles shared by the tests and the benchmarks."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedgauss.testing import as_tuple, random_scale_tril, random_spd  # noqa: F401  (the tests' too)


def run_module(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m fusedgauss *args` in a fresh interpreter, with `env` added to this process's
    environment (variables read at import take effect there); `check` raises on failure."""
    return subprocess.run([sys.executable, "-m", "fusedgauss", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=check)


def torch_mvn_log_prob(value, loc, *, scale_tril=None, covariance_matrix=None):
    """torch.distributions' log-prob, the drop-in target."""
    dist = torch.distributions.MultivariateNormal(
        loc, scale_tril=scale_tril, covariance_matrix=covariance_matrix, validate_args=False
    )
    return dist.log_prob(value)


def symmetrise(X):
    """X ↦ (X + Xᵀ)/2: lets gradcheck perturb a matrix argument that is read as symmetric."""
    return 0.5 * (X + X.mT)


def hessian_vector_products(scalar, inputs, vectors):
    """The gradients of <∇ scalar, v> with respect to `inputs` (each v on its input's device):
    a backward pass that builds a graph (create_graph=True), then one through it; zeros where
    a gradient does not depend on an input."""
    grads = torch.autograd.grad(scalar, inputs, create_graph=True)
    assert all(g.requires_grad for g in grads), "a gradient is not differentiable"
    inner = sum((g.double() * v.to(g.device)).sum() for g, v in zip(grads, vectors))
    return torch.autograd.grad(inner, inputs, allow_unused=True, materialize_grads=True)


def plain_torch_scale_tril(packed, diag_transform="softplus", min_diag=0.0):
    """The usual plain-PyTorch policy head: packed (*, k(k+1)/2) into a zero (*, k, k) by index
    assignment, the diagonal through softplus (or exp) plus min_diag, tril. What
    packed_to_scale_tril replaces, and its oracle."""
    n = packed.shape[-1]
    k = (math.isqrt(8 * n + 1) - 1) // 2
    rows, cols = torch.tril_indices(k, k, device=packed.device)
    L = packed.new_zeros(packed.shape[:-1] + (k, k))
    L[..., rows, cols] = packed
    transform = {"softplus": torch.nn.functional.softplus, "exp": torch.exp, "none": lambda x: x}[diag_transform]
    diagonal = transform(L.diagonal(dim1=-2, dim2=-1)) + min_diag
    return L.tril(-1) + torch.diag_embed(diagonal)


def outputs_and_grads(fn, inputs, seed=1):
    """fn's outputs (a tuple, or one tensor, as a list) and the gradients of a random weighting
    of all of them with respect to every input. The inputs become leaves as they are, strides
    included; the weights come from `seed` (the same for every fn) and go to the outputs'
    device."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = as_tuple(fn(*leaves))
    generator = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64, generator=generator).to(o.device)).sum()
               for o in outs)
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


class OpRecorder(TorchDispatchMode):
    """The names of the ops that reach the dispatcher's Python modes."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
