"""python -m fusedgauss info | check | bench

info   what was built, the versions, the devices and the backend each device gets
check  runs every op on every available backend and device against the float64 reference,
       outputs and gradients, at a few event sizes, and prints the errors; exits 1 if one is
       too large
bench  times every op on every backend that runs on a device, forward and forward+backward,
       at the batch and event sizes given, against the torch backend (plain PyTorch) and,
       with --compile, its formulas under torch.compile; the benchmarks against
       torch.distributions itself are the repository's benchmarks/
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

from . import __version__, backends, ops, reference, testing


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
    print(f"    cpu: {backends.cpu_name()}, {torch.get_num_threads()} threads")
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


def _kernel_op(name: str) -> str:
    """The op whose kernels decide which backends run op `name`: a policy head's log-prob runs
    the packed log-prob's kernels where no backend has one of its own."""
    return "mvn_packed_log_prob" if name == "packed_head_log_prob" else name


def _runnable_backends(device_type: str, name: str, k: int, names=backends.BACKENDS) -> list[str]:
    """The backends of `names` that run op `name` at event size k on `device_type` tensors."""
    return [
        b for b in names
        if backends.unavailable_reason(b, device_type) is None
        and backends.missing_op_reason(b, _kernel_op(name)) is None
        and (backends.MAX_EVENT_SIZE[b] is None or k <= backends.MAX_EVENT_SIZE[b])
    ]


