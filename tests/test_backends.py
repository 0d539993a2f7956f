"""Backend choice, forcing, and `python -m fusedgauss`."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import fusedgauss
from fusedgauss import backends, ops, reference

from conftest import requires_compiled_cpu
from helpers import run_module


@requires_compiled_cpu
def test_cpu_tensors_default_to_compiled_kernels():
    assert backends.select("cpu", 6) == "cpu"


def test_torch_backend_is_the_reference():
    value, loc, L = torch.randn(3, 2), torch.randn(3, 2), torch.eye(2).expand(3, 2, 2)
    with backends.use("torch"):
        assert backends.select("cpu", 2) == "torch"
        torch.testing.assert_close(ops.mvn_tril_log_prob(value, loc, L), reference.mvn_tril_log_prob(value, loc, L)[0])


def test_use_nests_and_restores():
    before = backends.forced_backend()
    with backends.use("torch"):
        with backends.use(None):
            assert backends.forced_backend() is None
        assert backends.forced_backend() == "torch"
    assert backends.forced_backend() == before


def test_environment_variable_forces_a_backend():
    code = "import fusedgauss; print(fusedgauss.backends.select('cpu', 3))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FUSEDGAUSS_BACKEND": "torch"}, timeout=300)
    assert out.stdout.strip() == "torch", out.stderr


def test_environment_variable_unavailable_backend_is_an_error():
    code = "import torch, fusedgauss; fusedgauss.cholesky(torch.eye(2))"
    env = {**os.environ, "FUSEDGAUSS_BACKEND": "triton", "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "BackendUnavailableError" in out.stderr and "interpreter" in out.stderr


def test_info_reports_build_and_choice():
    out = run_module("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"fusedgauss {fusedgauss.__version__}" in text
    assert f"torch {torch.__version__}" in text
    assert "CPU kernels:  " + ("yes" if backends.COMPILED_CPU else "no") in text
    assert ("Triton kernels: yes" if backends.TRITON_KERNELS else "Triton kernels: no") in text
    assert f"cpu: {backends.default_backend('cpu')}" in text
    assert "under a torch.func transform or forward-mode AD: torch" in text
    assert "event size" in text


def test_check_passes():
    out = run_module("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout.splitlines()[-1]
