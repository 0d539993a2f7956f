"""Which implementation runs an op: "cuda", "triton", "cpu" or "torch".

Per call, from the device of the inputs:

- CUDA tensors: the compiled CUDA kernels if they were built, else the Triton kernels if
  they exist, else "torch";
- CPU tensors: the compiled CPU kernels if they were built, else "torch".

"torch" is the plain-PyTorch implementation in :mod:`fusedgauss.reference`. It is also the only
one that runs under a torch.func transform or forward-mode AD (:func:`under_function_transform`,
:func:`under_forward_ad`), where every call gets it. A backend can be
forced with the environment variable ``FUSEDGAUSS_BACKEND`` (read at import) or with
:func:`use`; forcing one that cannot run the call is an error naming what is missing, never a
silent swap. ``python -m fusedgauss info`` prints what is available.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
from collections.abc import Iterator

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run the call."""


try:
    from . import _C  # noqa: F401  (loading the library registers the compiled kernels)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # a source checkout that was never built, or a broken build
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"


def _ops_with_kernels(dispatch_key: str) -> frozenset[str]:
    """The compiled ops registered for `dispatch_key`, looked up once: the per-call backend
    choice must be plain Python for torch.compile to trace through it."""
    if EXTENSION_ERROR is not None:
        return frozenset()
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedgauss::"))
    return frozenset(
        n.split("::", 1)[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key)
    )


_COMPILED_OPS = {"cpu": _ops_with_kernels("CPU"), "cuda": _ops_with_kernels("CUDA")}


def _has_kernel(dispatch_key: str) -> bool:
    return "mvn_tril_log_prob" in _COMPILED_OPS[dispatch_key.lower()]


#: The compiled extension is loaded and its ops are registered.
EXTENSION_LOADED = EXTENSION_ERROR is None
#: Compiled CPU kernels are registered.
COMPILED_CPU = _has_kernel("CPU")
#: Compiled CUDA kernels are registered (fusedgauss was built with nvcc).
COMPILED_CUDA = _has_kernel("CUDA")
#: Triton is installed, so the Triton kernels (fusedgauss.triton_ops) can run on GPUs.
TRITON_KERNELS = importlib.util.find_spec("triton") is not None
#: Triton's interpreter is on (TRITON_INTERPRET=1), so the Triton kernels run on CPU tensors.
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: The ops of the Triton backend (fusedgauss.triton_ops); the others run on the next backend.
TRITON_OPS = frozenset({
    "mvn_tril_log_prob", "mvn_cov_log_prob", "cholesky", "diag_normal_log_prob", "tanh_log_abs_det_jacobian",
    "squashed_diag_log_prob", "squashed_tril_log_prob", "squashed_diag_rsample_log_prob",
    "squashed_tril_rsample_log_prob", "packed_to_scale_tril", "packed_scale_tril_log_det", "mvn_packed_log_prob",
    "squashed_packed_log_prob",
})


def missing_op_reason(name: str, op: str | None) -> str | None:
    """Why backend `name` has no kernel for `op` (None: it has one, or no op was named)."""
    if op is None or name == "torch":
        return None
    has = op in (TRITON_OPS if name == "triton" else _COMPILED_OPS[name])
    return None if has else f"it has no kernel for {op}"


#: Largest event size each backend's kernels handle; larger ones go to "torch" (None: no
#: limit). A CUDA thread keeps its sample in private arrays sized up to kMaxEventSize
#: (csrc/cuda/launch.cuh); a Triton program holds a block of k x k tiles in registers
#: (fusedgauss/triton_ops.py).
MAX_EVENT_SIZE: dict[str, int | None] = {"cuda": 64, "triton": 32, "cpu": None, "torch": None}

#: From this event size the CUDA kernels give a sample with a matrix of its own (log-probs
#: of a per-sample scale_tril, covariance or packed factor; the tril rsample op; cholesky) a
#: warp, below it a thread (kWarpMinEventSize, csrc/cuda/warp.cuh).
CUDA_WARP_MIN_EVENT_SIZE = 9


