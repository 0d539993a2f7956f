import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels are tested through Triton's interpreter, which must be
# switched on before triton is imported (fusedgauss imports it on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedgauss  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property-based tests (test_properties.py) draw fresh cases on every run, so that runs keep
# searching; CI draws the same ones every time, so that its verdict is the code's.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_report_header(config):
    b = fusedgauss.backends
    return (
        f"fusedgauss {fusedgauss.__version__}: compiled CPU kernels {b.COMPILED_CPU}, "
        f"CUDA kernels {b.COMPILED_CUDA}, Triton kernels {b.TRITON_KERNELS} (interpreter {b.TRITON_INTERPRETING}); torch {torch.__version__}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_compiled_cpu = pytest.mark.skipif(
    not fusedgauss.backends.COMPILED_CPU, reason="fusedgauss was built without CPU kernels"
)

ON_GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
# (backend, device) pairs; each skips cleanly where it cannot run.
BACKENDS = [
    pytest.param("cpu", "cpu", marks=requires_compiled_cpu, id="cpu"),
    pytest.param("torch", "cpu", id="torch"),
    pytest.param(
        "cuda", "cuda", id="cuda",
        marks=pytest.mark.skipif(not (ON_GPU and fusedgauss.backends.COMPILED_CUDA),
                                 reason="needs a GPU and the CUDA kernels"),
    ),
    pytest.param(
        "triton", TRITON_DEVICE, id="triton",
        marks=pytest.mark.skipif(
            fusedgauss.backends.unavailable_reason("triton", TRITON_DEVICE) is not None,
            reason=f"the triton backend cannot run here: "
                   f"{fusedgauss.backends.unavailable_reason('triton', TRITON_DEVICE)}",
        ),
    ),
]
#: The fused backends of BACKENDS.
FUSED_BACKENDS = [p for p in BACKENDS if p.id != "torch"]
# (op namespace, device) pairs for opcheck: the Triton ops' fake tracing needs a GPU.
OPCHECK_LIBRARIES = [
    pytest.param("fusedgauss", "cpu", marks=requires_compiled_cpu, id="cpu"),
    pytest.param("fusedgauss", "cuda", id="cuda", marks=pytest.mark.skipif(
        not (ON_GPU and fusedgauss.backends.COMPILED_CUDA), reason="needs a GPU and the CUDA kernels")),
    pytest.param("fusedgauss_triton", "cuda", id="triton", marks=pytest.mark.skipif(
        not (ON_GPU and fusedgauss.backends.TRITON_KERNELS), reason="opcheck of a triton_op needs a GPU")),
]
