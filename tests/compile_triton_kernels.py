"""Compiles every fusedgauss Triton kernel to a GPU binary with Triton's real compiler, no
GPU needed: the interpreter runs the kernels' numbers but skips the compiler's checks (global
constants, types, shapes), so this is what catches a kernel that would not build on a GPU.

    TRITON_INTERPRET=0 python tests/compile_triton_kernels.py [--arch 90 ...]

Prints one line per kernel and configuration, and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedgauss.triton_kernels import cholesky, mvn, packed, squashed  # noqa: E402

KERNELS = [
    mvn._mvn_tril_log_prob_forward_kernel,
    mvn._mvn_cov_log_prob_forward_kernel,
    mvn._mvn_tril_log_prob_backward_kernel,
    mvn._mvn_cov_log_prob_backward_kernel,
    mvn._squashed_tril_log_prob_forward_kernel,
    mvn._squashed_tril_log_prob_backward_kernel,
    mvn._mvn_packed_log_prob_forward_kernel,
    mvn._mvn_packed_log_prob_backward_kernel,
    mvn._squashed_packed_log_prob_forward_kernel,
    mvn._squashed_packed_log_prob_backward_kernel,
    cholesky._cholesky_forward_kernel,
    cholesky._cholesky_backward_kernel,
    squashed._diag_log_prob_forward_kernel,
    squashed._diag_log_prob_backward_kernel,
    squashed._squashed_diag_rsample_log_prob_forward_kernel,
    squashed._squashed_diag_rsample_log_prob_backward_kernel,
    squashed._squashed_tril_rsample_log_prob_forward_kernel,
    squashed._squashed_tril_rsample_log_prob_backward_kernel,
    squashed._tanh_log_abs_det_jacobian_forward_kernel,
    squashed._tanh_log_abs_det_jacobian_backward_kernel,
    packed._packed_to_scale_tril_forward_kernel,
    packed._packed_to_scale_tril_backward_kernel,
    packed._packed_scale_tril_log_det_forward_kernel,
    packed._packed_scale_tril_log_det_backward_kernel,
]
POINTER_TYPES = {"float32": "*fp32", "float64": "*fp64"}


def constexprs(kernel, k: int, dtype: str) -> dict:
    """The launchers' constexprs (fusedgauss.triton_ops._tile, on a GPU), every switch on: a
    squashed kernel takes its value as an action (the longest path), clamped at float32's
    epsilon; a packed one takes the softplus diagonal (the longest)."""
    KP = triton.next_power_of_2(k)
    values = {"K": k, "KP": KP, "BLOCK": max(1, min(128, 4096 // (KP * KP))),
              "ACC": tl.float64 if dtype == "float64" else tl.float32, "SQUASH": 2, "EPS": 2.0**-23, "DIAG": 1}
    if not any(p.name == "KP" for p in kernel.params):  # elementwise
        values["BLOCK"] = 1024
    names = {p.name for p in kernel.params if p.is_constexpr}
    values = {name: value for name, value in values.items() if name in names}
    values.update({name: True for name in names if name not in values})
    return values


def compile_kernel(kernel, k: int, dtype: str, arch: int) -> None:
    consts = constexprs(kernel, k, dtype)
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "partials_ptr":  # the partial sums are in the accumulation type
            signature[p.name] = "*fp64" if dtype == "float64" else "*fp32"
        elif p.name == "min_diag":
            signature[p.name] = "fp32"
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTER_TYPES[dtype]
        else:
            signature[p.name] = "i64"
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 6, 17, 32])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles at once (processes)")
    args = parser.parse_args()
    # float64 accumulates in float64: the one dtype whose arithmetic differs (half precision
    # only changes the loads' and stores' types).
    configs = [(k, "float32") for k in args.k] + [(6, "float64")]
    jobs = [(index, k, dtype, arch) for (index, _), (k, dtype), arch
            in itertools.product(enumerate(KERNELS), configs, args.arch)]
    # Each compile is single-threaded and takes seconds to a minute: run them side by side.
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        reports = list(pool.map(compile_job, jobs))
    for report in reports:
        print(report)
    return 1 if any(report.startswith("FAILED") for report in reports) else 0


def compile_job(job) -> str:
    index, k, dtype, arch = job
    kernel = KERNELS[index]
    try:
        compile_kernel(kernel, k, dtype, arch)
        return f"ok      {kernel.fn.__name__} K={k} {dtype} sm_{arch}"
    except Exception:  # noqa: BLE001  (report every failure, then fail)
        return f"FAILED  {kernel.fn.__name__} K={k} {dtype} sm_{arch}\n{traceback.format_exc()}"


if __name__ == "__main__":
    sys.exit(main())
