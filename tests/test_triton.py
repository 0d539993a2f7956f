"""The Triton kernels against the float64 reference, gradients included.

Without a GPU they run on CPU tensors through Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported), on small shapes: the interpreter runs every
tile operation in numpy. With a GPU they run on CUDA tensors, and opcheck and torch.compile
are checked too (both need real kernels: under the interpreter, fake tensors have no data).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_spd, symmetrise
from test_cholesky import check_against_torch_linalg
from test_mvn_ops import (
    OPS,
    check_float32,
    check_float64,
    grads_of,
    make_operands,
    opcheck_inputs,
    run_on,
    upstream_gradients,
)
from test_squashed_ops import (
    CASE_IDS,
    CASES,
    SATURATED,
    check_action_at_the_bounds,
    check_case,
    opcheck_cases,
    outputs_and_grads,
    reference_on_float64,
)

from fusedgauss import backends, ops, reference

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", DEVICE) is not None,
    reason=f"the triton backend cannot run {DEVICE} tensors here: {backends.unavailable_reason('triton', DEVICE)}",
)
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="opcheck and torch.compile of a triton_op need a GPU")

# On a GPU every (event size, dtype) compiles each kernel, for tens of seconds: fewer sizes
# there, where the interpreter has already checked the numbers of all of them.
EVENT_SIZES = [2, 6, 17] if ON_GPU else [1, 2, 3, 6, 17]
# (layout, batch shape): per-sample and shared operands, broadcasts, a partial broadcast.
LAYOUT_SHAPES = [
    ("per_sample", (37,)),
    ("per_sample", (4, 3)),
    ("shared_value", (9,)),
    ("shared_loc", (5, 2)),
    ("shared_matrix", (40,)),
    ("expanded_matrix", (6,)),
    ("partial", (3, 4)),
    # several programs, so shared gradients add partial sums across them
    ("per_sample", (200,)),
    ("shared_matrix", (300,)),
]


triton_grads = run_on("triton", DEVICE)


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize(("layout", "batch_shape"), LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", EVENT_SIZES)
class TestLogProbAgainstReference:
    def test_float64(self, matrix, layout, batch_shape, k):
        check_float64(triton_grads, matrix, layout, batch_shape, k)

    def test_float32(self, matrix, layout, batch_shape, k):
        check_float32(triton_grads, matrix, layout, batch_shape, k)


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_non_contiguous_inputs(matrix):
    op, ref = OPS[matrix]
    k, B = 5, 9
    value = torch.randn(k, B, dtype=torch.float64).T
    loc = torch.randn(B, 2 * k, dtype=torch.float64)[:, ::2]
    M = make_operands("per_sample", (B,), k, matrix=matrix)[2].mT.contiguous().mT
    weights = torch.randn(B, dtype=torch.float64)
    expected, expected_grads = grads_of(ref, (value, loc, M), weights)
    with backends.use("triton"):
        got, got_grads = grads_of(op, (value.to(DEVICE), loc.to(DEVICE), M.to(DEVICE)), weights.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g.cpu(), e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_float32(dtype):
    op, ref = OPS["scale_tril"]
    inputs = [t.to(dtype) for t in make_operands("per_sample", (32,), 6, matrix="scale_tril")]
    expected = ref(*(t.double() for t in inputs))
    got, grads = triton_grads(op, inputs, torch.ones(32, dtype=dtype))
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), expected, rtol=2 * eps, atol=4 * eps * expected.abs().max().item())


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix", "expanded_matrix"])
def test_zero_size_batch(matrix, layout):
    op, _ = OPS[matrix]
    inputs = make_operands(layout, (0,), 4, matrix=matrix)
    out, grads = triton_grads(op, inputs, torch.ones(0, dtype=torch.float64))
    assert out.shape == (0,)
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape and torch.all(g == 0)


def test_not_positive_definite_poisons_its_samples_only():
    value, loc, cov = make_operands("per_sample", (5,), 3, matrix="covariance")
    cov[2] = -cov[2]
    out, (_, loc_grad, cov_grad) = triton_grads(ops.mvn_cov_log_prob, (value, loc, cov), torch.ones(5, dtype=torch.float64))
    bad = torch.tensor([False, False, True, False, False])
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.isfinite(loc_grad[~bad]).all() and torch.isfinite(cov_grad[~bad]).all()


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (False, False, True)])
def test_backward_op(matrix, mask):
    from fusedgauss import triton_ops  # noqa: F401  (registers the Triton ops, which this test calls directly)

    _, ref = OPS[matrix]
    name = "mvn_tril_log_prob_backward" if matrix == "scale_tril" else "mvn_cov_log_prob_backward"
    inputs = make_operands("shared_matrix", (4, 3), 3, matrix=matrix)
    [upstream] = upstream_gradients(matrix, (4, 3), torch.float64, DEVICE, with_log_det=False)
    _, expected = grads_of(ref, inputs, upstream[0].cpu())
    got = getattr(torch.ops.fusedgauss_triton, name)(*upstream, *(t.to(DEVICE) for t in inputs), list(mask))
    for g, e, wanted in zip(got, expected, mask):
        if wanted:
            torch.testing.assert_close(g.cpu(), e)
        else:
            assert g.numel() == 0


class TestCholesky:
    @pytest.mark.parametrize("k", EVENT_SIZES)
    @pytest.mark.parametrize("batch_shape", [(), (7,), (4, 3)], ids=str)
    def test_against_torch_linalg(self, k, batch_shape):
        check_against_torch_linalg("triton", k, batch_shape, torch.float64, device=DEVICE)

    def test_not_positive_definite_gives_nan_for_that_matrix_only(self):
        A = random_spd((4,), 3)
        A[1] = -A[1]
        with backends.use("triton"):
            L = ops.cholesky(A.to(DEVICE)).cpu()
        assert torch.isnan(L[1]).all() and torch.isfinite(L[[0, 2, 3]]).all()

    def test_reads_the_lower_triangle_only(self):
        A = random_spd((3,), 4)
        with backends.use("triton"):
            L = ops.cholesky((A + torch.randn(3, 4, 4, dtype=torch.float64).triu(1)).to(DEVICE))
        torch.testing.assert_close(L.cpu(), reference.cholesky(A))


def test_every_op_has_a_triton_op():
    """Each op of the surface is a Triton op with its backward, so forcing "triton" never
    runs another backend's kernel."""
    from fusedgauss import triton_ops

    assert backends.TRITON_OPS == set(ops.OPS)
    for name in ops.OPS:
        assert backends.missing_op_reason("triton", name) is None
        assert {name, name + "_backward"} <= set(triton_ops.LAUNCHERS), name
        assert hasattr(torch.ops.fusedgauss_triton, name) and hasattr(torch.ops.fusedgauss_triton, name + "_backward")


