"""Backend choice, forcing, and `python -m fusedgauss`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fusedgauss
from fusedgauss import backends, ops, reference, testing

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


def test_check_passes_every_op_on_every_backend_here():
    out = run_module("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1].endswith(": ok")
    lines = out.stdout.splitlines()[:-1]
    for device in ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]:
        runnable = {b for b in backends.BACKENDS if backends.unavailable_reason(b, device) is None}
        for label, _, _ in testing.op_cases():
            for k in (1, 3, 17):
                checked = {line.split()[1] for line in lines
                           if line.startswith(f"{device} ") and f" {label} " in line and f"k={k:2d} " in line}
                assert checked == runnable, (device, label, k, checked)
    assert all("outputs" in line and "gradients" in line for line in lines)


def test_check_fails_on_wrong_outputs_or_gradients(monkeypatch, capsys):
    """check compares with fusedgauss.reference, so a reference moved off the kernels' numbers
    (as a wrong kernel would be) fails it: by 1e-3 in the output, in loc's gradient alone, or
    by NaN."""
    from fusedgauss.__main__ import main

    right = reference.diag_normal_log_prob
    wrong = {
        "outputs": lambda value, loc, scale: right(value, loc, scale) + 1e-3,
        "gradients": lambda value, loc, scale: right(value, loc, scale) + 0.1 * (loc - loc.detach()).sum(-1),
        "outputs, gradients": lambda value, loc, scale: right(value, loc, scale) * math.nan,
    }
    for kinds, wrong_reference in wrong.items():
        monkeypatch.setattr(reference, "diag_normal_log_prob", wrong_reference)
        with backends.use(None):
            assert main(["check", "--ops", "diag_normal_log_prob", "mvn_tril_log_prob"]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines[-1].endswith("FAILED")
        too_large = [line for line in lines if "TOO LARGE" in line]
        assert too_large and all(" diag_normal_log_prob " in line and line.endswith(f"TOO LARGE: {kinds}")
                                 for line in too_large), too_large


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bench_times_every_backend_against_torch(tmp_path, dtype):
    path = tmp_path / "bench.json"
    ops_timed = ("diag_normal_log_prob", "squashed_tril_log_prob", "packed_head_log_prob")
    out = run_module("bench", "--device", "cpu", "--k", "3", "--batch", "256", "--ops", *ops_timed,
                     "--min-run-time", "0.001", "--dtype", dtype, "--json", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(path.read_text())
    assert result["meta"]["dtype"] == dtype and f"; {dtype}, B=256;" in out.stdout
    rows = result["rows"]
    # Triton's interpreter is left out unless named: it takes minutes a cell.
    runnable = {b for b in backends.BACKENDS if backends.unavailable_reason(b, "cpu") is None and b != "triton"}
    labels = [label for label, name, _ in testing.op_cases() if name in ops_timed]
    assert sorted((r["op"], r["backend"]) for r in rows) == sorted((label, b) for label in labels for b in runnable)
    for row in rows:
        assert row["forward ms"] > 0 and row["forward+backward ms"] > 0
        if row["backend"] == "torch":
            assert row["forward × torch"] == row["forward+backward × torch"] == 1
        assert f"{row['op']:42s} {row['k']:3d} {row['backend']:13s}" in out.stdout


def test_bench_times_the_torch_backend_compiled():
    out = run_module("bench", "--device", "cpu", "--k", "3", "--batch", "64", "--ops", "tanh_log_abs_det_jacobian",
                     "--backends", "torch", "--compile", "--min-run-time", "0.001")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[:3] for line in out.stdout.splitlines()[2:]] == [
        ["tanh_log_abs_det_jacobian", "3", "torch"], ["tanh_log_abs_det_jacobian", "3", "torch.compile"]]


def test_bench_of_a_backend_that_cannot_run_is_an_error():
    out = run_module("bench", "--device", "cpu", "--backends", "cuda", "--k", "3", "--batch", "8")
    assert out.returncode == 2
    assert f"backend 'cuda' cannot run cpu tensors: {backends.unavailable_reason('cuda', 'cpu')}" in out.stderr


def test_check_of_named_ops_and_backends():
    out = run_module("check", "--ops", "cholesky", "--backends", "torch", "--k", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    assert [line.split()[:3] for line in lines[:-1]] == [[device, "torch", "cholesky"] for device in devices]
    if not torch.cuda.is_available():
        out = run_module("check", "--backends", "cuda")
        assert out.returncode == 2 and "backend 'cuda' cannot run" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_a_missing_gpu_is_an_error():
    out = run_module("bench", "--device", "cuda", "--k", "3", "--batch", "8")
    assert out.returncode == 2
    assert "torch sees no CUDA device" in out.stderr