def under_function_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap, ...) runs
    this call, outside torch.compile. The fused ops cannot take part in one: PyTorch runs no
    custom op's autograd formula under those transforms (a C++ torch::autograd::Function raises
    there, and so does the autograd.Function of torch.library.register_autograd, which has no
    setup_context), and they have no batching rules. The plain-PyTorch formulas can, with the
    same numbers.

    Under torch.compile the question cannot be asked: while torch.compile traces, the
    interpreter stack is never empty, transform or not. There a torch.func transform of fused
    ops fails while tracing, as it does for PyTorch's own custom ops, and the torch backend has
    to be forced (``backends.use("torch")`` around the compiled call)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def under_forward_ad() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open: the fused ops have no forward
    derivative (PyTorch has no jvp for a C++ autograd Function), so dual tensors would fail in
    them. torch.func.jvp and jacfwd are transforms (:func:`under_function_transform`)."""
    return not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level >= 0


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run ops on `device_type` tensors, or None if it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; the backends are {', '.join(BACKENDS)}"
    if name == "torch":
        return None
    if under_function_transform() or under_forward_ad():
        return ("the fused ops cannot run under a torch.func transform (grad, vjp, jacrev, vmap, ...) or "
                "forward-mode AD: PyTorch runs no custom op's autograd formula or batching there; the torch "
                "backend can")
    if name == "triton" and not TRITON_KERNELS:
        return "triton is not installed"
    if name == "triton" and device_type not in ("cpu", "cuda"):
        return f"the Triton kernels run CUDA tensors, but these are {device_type} tensors"
    if name == "triton" and device_type == "cpu" and not TRITON_INTERPRETING:
        return "the Triton kernels run CPU tensors only through Triton's interpreter (TRITON_INTERPRET=1)"
    if name in ("cpu", "cuda") and not EXTENSION_LOADED:
        return f"the compiled extension fusedgauss._C did not load ({EXTENSION_ERROR})"
    if name == "cuda" and not COMPILED_CUDA:
        return "this build of fusedgauss has no CUDA kernels (see `python -m fusedgauss info`)"
    if name == "cpu" and not COMPILED_CPU:
        return "the compiled extension has no CPU kernels"
    if name != "triton" and name != device_type:
        return f"the {name} backend runs {name.upper()} tensors, but these are {device_type} tensors"
    return None


def default_backend(device_type: str, event_size: int | None = None, op: str | None = None) -> str:
    """The backend chosen when none is forced (for `op`, when one is named)."""
    if device_type == "cuda":
        candidates = ("cuda", "triton")
    elif device_type == "cpu":
        candidates = ("cpu",)
    else:
        candidates = ()
    for name in candidates:
        limit = MAX_EVENT_SIZE[name]
        if (
            unavailable_reason(name, device_type) is None
            and missing_op_reason(name, op) is None
            and (event_size is None or limit is None or event_size <= limit)
        ):
            return name
    return "torch"


def _from_environment() -> str | None:
    name = os.environ.get("FUSEDGAUSS_BACKEND", "").strip().lower()
    return name or None


# The forced backend, innermost `use` last; the first entry comes from FUSEDGAUSS_BACKEND.
_forced: list[str | None] = [_from_environment()]


def forced_backend() -> str | None:
    """The backend forced by :func:`use` or FUSEDGAUSS_BACKEND, or None."""
    return _forced[-1]


@contextlib.contextmanager
def use(name: str | None) -> Iterator[None]:
    """Force backend `name` inside the block (None: choose per call again)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown fusedgauss backend {name!r}; the backends are {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select(device_type: str, event_size: int, op: str | None = None) -> str:
    """The backend that runs `op` on `device_type` tensors with event size `event_size`."""
    name = _forced[-1]
    if name is None:
        return default_backend(device_type, event_size, op)
    reason = unavailable_reason(name, device_type) or missing_op_reason(name, op)
    if reason is None:
        limit = MAX_EVENT_SIZE[name]
        if limit is not None and event_size > limit:
            reason = f"its kernels handle event sizes up to {limit}, got {event_size}"
    if reason is not None:
        raise BackendUnavailableError(f"fusedgauss backend {name!r} was forced but cannot run: {reason}")
    return name


def cpu_name() -> str:
    """This CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_simd_levels() -> list[str]:
    """The SIMD levels the CPU kernels can run on this CPU, narrowest first: "baseline"
    (SSE2), "avx2" (AVX2 and FMA), "avx512"."""
    if not EXTENSION_LOADED:
        return []
    return _C.cpu_simd_levels()


def cpu_simd_level() -> str | None:
    """The SIMD level the CPU kernels run: the widest this CPU has, unless
    ``FUSEDGAUSS_CPU_SIMD`` or :func:`use_cpu_simd` chose another (None: no compiled kernels)."""
    if not EXTENSION_LOADED:
        return None
    return _C.cpu_simd_level()


@contextlib.contextmanager
def use_cpu_simd(level: str) -> Iterator[None]:
    """Run the CPU kernels at SIMD `level` inside the block, to test or time a narrower level's
    code; a level this CPU lacks is an error. The level is process-wide, not per thread."""
    if not EXTENSION_LOADED:
        raise BackendUnavailableError(f"the compiled extension fusedgauss._C did not load ({EXTENSION_ERROR})")
    previous = _C.cpu_simd_level()
    _C.set_cpu_simd_level(level)
    try:
        yield
    finally:
        _C.set_cpu_simd_level(previous)


def cpu_normal_transform() -> str | None:
    """Which of torch's Box-Muller transforms the CPU noise op (``standard_normal_``, behind
    :func:`fusedgauss.standard_normal`) mirrors at torch's CPU capability here: "avx2" (AVX2 and
    AVX512, which runs torch's AVX2 transform) or "scalar" (DEFAULT); None: none (or no
    compiled kernels), and torch's ``normal_`` draws the noise itself."""
    if not EXTENSION_LOADED:
        return None
    return _C.cpu_normal_transform()