def test_event_sizes_beyond_the_kernels():
    k = backends.MAX_EVENT_SIZE["triton"] + 1
    with backends.use("triton"), pytest.raises(backends.BackendUnavailableError, match="event sizes up to"):
        ops.mvn_tril_log_prob(torch.zeros(k), torch.zeros(k), torch.eye(k))


def triton_outputs_and_grads(case, inputs):
    """The op on the triton backend, inputs on DEVICE, results back on the CPU."""
    with backends.use("triton"):
        out, grads = outputs_and_grads(case.op, [t.to(DEVICE) for t in inputs])
    return [o.cpu() for o in out], [g.cpu() for g in grads]


SQUASHED_LAYOUT_SHAPES = [
    ("per_sample", (37,)),
    ("shared_parameter", (9,)),
    ("shared_loc", (5, 2)),
    ("shared_first", (7,)),
    ("expanded_parameter", (6,)),
    ("partial", (3, 4)),
    ("per_sample", (200,)),  # several programs
    ("shared_parameter", (300,)),
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("layout", "batch_shape"), SQUASHED_LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_squashed_against_reference(case, layout, batch_shape, k, dtype):
    """The diagonal and squashed ops (tests/test_squashed_ops.py's cases)."""
    check_case(triton_outputs_and_grads, case, layout, batch_shape, k, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_squashed_half_precision_and_zero_size(case):
    inputs = [t.half() for t in case.inputs("per_sample", (16,), 4)]
    expected, _ = reference_on_float64(case, inputs)
    got, grads = triton_outputs_and_grads(case, inputs)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.double(), e, rtol=4e-3, atol=8e-3 * (1 + e.abs().max().item()))
    for layout in ("shared_parameter", "expanded_parameter"):
        got, grads = triton_outputs_and_grads(case, case.inputs(layout, (0,), 4))
        assert got[-1].shape == (0,) and all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_squashed_saturation(parameter):
    """|u| up to 20 in float32: finite log-probs and gradients, from u and from a sample."""
    k = SATURATED.numel()
    case = CASES[1] if parameter == "scale" else CASES[3]
    rsample = CASES[5] if parameter == "scale" else CASES[6]
    u = SATURATED.expand(4, k).clone()
    inputs = case.inputs("per_sample", (4,), k)
    inputs[0] = u
    for c, args in ((case, inputs), (rsample, [u, 0.05 * inputs[2], torch.randn(4, k, dtype=torch.float64)])):
        args32 = [t.float() for t in args]
        expected, expected_grads = reference_on_float64(c, args32)
        got, got_grads = triton_outputs_and_grads(c, args32)
        for g, e in zip(got + got_grads, expected + expected_grads):
            assert torch.isfinite(g).all()
            scale = 1 + e.abs().max()
            torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_action_at_the_bounds_is_clamped(dtype, parameter):
    """The clamp bound 1 - ε is in the action's dtype: a float32 constant would round float64's
    1 - 2^-52 to 1, and atanh(±1) is infinite."""
    check_action_at_the_bounds("triton", dtype, parameter, DEVICE)


def test_tanh_log_abs_det_jacobian():
    u = torch.randn(3, 50, dtype=torch.float64) * 8
    with backends.use("triton"):
        got = ops.tanh_log_abs_det_jacobian(u.to(DEVICE)).cpu()
        x = u[:, :4].clone().to(DEVICE).requires_grad_()
        assert torch.autograd.gradcheck(ops.tanh_log_abs_det_jacobian, (x,))
    torch.testing.assert_close(got, reference.tanh_log_abs_det_jacobian(u), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test above compiles the kernels")
def test_kernels_compile_for_a_gpu():
    """The interpreter runs the kernels' numbers but not Triton's compiler, whose checks
    (types, constexpr globals, shapes) a kernel must pass to run on a GPU: compile each one for
    sm_90 (in a process without the interpreter)."""
    script = Path(__file__).with_name("compile_triton_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(script), "--k", "6"], capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
    assert out.stdout.count("ok ") == 48, out.stdout  # 24 kernels, float32 and float64


@requires_gpu
class TestOnGpu:
    """What the interpreter cannot check: opcheck, gradcheck and torch.compile of the ops."""

    def test_opcheck(self):
        for matrix, args in opcheck_inputs("cuda"):
            name = "mvn_tril_log_prob" if matrix == "scale_tril" else "mvn_cov_log_prob"
            torch.library.opcheck(getattr(torch.ops.fusedgauss_triton, name).default, args)
        A = random_spd((2, 2), 4).float().cuda()
        torch.library.opcheck(torch.ops.fusedgauss_triton.cholesky.default, (A.requires_grad_(),))
        for name, args in opcheck_cases("cuda"):
            torch.library.opcheck(getattr(torch.ops.fusedgauss_triton, name).default, args)

    @pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
    def test_gradcheck(self, matrix):
        op, _ = OPS[matrix]
        value, loc, M = (t.cuda().requires_grad_() for t in make_operands("shared_value", (2, 3), 3, matrix=matrix))
        fix = (lambda L: L.tril()) if matrix == "scale_tril" else symmetrise
        with backends.use("triton"):
            assert torch.autograd.gradcheck(lambda v, m, A: op(v, m, fix(A)), (value, loc, M))

    @pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
    def test_torch_compile_fullgraph(self, matrix):
        op, _ = OPS[matrix]
        value, loc, M = (t.cuda() for t in make_operands("per_sample", (64,), 6, matrix=matrix, dtype=torch.float32))
        loc.requires_grad_()

        def loss(value, loc, M):
            return op(value, loc, M).sum()

        with backends.use("triton"):
            expected = torch.autograd.grad(loss(value, loc, M), loc)
            got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(value, loc, M), loc)
        torch.testing.assert_close(got, expected)
