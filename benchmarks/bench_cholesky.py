"""fusedgauss's batched small-matrix cholesky against torch.linalg.cholesky on the CPU.

The op behind ``MultivariateNormal(covariance_matrix=...)`` wherever L itself is needed
(rsample, entropy, scale_tril). For each event size k and batch size B, in one run, with the
conventions of bench_ops.py (torch.utils.benchmark, interleaved rounds, fresh random SPD matrices):

  torch          torch.linalg.cholesky, eager
  torch.compile  the same function under torch.compile
  fusedgauss     fusedgauss.ops.cholesky

for the forward pass alone and for forward+backward (the gradient of a loss of L with respect
to A), with speed-ups and the fraction of this machine's copy bandwidth.

    python benchmarks/bench_cholesky.py
    python benchmarks/bench_cholesky.py --k 6 --batch 65536 --no-compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import fusedgauss  # noqa: E402
from bench_ops import DTYPE, MATRIX_POOL, add_grid_arguments, run_columns, run_grid  # noqa: E402
from helpers import random_spd  # noqa: E402

CASES = ("cholesky",)


def bytes_moved(batch: int, k: int, passes: str) -> int:
    """Forward: read A, write L. Backward: read the gradient of L and L, write A's gradient."""
    matrices = 2 + (3 if passes == "forward+backward" else 0)
    return 4 * batch * k * k * matrices


def steps(batch: int, k: int, passes: str):
    """Zero-argument steps: torch eager, a function returning the compiled torch step, and
    fusedgauss."""
    distinct = min(batch, MATRIX_POOL)
    A = random_spd((distinct,), k, dtype=DTYPE).repeat(-(-batch // distinct), 1, 1)[:batch].contiguous()
    A.requires_grad_()
    weights = torch.randn(k, k, dtype=DTYPE)  # a loss that reaches every entry of L

    def as_step(cholesky):
        if passes == "forward":
            return lambda: cholesky(A)
        return lambda: torch.autograd.grad((cholesky(A) * weights).sum(), A)

    def compiled_step():
        torch._dynamo.reset()
        return as_step(torch.compile(torch.linalg.cholesky, dynamic=False))

    return as_step(torch.linalg.cholesky), compiled_step, as_step(fusedgauss.ops.cholesky)


def run_cell(case, batch, k, passes, compile_torch, min_run_time):
    columns = run_columns(*steps(batch, k, passes), compile_torch, min_run_time)
    return (*columns, bytes_moved(batch, k, passes))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser, CASES, [2, 6, 17, 32], "cpu_cholesky")
    args = parser.parse_args(argv)
    run_grid(args, "CPU benchmark: batched cholesky, fusedgauss vs torch.linalg", run_cell)


if __name__ == "__main__":
    main()
