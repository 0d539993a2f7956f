"""python -m fusedgauss info | check

info   what was built, the versions, the devices and the backend each device gets
check  runs every op on every available backend against the float64 reference, on a few
       random shapes, and prints the largest errors
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, backends, ops, reference


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def info() -> None:
    print(f"fusedgauss {__version__}")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}")
    print(f"  torch built with CUDA: {torch.version.cuda or 'no'}")
    extension = "loaded" if backends.EXTENSION_LOADED else f"not loaded: {backends.EXTENSION_ERROR}"
    print(f"  compiled extension fusedgauss._C: {extension}")
    print(f"    CPU kernels:  {'yes' if backends.COMPILED_CPU else 'no'}")
    if backends.COMPILED_CPU:
        try:
            level = backends.cpu_simd_level()
        except ValueError as error:  # a FUSEDGAUSS_CPU_SIMD this CPU cannot run
            level = f"none: {error}"
        env = os.environ.get("FUSEDGAUSS_CPU_SIMD")
        print(f"      SIMD level: {level}" + (f" (FUSEDGAUSS_CPU_SIMD={env})" if env else "")
              + f"; this CPU runs {', '.join(backends.cpu_simd_levels())}")
        try:
            cache = backends.cpu_output_cache_stats()
            cache_text = (f"keeps up to {cache['limit_bytes'] / 2**20:g} MB of freed outputs of 1 MB or more"
                          if cache["limit_bytes"] else "off")
        except ValueError as error:  # a malformed FUSEDGAUSS_CPU_OUTPUT_CACHE_MB
            cache_text = f"unusable: {error}"
        env = os.environ.get("FUSEDGAUSS_CPU_OUTPUT_CACHE_MB")
        print(f"      output cache: {cache_text}" + (f" (FUSEDGAUSS_CPU_OUTPUT_CACHE_MB={env})" if env else ""))
        transform = backends.cpu_normal_transform()
        capability = torch.backends.cpu.get_cpu_capability()
        print("      sample noise: " + (
            f"torch's normal_ numbers, drawn by fusedgauss (torch's {transform} Box-Muller at its CPU "
            f"capability {capability})" if transform else
            f"torch's normal_ (its Box-Muller at CPU capability {capability} is not mirrored here)"))
    cuda_missing = "no (the build lacked nvcc or a CUDA build of torch, or FUSEDGAUSS_SKIP_CUDA was set)"
    print(f"    CUDA kernels: {'yes' if backends.COMPILED_CUDA else cuda_missing}")
    if backends.TRITON_KERNELS:
        interpreter = "on: they also run CPU tensors" if backends.TRITON_INTERPRETING else "off"
        print(f"  Triton kernels: yes (Triton's interpreter, TRITON_INTERPRET=1, is {interpreter})")
    else:
        print("  Triton kernels: no (triton is not installed)")
    print("  devices:")
    print(f"    cpu: {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"    cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("    cuda: none available")
    forced = backends.forced_backend()
    env = os.environ.get("FUSEDGAUSS_BACKEND")
    print(f"  forced backend: {forced or 'none'}" + (f" (FUSEDGAUSS_BACKEND={env})" if env else ""))
    print("  backend per device (when none is forced):")
    for device_type in ("cpu", "cuda"):
        print(f"    {device_type}: {backends.default_backend(device_type)}")
    print("    under a torch.func transform or forward-mode AD: torch (the fused ops cannot take part)")
    print("  backends:")
    for name in backends.BACKENDS:
        reasons = {d: backends.unavailable_reason(name, d) for d in ("cpu", "cuda")}
        runs_on = [d for d, r in reasons.items() if r is None]
        limit = backends.MAX_EVENT_SIZE[name]
        limit_text = "any event size" if limit is None else f"event sizes up to {limit}, larger go to torch"
        if runs_on:
            print(f"    {name}: runs {' and '.join(runs_on)} tensors; {limit_text}")
            if name == "cuda":
                print(f"      a sample with a matrix of its own: a thread per sample below "
                      f"k={backends.CUDA_WARP_MIN_EVENT_SIZE}, a warp per sample from there")
            missing = [op for op in ops.OPS if backends.missing_op_reason(name, op) is not None]
            if missing:
                print(f"      no kernel for {', '.join(missing)}: those run on the next backend")
        else:
            print(f"    {name}: unavailable: {reasons['cpu'] if name != 'cuda' else reasons['cuda']}")


def check() -> int:
    """Largest relative error of each op and available backend against float64."""
    torch.manual_seed(0)
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    worst = 0.0
    for device_type in device_types:
        for name in backends.BACKENDS:
            if backends.unavailable_reason(name, device_type) is not None:
                continue
            for k in (1, 3, 17):
                value = torch.randn(64, k, dtype=torch.float64, device=device_type)
                loc = torch.randn(64, k, dtype=torch.float64, device=device_type)
                A = torch.randn(64, k, k, dtype=torch.float64, device=device_type)
                cov = A @ A.mT + k * torch.eye(k, dtype=torch.float64, device=device_type)
                L = torch.linalg.cholesky(cov)
                scale = torch.rand(64, k, dtype=torch.float64, device=device_type) + 0.5
                action = torch.tanh(value)
                packed = torch.randn(64, k * (k + 1) // 2, dtype=torch.float64, device=device_type)
                cases = {
                    "mvn_tril_log_prob": (ops.mvn_tril_log_prob, reference.log_prob_of(reference.mvn_tril_log_prob), (value, loc, L)),
                    "mvn_cov_log_prob": (ops.mvn_cov_log_prob, reference.mvn_cov_log_prob, (value, loc, cov)),
                    "cholesky": (ops.cholesky, reference.cholesky, (cov,)),
                    "diag_normal_log_prob": (ops.diag_normal_log_prob, reference.diag_normal_log_prob,
                                             (value, loc, scale)),
                    "squashed_diag_log_prob": (ops.squashed_diag_log_prob, reference.squashed_diag_log_prob,
                                               (action, loc, scale, False)),
                    "squashed_tril_log_prob": (ops.squashed_tril_log_prob,
                                               reference.log_prob_of(reference.squashed_tril_log_prob), (value, loc, L, True)),
                    "squashed_diag_rsample": (ops.squashed_diag_rsample_log_prob,
                                              reference.squashed_diag_rsample_log_prob, (loc, scale, value)),
                    "squashed_tril_rsample": (ops.squashed_tril_rsample_log_prob,
                                              reference.squashed_tril_rsample_log_prob, (loc, L, value)),
                    "packed_to_scale_tril": (ops.packed_to_scale_tril, reference.packed_to_scale_tril,
                                             (packed, "softplus", 1e-3)),
                    "packed_scale_tril_log_det": (ops.packed_scale_tril_log_det, reference.packed_scale_tril_log_det,
                                                  (packed, "softplus", 1e-3)),
                    "mvn_packed_log_prob": (ops.mvn_packed_log_prob, reference.log_prob_of(reference.mvn_packed_log_prob),
                                            (value, loc, packed, "softplus", 1e-3)),
                    "squashed_packed_log_prob": (ops.squashed_packed_log_prob,
                                                 reference.log_prob_of(reference.squashed_packed_log_prob),
                                                 (action, loc, packed, "exp", 0.0, False)),
                }
                for op_name, (op, ref, args) in cases.items():
                    # float32 inputs (flags stay as they are); the last output of an rsample
                    # op is its log-prob.
                    args32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                    expected = ref(*(a.double() if isinstance(a, torch.Tensor) else a for a in args32))
                    with backends.use(name):
                        got = op(*args32)
                    if isinstance(got, tuple):
                        got, expected = got[-1], expected[-1]
                    got = got.double()
                    error = float(((got - expected).abs() / (1 + expected.abs())).max())
                    worst = max(worst, error)
                    print(f"{device_type:5s} {name:7s} {op_name:25s} k={k:2d}  float32 error {error:.2e}")
    ok = worst < 1e-4
    print(f"largest error {worst:.2e}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedgauss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("info", "check"))
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
