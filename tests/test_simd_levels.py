"""Every CPU kernel at every SIMD level this CPU runs (csrc/cpu/simd.h).

The kernels are compiled once per level (baseline SSE2, AVX2+FMA, AVX-512) and the other test
files run the widest one only, so here every op's forward and gradients run at each level
against the float64 reference: 37 samples (partial blocks of 16 and 8 lanes), event sizes with
a compile-time k and a runtime one, per-sample and batch-shared parameters.
"""


import functools

import pytest
import torch

from fusedgauss import backends, ops, reference, testing
from helpers import random_scale_tril, random_spd, run_module

pytestmark = pytest.mark.skipif(not backends.COMPILED_CPU, reason="fusedgauss was built without CPU kernels")

LEVELS = backends.cpu_simd_levels()
BATCH = 37


def _inputs(k: int, shared: bool) -> dict[str, torch.Tensor]:
    """float64 inputs; a shared parameter has no batch dimensions."""
    matrices = () if shared else (BATCH,)
    value = torch.randn(BATCH, k, dtype=torch.float64)
    return {
        "value": value,
        "action": torch.tanh(value),
        "loc": torch.randn(BATCH, k, dtype=torch.float64),
        "noise": torch.randn(BATCH, k, dtype=torch.float64),
        "scale": torch.rand(*matrices, k, dtype=torch.float64) + 0.5,
        "L": random_scale_tril(matrices, k),
        "cov": random_spd(matrices, k),
        "packed": torch.randn(*matrices, k * (k + 1) // 2, dtype=torch.float64),
    }


# op name -> its arguments: names of _inputs' tensors, and flags: the same call for ops and
# reference.
CALLS = {
    "mvn_tril_log_prob": ("value", "loc", "L"),
    "mvn_cov_log_prob": ("value", "loc", "cov"),
    "cholesky": ("cov",),
    "diag_normal_log_prob": ("value", "loc", "scale"),
    "squashed_diag_log_prob": ("action", "loc", "scale", False),
    "squashed_tril_log_prob": ("value", "loc", "L", True),
    "squashed_diag_rsample_log_prob": ("loc", "scale", "noise"),
    "squashed_tril_rsample_log_prob": ("loc", "L", "noise"),
    "packed_to_scale_tril": ("packed", "softplus", 1e-3),
    "packed_scale_tril_log_det": ("packed", "softplus", 1e-3),
    "mvn_packed_log_prob": ("value", "loc", "packed", "softplus", 1e-3),
    "squashed_packed_log_prob": ("action", "loc", "packed", "exp", 0.0, False),
    "tanh_log_abs_det_jacobian": ("value",),
}


def _fused(op_name: str):
    """The op's public function, called as the reference is: the log-probs of a given factor
    return their log_det too, so that its value and its gradient (which joins the log-prob's in
    the kernel) are checked at every level."""
    if op_name in ops.LOG_DET_LOG_PROB_OPS:
        return functools.partial(getattr(ops, op_name), return_log_det=True)
    return getattr(ops, op_name)


def _outputs_and_gradients(fn, names, tensors):
    """fn's outputs and the gradients of a random weighting of them to its tensor inputs."""
    leaves = {n: tensors[n].detach().clone().requires_grad_() for n in names if isinstance(n, str) and n in tensors}
    outputs = testing.as_tuple(fn(*(leaves.get(n, n) if isinstance(n, str) else n for n in names)))
    generator = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outputs], list(grads)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [3, 6, 17])
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
@pytest.mark.parametrize("op_name", CALLS)
def test_op_matches_reference_at_level(op_name, shared, k, dtype, level):
    names = CALLS[op_name]
    if shared and not ({"scale", "L", "cov", "packed"} & set(names) and {"value", "action", "noise"} & set(names)):
        pytest.skip("the op has no parameter to share with a batch of samples")
    tensors = _inputs(k, shared)
    expected, expected_grads = _outputs_and_gradients(getattr(reference, op_name), names, tensors)
    cast = {n: t.to(dtype) for n, t in tensors.items()}
    with backends.use("cpu"), backends.use_cpu_simd(level):
        got, got_grads = _outputs_and_gradients(_fused(op_name), names, cast)
    tolerance = {"rtol": 2e-4, "atol": 2e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **tolerance)


def test_level_is_restored_and_unknown_level_is_an_error():
    before = backends.cpu_simd_level()
    with backends.use_cpu_simd(LEVELS[0]):
        assert backends.cpu_simd_level() == LEVELS[0]
    assert backends.cpu_simd_level() == before == LEVELS[-1]
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'; choose baseline, avx2 or avx512"):
        with backends.use_cpu_simd("sse9"):
            pass
    assert backends.cpu_simd_level() == before


def _info(env_value: str) -> str:
    return run_module("info", env={"FUSEDGAUSS_CPU_SIMD": env_value}, check=True).stdout


def test_environment_variable_chooses_the_level():
    assert f"SIMD level: {LEVELS[0]} (FUSEDGAUSS_CPU_SIMD={LEVELS[0]})" in _info(LEVELS[0])


def test_environment_variable_with_a_bad_level_is_reported():
    out = _info("sse9")
    assert "SIMD level: none: FUSEDGAUSS_CPU_SIMD: unknown SIMD level 'sse9'" in out
