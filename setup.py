"""Builds fusedgauss: the package from pyext/ and triton_kernels/, and the extension
fusedgauss._C from csrc/.

The CPU sources are always compiled. The CUDA sources (csrc/cuda/*.cu) are compiled when
nvcc and a CUDA build of torch are both present. Switches:

  FUSEDGAUSS_FORCE_CUDA=1   compile the CUDA sources or fail, saying what is missing
  FUSEDGAUSS_SKIP_CUDA=1    CPU only, even where CUDA could be compiled
  FUSEDGAUSS_DEBUG=1        -O0 -g
  TORCH_CUDA_ARCH_LIST      the GPU architectures, as for any torch extension; where it is
                            unset and no GPU is visible, 8.0 and 9.0 (A100, H100)
  CUDA_HOME                 the toolkit; without it, found from the nvcc on PATH, following
                            a wrapper script that execs the real nvcc
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit_of(nvcc: Path) -> Path | None:
    """The CUDA toolkit folder of an nvcc: its parent's parent, or, for a small wrapper
    script, the toolkit of the nvcc it execs."""
    nvcc = nvcc.resolve()
    try:
        head = nvcc.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"#!"):
        match = re.search(rb"exec\s+\"?(/\S+/bin/nvcc)\b", head)
        return _toolkit_of(Path(match.group(1).decode())) if match else None
    return nvcc.parent.parent


def _find_cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    toolkit = _toolkit_of(Path(nvcc)) if nvcc else None
    return str(toolkit) if toolkit and (toolkit / "include" / "cuda.h").exists() else None


# torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _use_cuda(cuda_sources: list[str]) -> bool:
    force, skip = _truthy("FUSEDGAUSS_FORCE_CUDA"), _truthy("FUSEDGAUSS_SKIP_CUDA")
    if force and skip:
        raise RuntimeError("FUSEDGAUSS_FORCE_CUDA and FUSEDGAUSS_SKIP_CUDA are both set")
    missing = []
    if not cuda_sources:
        missing.append("CUDA sources in csrc/cuda")
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this one is {torch.__version__})")
    if _cuda_home is None:
        missing.append("nvcc (set CUDA_HOME or put nvcc on PATH)")
    if force and missing:
        raise RuntimeError("FUSEDGAUSS_FORCE_CUDA=1 but the build lacks " + ", ".join(missing))
    return not skip and not missing


def _extension():
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    for folder in ("autograd", "cpu"):
        cpu_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / folder).glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    debug = _truthy("FUSEDGAUSS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # ATen's inline at::parallel_for runs serially unless the extension itself is compiled
    # with OpenMP; the library resolves to the libgomp that torch already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # FP exceptions are never inspected, so branch-free selects in the elementwise math
    # (csrc/math/squash_math.h) may compute both sides: that is what lets those loops vectorise.
    # Nor is errno: with it, every sqrtf sits behind a domain-check branch (the Cholesky
    # pivots of a block of lanes were the hottest instructions of a covariance backward).
    cxx_flags = [*opt, *openmp, "-fno-trapping-math", "-fno-math-errno", "-fdiagnostics-color=always",
                 "-DPy_LIMITED_API=0x030B0000"]
    kwargs = dict(
        name="fusedgauss._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=openmp,
        py_limited_api=True,
    )
    if _use_cuda(cuda_sources):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU to detect, torch would compile for every architecture it knows.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        nvcc_flags = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            sources=cpu_sources + cuda_sources,
            define_macros=[("FUSEDGAUSS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **kwargs,
        )
    return CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    packages=["fusedgauss", "fusedgauss.triton_kernels"],
    package_dir={"fusedgauss": "pyext", "fusedgauss.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
