"""fusedgauss against torch.distributions on the CPU: diagonal and tanh-squashed Gaussians.

Cases, each at event size k and batch size B, timed in one run with torch.utils.benchmark
(same conventions and columns as bench_ops.py: torch.distributions eager, the same code under
torch.compile, fusedgauss):

  sac_diag, sac_tril   SAC's actor path: a reparameterised squashed action and its log-prob
                       from loc and scale (per-sample, state-dependent). torch:
                       TransformedDistribution(base, [TanhTransform(cache_size=1)]).rsample()
                       and .log_prob of that action (a cache hit); fusedgauss: rsample_log_prob.
                       A fourth column, free, times the step with the distribution made free:
                       the noise, PyTorch's numbers from torch's generator (so that a seed
                       gives PyTorch's samples) drawn as fusedgauss draws them
                       (ops.standard_normal), and a stand-in that computes nothing
                       (_FreeSample). torch ms / free ms is the ceiling of any library that
                       keeps torch's noise and draws it no slower.
  ppo_diag, ppo_tril   PPO's path: the log-prob of stored actions and the policy gradient to
                       loc and scale. torch: log_prob(action) (an atanh); fusedgauss:
                       log_prob(action, pre_tanh=u) with the stored pre-tanh value.
  diag_normal          DiagNormal.log_prob against Independent(Normal).log_prob, per-sample scale.
  diag_normal_shared   the same with one scale for the batch (PPO's state-independent log-std).

Forward+backward is the backward of every output from fixed upstream gradients (dense,
random, drawn once per cell and the same for every column), as the rest of a training step
hands them over: the times are the distribution's, with no loss computed after it. (Until
2026-12-07 the SAC path ended in the loss 0.2 log π(a) - a·q, whose matrix-vector product and
its outer-product backward cost 0.4-0.6 ms at B=65536, k=6, in every column alike. bench_ops.py
still takes the backward of its one output's sum.)

    python benchmarks/bench_squashed.py               # the full grid
    python benchmarks/bench_squashed.py --quick       # B=4096, k=6: a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributions as td

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import fusedgauss  # noqa: E402
from bench_ops import MATRIX_POOL, add_grid_arguments, run_columns, run_grid  # noqa: E402
from helpers import random_scale_tril  # noqa: E402

CASES = ("sac_diag", "sac_tril", "ppo_diag", "ppo_tril", "diag_normal", "diag_normal_shared")
DTYPE = torch.float32


def make_parameters(case: str, batch: int, k: int, device: str = "cpu"):
    """loc (B, k) and the scale (B, k), (k,) or scale_tril (B, k, k), leaves that require grad."""
    loc = torch.randn(batch, k, dtype=DTYPE, device=device).requires_grad_()
    if case.endswith("tril"):
        distinct = min(batch, MATRIX_POOL)
        L = random_scale_tril((distinct,), k, dtype=DTYPE).to(device).repeat(-(-batch // distinct), 1, 1)[:batch]
        return loc, L.contiguous().requires_grad_()
    shape = (k,) if case == "diag_normal_shared" else (batch, k)
    return loc, (0.5 + torch.rand(shape, dtype=DTYPE, device=device)).requires_grad_()


def torch_base(loc, scale):
    if scale.dim() == loc.dim() + 1:
        return td.MultivariateNormal(loc, scale_tril=scale, validate_args=False)
    return td.Independent(td.Normal(loc, scale, validate_args=False), 1, validate_args=False)


def torch_squashed(loc, scale):
    return td.TransformedDistribution(torch_base(loc, scale), [td.TanhTransform(cache_size=1)], validate_args=False)


def fused_squashed(loc, scale):
    if scale.dim() == loc.dim() + 1:
        return fusedgauss.TanhMultivariateNormal(loc, scale_tril=scale, validate_args=False)
    return fusedgauss.TanhNormal(loc, scale, validate_args=False)


class _FreeSample(torch.autograd.Function):
    """A reparameterised squashed sample and its log-prob that cost nothing: the forward
    returns zeros (fresh, as a real op's outputs are), the backward fixed dense gradients to
    loc and the scale, made once (a sum would hand back stride-0 ones, which cost nothing
    downstream and so would not bound anything)."""

    @staticmethod
    def forward(ctx, loc, scale, eps, loc_gradient, scale_gradient):
        ctx.gradients = loc_gradient, scale_gradient
        return loc.new_zeros(eps.shape), loc.new_zeros(eps.shape[:-1])

    @staticmethod
    def backward(ctx, grad_action, grad_log_prob):
        return (*ctx.gradients, None, None, None)


def free_sample(loc: torch.Tensor, scale: torch.Tensor):
    """The SAC path's work outside the distribution: the noise of a sample, drawn as
    fusedgauss draws it, and a _FreeSample of it."""
    gradients = torch.randn_like(loc), torch.randn_like(scale)

    def free_fn(loc, scale):
        eps = fusedgauss.ops.standard_normal(loc.shape, dtype=loc.dtype, device=loc.device)
        return _FreeSample.apply(loc, scale, eps, *gradients)

    return free_fn


def case_functions(case: str, batch: int, k: int, device: str = "cpu"):
    """(torch function, fusedgauss function, their arguments, the upstream gradients of their
    outputs, and for the SAC path the free function)."""
    loc, scale = make_parameters(case, batch, k, device)
    log_prob_gradient = torch.randn(batch, dtype=DTYPE, device=device)
    if case.startswith("sac"):
        action_gradient = torch.randn(batch, k, dtype=DTYPE, device=device)

        def torch_fn(loc, scale):
            dist = torch_squashed(loc, scale)
            action = dist.rsample()
            return action, dist.log_prob(action)

        def fused_fn(loc, scale):
            return fused_squashed(loc, scale).rsample_log_prob()

        upstream = (action_gradient, log_prob_gradient)
        return torch_fn, fused_fn, (loc, scale), (), upstream, free_sample(loc, scale)

    if case.startswith("ppo"):
        with torch.no_grad():
            pre_tanh = torch_base(loc, scale).sample()
        action = torch.tanh(pre_tanh)

        def torch_fn(loc, scale, action, pre_tanh):
            return torch_squashed(loc, scale).log_prob(action)

        def fused_fn(loc, scale, action, pre_tanh):
            return fused_squashed(loc, scale).log_prob(action, pre_tanh=pre_tanh)

        return torch_fn, fused_fn, (loc, scale), (action, pre_tanh), (log_prob_gradient,), None

    value = torch.randn(batch, k, dtype=DTYPE, device=device)

    def torch_fn(loc, scale, value):
        return td.Independent(td.Normal(loc, scale, validate_args=False), 1, validate_args=False).log_prob(value)

    def fused_fn(loc, scale, value):
        return fusedgauss.DiagNormal(loc, scale, validate_args=False).log_prob(value)

    return torch_fn, fused_fn, (loc, scale), (value,), (log_prob_gradient,), None


def steps(case: str, batch: int, k: int, passes: str, device: str = "cpu"):
    """Zero-argument steps: torch eager, a function returning the compiled torch step,
    fusedgauss (on whichever backend is chosen when it runs), and the free step or None."""
    torch_fn, fused_fn, leaves, data, upstream, free_fn = case_functions(case, batch, k, device)

    def as_step(fn):
        if passes == "forward":
            return lambda: fn(*leaves, *data)
        return lambda: torch.autograd.grad(fn(*leaves, *data), leaves, upstream)

    def compiled_step():
        torch._dynamo.reset()
        return as_step(torch.compile(torch_fn, dynamic=False))

    return as_step(torch_fn), compiled_step, as_step(fused_fn), as_step(free_fn) if free_fn is not None else None


def bytes_moved(case: str, batch: int, k: int, passes: str) -> int:
    """Bytes the computation must read and write at the least (float32).

    Per sample: loc (k), the scale (k; k*k for scale_tril; none for a shared scale) and the
    value, or the noise of a sample (k); a sample writes its action and pre-tanh value (2k), a
    log-prob one number. Backward reads them again with the upstream gradients (the action's k
    and the log-prob's one, for a sample) and writes the gradients of loc and the scale.
    """
    scale = 0 if case == "diag_normal_shared" else (k * k if case.endswith("tril") else k)
    inputs = 2 * k + scale  # loc, value or noise, scale
    if case.startswith("sac"):
        forward = inputs + 2 * k + 1
        backward = inputs + k + 1 + k + scale
    else:
        forward = inputs + 1
        backward = inputs + 1 + k + scale
    return 4 * batch * (forward + (backward if passes == "forward+backward" else 0))


def run_cell(case, batch, k, passes, compile_torch, min_run_time):
    torch_step, compiled_step, fused_step, free_step = steps(case, batch, k, passes)
    torch_ms, compile_ms, fused_ms, *free_ms = run_columns(torch_step, compiled_step, fused_step, compile_torch,
                                                           min_run_time, free_step)
    return torch_ms, compile_ms, fused_ms, bytes_moved(case, batch, k, passes), *free_ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=4096, k=6")
    add_grid_arguments(parser, CASES, [6, 17], "cpu_squashed")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.k = [4096], [6]
    run_grid(args, "CPU benchmark: squashed and diagonal Gaussians, fusedgauss vs torch.distributions", run_cell)


if __name__ == "__main__":
    main()