def _as_leaves(args: list, device, dtype: torch.dtype) -> list:
    return [a.to(device, dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / (1 + |expected|); inf where either holds a NaN."""
    got, expected = got.detach().cpu().double(), expected.detach()
    return float(((got - expected).abs() / (1 + expected.abs())).nan_to_num(nan=math.inf).max())


#: Largest relative error ``|got - expected| / (1 + |expected|)`` that check accepts in float32,
#: of the outputs and of the gradients.
CHECK_TOLERANCE = {"outputs": 1e-4, "gradients": 1e-3}


def check_case(name: str, args: list, device_type: str, backend: str) -> dict[str, float]:
    """The largest relative errors of op `name` on `backend`, in float32, against the float64
    reference on the same (float32-rounded) arguments: of every output, and of the gradient
    of a random weighting of every output to every tensor argument."""
    args32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    ours = _as_leaves(args32, device_type, torch.float32)
    theirs = _as_leaves(args32, "cpu", torch.float64)
    with backends.use(backend):
        got = testing.call_op(name, ours)
    expected = testing.as_tuple(getattr(reference, name)(*theirs))
    weights = [torch.randn(e.shape, dtype=torch.float64) for e in expected]
    ours_tensors = [a for a in ours if isinstance(a, torch.Tensor)]
    theirs_tensors = [a for a in theirs if isinstance(a, torch.Tensor)]
    # An output need not depend on every argument (log_det on value and loc): zeros there.
    got_gradients = torch.autograd.grad(sum((g.double() * w.to(g.device)).sum() for g, w in zip(got, weights)),
                                        ours_tensors, allow_unused=True, materialize_grads=True)
    expected_gradients = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)),
                                             theirs_tensors, allow_unused=True, materialize_grads=True)
    return {
        "outputs": max(_relative_error(g, e) for g, e in zip(got, expected)),
        "gradients": max(_relative_error(g, e) for g, e in zip(got_gradients, expected_gradients)),
    }


def _named_backends_reason(names, device_type: str) -> str | None:
    """Why one of the backends `names` cannot run `device_type` tensors, or None."""
    for name in names or ():
        reason = backends.unavailable_reason(name, device_type)
        if reason is not None:
            return f"backend {name!r} cannot run {device_type} tensors: {reason}"
    return None


def check(args: argparse.Namespace) -> int:
    """Every op (both forms of the squashed log-probs, and the policy-head op; or those named)
    on every available backend (or those named) and device, at a few event sizes, against the
    float64 reference: outputs and gradients. Returns the exit status: 1 if an error passed
    CHECK_TOLERANCE, 2 if a named backend cannot run."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.backends:  # each where it can run
        unrunnable = [b for b in args.backends
                      if all(backends.unavailable_reason(b, d) is not None for d in device_types)]
        if unrunnable:
            return _usage_error(_named_backends_reason(unrunnable, device_types[-1]))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    worst = dict.fromkeys(CHECK_TOLERANCE, 0.0)
    for device_type in device_types:
        for k in args.k:
            for label, name, kwargs in testing.op_cases(args.ops or testing.OPS_AND_HEAD):
                op_args = testing.op_arguments(name, (64,), k, generator=generator, **kwargs)
                for backend in _runnable_backends(device_type, name, k, args.backends or backends.BACKENDS):
                    errors = check_case(name, op_args, device_type, backend)
                    flags = [kind for kind, error in errors.items() if error > CHECK_TOLERANCE[kind]]
                    worst = {kind: max(worst[kind], errors[kind]) for kind in worst}
                    print(f"{device_type:5s} {backend:7s} {label:42s} k={k:2d}  outputs {errors['outputs']:.1e}  "
                          f"gradients {errors['gradients']:.1e}"
                          + (f"  TOO LARGE: {', '.join(flags)}" if flags else ""))
    ok = all(worst[kind] <= CHECK_TOLERANCE[kind] for kind in worst)
    print(f"largest float32 errors: outputs {worst['outputs']:.2e} (tolerance {CHECK_TOLERANCE['outputs']:g}), "
          f"gradients {worst['gradients']:.2e} (tolerance {CHECK_TOLERANCE['gradients']:g}): "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def _timed_ms(step, min_run_time: float) -> float:
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


#: bench's column of the torch backend's formulas under torch.compile (--compile).
COMPILED_TORCH = "torch.compile"


def bench_case(name: str, args: list, device_type: str, dtype: torch.dtype, backend: str,
               min_run_time: float) -> dict[str, float]:
    """Milliseconds of op `name` on `backend` (or COMPILED_TORCH), forward alone and
    forward+backward (the gradient of every output, with fixed random output gradients, to
    every tensor argument)."""
    leaves = _as_leaves(args, device_type, dtype)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    if backend == COMPILED_TORCH:
        compiled = torch.compile(getattr(reference, name), dynamic=False)

        def forward():
            return testing.as_tuple(compiled(*leaves))
    else:
        def forward():
            with backends.use(backend):
                return testing.call_op(name, leaves)

    # A first call, untimed: it also compiles, for the torch.compile column.
    output_gradients = [torch.randn_like(o) for o in forward()]

    def forward_backward():
        return torch.autograd.grad(forward(), tensors, output_gradients, allow_unused=True)

    return {"forward ms": _timed_ms(forward, min_run_time),
            "forward+backward ms": _timed_ms(forward_backward, min_run_time)}


def bench(args: argparse.Namespace) -> int:
    """Times every op (or those named) on every backend that runs it on the device (or those
    named), in one dtype, per event size; prints a table with each backend's speed-up over the torch
    backend, and writes it as JSON with ``--json``."""
    device_type = args.device
    if device_type == "cuda" and not torch.cuda.is_available():
        return _usage_error("--device cuda, but torch sees no CUDA device")
    reason = _named_backends_reason(args.backends, device_type)
    if reason is not None:
        return _usage_error(reason)
    # Triton's interpreter runs a kernel a program at a time in Python: minutes a cell.
    names = args.backends or [b for b in backends.BACKENDS if not (b == "triton" and device_type == "cpu")]
    cases = testing.op_cases(args.ops or testing.OPS_AND_HEAD)
    dtype = getattr(torch, args.dtype)
    if args.compile:  # a compilation per op, form and event size, each kept
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    generator = torch.Generator().manual_seed(0)
    meta = {"date": datetime.date.today().isoformat(), "fusedgauss": __version__, "torch": torch.__version__,
            "device": device_type,
            "device_name": torch.cuda.get_device_name() if device_type == "cuda" else backends.cpu_name(),
            "cpu_simd": backends.cpu_simd_level(), "threads": torch.get_num_threads(), "dtype": args.dtype,
            "batch": args.batch, "min_run_time": args.min_run_time}
    print(f"fusedgauss {__version__}, torch {torch.__version__}; {device_type} {meta['device_name']}, "
          f"{meta['threads']} threads; {args.dtype}, B={args.batch}; medians of torch.utils.benchmark "
          f"(min_run_time {args.min_run_time} s)")
    print(f"{'op':42s} {'k':>3s} {'backend':13s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'forward ×':>10s} "
          f"{'fwd+bwd ×':>10s}  (× the torch backend)")
    rows = []
    for k in args.k:
        for label, name, kwargs in cases:
            op_args = testing.op_arguments(name, (args.batch,), k, generator=generator, **kwargs)
            runnable = _runnable_backends(device_type, name, k, names) + ([COMPILED_TORCH] if args.compile else [])
            cells = {b: bench_case(name, op_args, device_type, dtype, b, args.min_run_time) for b in runnable}
            baseline = cells.get("torch")
            for backend, cell in cells.items():
                row = {"op": label, "k": k, "backend": backend, **cell}
                speedups = ["–", "–"]
                if baseline is not None:
                    row["forward × torch"] = baseline["forward ms"] / cell["forward ms"]
                    row["forward+backward × torch"] = baseline["forward+backward ms"] / cell["forward+backward ms"]
                    speedups = [f"{row['forward × torch']:.2f}", f"{row['forward+backward × torch']:.2f}"]
                rows.append(row)
                print(f"{label:42s} {k:3d} {backend:13s} {cell['forward ms']:11.3f} "
                      f"{cell['forward+backward ms']:11.3f} {speedups[0]:>10s} {speedups[1]:>10s}")
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


def _usage_error(message: str) -> int:
    print(f"python -m fusedgauss: {message}", file=sys.stderr)
    return 2


def _positive(kind: type):
    """An argparse type: a number of `kind` above 0."""

    def parse(text: str):
        try:
            number = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {expected}: {text!r}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return number

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedgauss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what was built and what each device gets")
    selection = argparse.ArgumentParser(add_help=False)  # the arguments check and bench share
    selection.add_argument("--ops", nargs="+", choices=testing.OPS_AND_HEAD, metavar="OP",
                           help=f"the ops (default: all): {', '.join(testing.OPS_AND_HEAD)}")
    selection.add_argument("--backends", nargs="+", choices=backends.BACKENDS, metavar="BACKEND",
                           help=f"the backends, of {', '.join(backends.BACKENDS)} (default: every one that runs; "
                                "for bench, not the Triton interpreter on the CPU)")
    checking = commands.add_parser("check", parents=[selection],
                                   help="every op on every backend against the float64 reference")
    checking.add_argument("--k", type=_positive(int), nargs="+", default=[1, 3, 17],
                          help="event sizes (default: 1 3 17)")
    timing = commands.add_parser("bench", parents=[selection],
                                 help="every op on every backend, timed; speed-ups over the torch backend")
    timing.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the tensors' device (default: cuda where torch sees a GPU, else cpu)")
    timing.add_argument("--k", type=_positive(int), nargs="+", default=[6, 17], help="event sizes (default: 6 17)")
    timing.add_argument("--batch", type=_positive(int), default=65536, help="samples per call (default: 65536)")
    timing.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                        help="the inputs' dtype (default: float32)")
    timing.add_argument("--compile", action="store_true",
                        help=f"also time the torch backend's formulas under torch.compile (column {COMPILED_TORCH}; "
                             "a compilation per op and event size: minutes in all)")
    timing.add_argument("--min-run-time", type=_positive(float), default=0.2,
                        help="seconds of timing per cell (default: 0.2)")
    timing.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        return check(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
