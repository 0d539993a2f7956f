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
