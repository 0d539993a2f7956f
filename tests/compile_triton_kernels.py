"""Compiles every fusedgauss Triton kernel to a GPU binary with Triton's real compiler, no
GPU needed: the interpreter runs the kernels' numbers but skips the compiler's checks (global
constants, types, shapes), so this is what catches a kernel that would not build on a GPU.

    TRITON_INTERPRET=0 python tests/compile_triton_kernels.py [--arch 90 ...]

Prints one line per kernel and configuration, and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedgauss.triton_kernels import cholesky, mvn  # noqa: E402

KERNELS = [
    mvn._mvn_tril_log_prob_forward_kernel,
    mvn._mvn_cov_log_prob_forward_kernel,
    mvn._mvn_tril_log_prob_backward_kernel,
    mvn._mvn_cov_log_prob_backward_kernel,
    cholesky._cholesky_forward_kernel,
    cholesky._cholesky_backward_kernel,
]
POINTER_TYPES = {"float32": "*fp32", "float64": "*fp64"}


def constexprs(kernel, k: int, dtype: str) -> dict:
    """The launchers' constexprs (fusedgauss.triton_ops._tile, on a GPU), every switch on."""
    KP = triton.next_power_of_2(k)
    values = {"K": k, "KP": KP, "BLOCK": max(1, min(128, 4096 // (KP * KP))),
              "ACC": tl.float64 if dtype == "float64" else tl.float32}
    values.update({p.name: True for p in kernel.params if p.is_constexpr and p.name not in values})
    return values


def compile_kernel(kernel, k: int, dtype: str, arch: int) -> None:
    consts = constexprs(kernel, k, dtype)
    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name == "partials_ptr":  # the partial sums are in the accumulation type
            signature[p.name] = "*fp64" if dtype == "float64" else "*fp32"
        elif p.name.endswith("_ptr"):
            signature[p.name] = POINTER_TYPES[dtype]
        else:
            signature[p.name] = "i64"
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 6, 17, 32])
    args = parser.parse_args()
    # float64 accumulates in float64: the one dtype whose arithmetic differs (half precision
    # only changes the loads' and stores' types).
    configs = [(k, "float32") for k in args.k] + [(6, "float64")]
    failed = 0
    for kernel, (k, dtype), arch in itertools.product(KERNELS, configs, args.arch):
        try:
            compile_kernel(kernel, k, dtype, arch)
            print(f"ok      {kernel.fn.__name__} K={k} {dtype} sm_{arch}")
        except Exception:  # noqa: BLE001  (report every failure, then fail)
            failed += 1
            print(f"FAILED  {kernel.fn.__name__} K={k} {dtype} sm_{arch}\n{traceback.format_exc()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