def cpu_output_cache_stats() -> dict[str, int]:
    """The CPU output cache: CPU outputs of a megabyte or more (per-sample gradients, sampled
    actions) reuse blocks that earlier outputs freed, instead of fresh memory that the system
    zeroes on first touch. Keys: cached_bytes and cached_blocks (freed blocks kept for reuse),
    limit_bytes (cached_bytes never exceeds it; ``FUSEDGAUSS_CPU_OUTPUT_CACHE_MB``, default
    256, read at the first large output, sets it), hits and misses (requests served from a
    kept block, and requests that took a fresh one while the cache was on)."""
    if not EXTENSION_LOADED:
        raise BackendUnavailableError(f"the compiled extension fusedgauss._C did not load ({EXTENSION_ERROR})")
    return _C.cpu_output_cache_stats()


def set_cpu_output_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of freed CPU outputs for reuse, releasing the oldest kept blocks
    beyond it; 0 turns the cache off (outputs come from torch's allocator, as without it).
    Blocks that tensors still use are never counted or released."""
    if not EXTENSION_LOADED:
        raise BackendUnavailableError(f"the compiled extension fusedgauss._C did not load ({EXTENSION_ERROR})")
    _C.set_cpu_output_cache_limit(int(nbytes))


def empty_cpu_output_cache() -> None:
    """Release every freed CPU output block the cache keeps (as torch.cuda.empty_cache does for
    the CUDA caching allocator); the limit stays."""
    limit = cpu_output_cache_stats()["limit_bytes"]
    set_cpu_output_cache_limit(0)
    set_cpu_output_cache_limit(limit)
