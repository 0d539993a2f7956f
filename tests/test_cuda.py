"""The CUDA kernels, on the CPU tests' cases: against the float64 reference (computed on the
CPU) and torch.distributions, gradcheck, opcheck, CUDA-graph capture, 2^24 samples and half
precision. Skipped where there is no GPU or fusedgauss was built without nvcc."""

from __future__ import annotations

import pytest
import torch
from helpers import outputs_and_grads, random_scale_tril, random_spd, symmetrise, torch_mvn_log_prob
from test_cholesky import check_against_torch_linalg
from test_mvn_ops import (
    EVENT_SIZES,
    LAYOUT_SHAPES,
    OPS,
    check_float32,
    check_float64,
    grads_of,
    make_operands,
    opcheck_inputs,
    run_on,
    upstream_gradients,
)

from fusedgauss import backends, ops, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and backends.COMPILED_CUDA),
    reason="needs a GPU and fusedgauss built with its CUDA kernels",
)

BACKWARD_OPS = {"scale_tril": "mvn_tril_log_prob_backward", "covariance": "mvn_cov_log_prob_backward"}
FORWARD_OPS = {"scale_tril": "mvn_tril_log_prob", "covariance": "mvn_cov_log_prob"}


def on_gpu(tensors):
    return [t.cuda() for t in tensors]


cuda_grads = run_on("cuda", "cuda")


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize(("layout", "batch_shape"), LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", EVENT_SIZES)
class TestAgainstReference:
    def test_float64(self, matrix, layout, batch_shape, k):
        check_float64(cuda_grads, matrix, layout, batch_shape, k)

    def test_float32(self, matrix, layout, batch_shape, k):
        check_float32(cuda_grads, matrix, layout, batch_shape, k)


@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_same_as_torch_distributions(k):
    value, loc = torch.randn(2, 300, k, dtype=torch.float64, device="cuda")
    L = random_scale_tril((300,), k).cuda()
    cov = L @ L.mT
    with backends.use("cuda"):
        torch.testing.assert_close(ops.mvn_tril_log_prob(value, loc, L), torch_mvn_log_prob(value, loc, scale_tril=L))
        torch.testing.assert_close(
            ops.mvn_cov_log_prob(value, loc, cov), torch_mvn_log_prob(value, loc, covariance_matrix=cov)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix"])
def test_half_precision_in_float32(dtype, matrix, layout):
    op, ref = OPS[matrix]
    inputs = [t.to(dtype) for t in make_operands(layout, (64,), 6, matrix=matrix)]
    expected, expected_grads = grads_of(ref, [t.double() for t in inputs], torch.ones(64, dtype=torch.float64))
    got, grads = cuda_grads(op, inputs, torch.ones(64, dtype=dtype))
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), expected, rtol=2 * eps, atol=4 * eps * expected.abs().max().item())
    for g, e in zip(grads, expected_grads):
        # A shared gradient sums 64 samples' terms, each rounded once on output at most.
        torch.testing.assert_close(g.double(), e, rtol=4 * eps, atol=8 * eps * (1 + e.abs().max().item()))


# The last event size with a thread per sample, the first with a warp, and one whose vectors
# take two slots per lane.
THREAD_AND_WARP_SIZES = [backends.CUDA_WARP_MIN_EVENT_SIZE - 1, backends.CUDA_WARP_MIN_EVENT_SIZE, 40]


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_value", "shared_matrix", "partial"])
@pytest.mark.parametrize("k", [3, backends.CUDA_WARP_MIN_EVENT_SIZE])
def test_gradcheck(matrix, layout, k):
    op, _ = OPS[matrix]
    value, loc, M = (t.requires_grad_() for t in on_gpu(make_operands(layout, (2, 3), k, matrix=matrix)))
    fix = (lambda L: L.tril()) if matrix == "scale_tril" else symmetrise
    with backends.use("cuda"):
        assert torch.autograd.gradcheck(lambda v, m, A: op(v, m, fix(A)), (value, loc, M))


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix", "shared_loc", "partial"])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_backward_op(matrix, layout, mask):
    _, ref = OPS[matrix]
    inputs = make_operands(layout, (4, 3), 5, matrix=matrix)
    [upstream] = upstream_gradients(matrix, (4, 3), torch.float64, "cuda", with_log_det=False)
    _, expected = grads_of(ref, inputs, upstream[0].cpu())
    got = getattr(torch.ops.fusedgauss, BACKWARD_OPS[matrix])(*upstream, *on_gpu(inputs), list(mask))
    for g, e, wanted in zip(got, expected, mask):
        if wanted:
            torch.testing.assert_close(g.cpu(), e)
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("k", [3, 17, 64])
def test_shared_gradient_is_deterministic(matrix, k):
    """Shared gradients are reduced per block in a fixed order: the same bits every run."""
    op, _ = OPS[matrix]
    inputs = on_gpu(make_operands("shared_matrix", (300_000,), k, matrix=matrix, dtype=torch.float32))
    weights = torch.randn(300_000, device="cuda")
    with backends.use("cuda"):
        runs = [grads_of(op, inputs, weights)[1] for _ in range(3)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("k", THREAD_AND_WARP_SIZES)
def test_not_positive_definite_poisons_its_samples_only(k):
    value, loc, cov = make_operands("per_sample", (5,), k, matrix="covariance")
    cov[2] = -cov[2]
    value, loc, cov = on_gpu([value, loc, cov])
    cov.requires_grad_()
    loc.requires_grad_()
    with backends.use("cuda"):
        out = ops.mvn_cov_log_prob(value, loc, cov)
        out.sum().backward()
    bad = torch.zeros(5, dtype=torch.bool, device="cuda")
    bad[2] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.isfinite(loc.grad[~bad]).all() and torch.isfinite(cov.grad[~bad]).all()


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_two_to_the_24_samples(matrix):
    """Beyond the ~524k right-hand sides where torch's batched triangular solve fails on CUDA."""
    n, k = 1 << 24, 2
    op, ref = OPS[matrix]
    value, loc = torch.randn(2, n, k, device="cuda")
    M = (random_scale_tril if matrix == "scale_tril" else random_spd)((4096,), k).float().cuda()
    M = M.repeat(n // 4096, 1, 1).requires_grad_()
    with backends.use("cuda"):
        out = op(value, loc, M)
        (grad,) = torch.autograd.grad(out.sum(), M)
    check = torch.randint(0, n, (4096,), device="cuda")
    args = (value[check].double().cpu(), loc[check].double().cpu(), M[check].detach().double().cpu())
    args = [a.requires_grad_() for a in args]
    expected = ref(*args)
    (expected_grad,) = torch.autograd.grad(expected.sum(), args[2])
    torch.testing.assert_close(out[check].double().cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad[check].double().cpu(), expected_grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix"])
@pytest.mark.parametrize("k", [6, 20])
def test_cuda_graph_capture_and_replay(matrix, layout, k):
    """Forward and backward run without a host synchronisation, so a training step using them
    can be captured in a CUDA graph; replays on new data give the eager results."""
    op, _ = OPS[matrix]
    value, loc, M = on_gpu(make_operands(layout, (1024,), k, matrix=matrix, dtype=torch.float32))
    loc.requires_grad_()
    M.requires_grad_()

    def step():
        out = op(value, loc, M)
        return (out, *torch.autograd.grad(out.sum(), (loc, M)))

    with backends.use("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture, as torch.cuda.graphs asks
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        new_value, new_loc, new_M = on_gpu(make_operands(layout, (1024,), k, matrix=matrix, dtype=torch.float32))
        with torch.no_grad():
            value.copy_(new_value)
            loc.copy_(new_loc)
            M.copy_(new_M)
        graph.replay()
        eager = step()
    for got, expected in zip(captured, eager):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize(
    ("layout", "batch_shape"),
    [("per_sample", (7,)), ("shared_value", (7,)), ("shared_loc", (4, 3)), ("partial", (4, 3))],
    ids=str,
)
@pytest.mark.parametrize("k", THREAD_AND_WARP_SIZES)
def test_thread_and_warp_per_sample_against_reference(matrix, layout, batch_shape, k):
    """On both sides of CUDA_WARP_MIN_EVENT_SIZE, where a per-sample matrix moves from a thread
    to a warp per sample, and the gradients of shared operands from per-thread terms to
    per-warp sums."""
    check_float64(cuda_grads, matrix, layout, batch_shape, k)
    check_float32(cuda_grads, matrix, layout, batch_shape, k)


@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_warp_per_sample_grid_stride_and_deterministic_reduction(matrix):
    """More samples than the grid has warps, so each warp takes several; a shared loc's
    gradient has the same bits on every run."""
    n, k = 2048 * 4 * 2 + 5, backends.CUDA_WARP_MIN_EVENT_SIZE + 3
    op, ref = OPS[matrix]
    inputs = make_operands("shared_loc", (n,), k, matrix=matrix)
    weights = torch.randn(n, dtype=torch.float64)
    expected, expected_grads = grads_of(ref, inputs, weights)
    gpu_inputs = on_gpu([t.float() for t in inputs])
    with backends.use("cuda"):
        runs = [grads_of(op, gpu_inputs, weights.float().cuda()) for _ in range(3)]
    out, grads = runs[0]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    for g, e in zip(grads, expected_grads):
        scale = 1 + e.abs().max()
        torch.testing.assert_close(g.double().cpu() / scale, e / scale, rtol=0, atol=1e-4 * k)
    for _, other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads, other))


class TestCholesky:
    @pytest.mark.parametrize("k", [1, 2, 3, 6, 17, 32, 64])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_against_torch_linalg(self, k, dtype):
        check_against_torch_linalg("cuda", k, (4, 3), dtype, device="cuda")

    @pytest.mark.parametrize("k", [4, backends.CUDA_WARP_MIN_EVENT_SIZE])
    def test_gradcheck(self, k):
        A = random_spd((2,), k).cuda().requires_grad_()
        with backends.use("cuda"):
            assert torch.autograd.gradcheck(lambda X: ops.cholesky(symmetrise(X)), (A,))

    @pytest.mark.parametrize("k", THREAD_AND_WARP_SIZES)
    def test_not_positive_definite_gives_nan_for_that_matrix_only(self, k):
        A = random_spd((4,), k)
        A[1] = -A[1]
        with backends.use("cuda"):
            L = ops.cholesky(A.cuda()).cpu()
        assert torch.isnan(L[1]).all() and torch.isfinite(L[[0, 2, 3]]).all()

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("k", [5, backends.CUDA_WARP_MIN_EVENT_SIZE])
    def test_half_precision(self, dtype, k):
        A = random_spd((16,), k).to(dtype)
        with backends.use("cuda"):
            L = ops.cholesky(A.cuda()).cpu()
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(L.double(), reference.cholesky(A.double()), rtol=8 * eps, atol=8 * eps)


class TestOpcheck:
    @staticmethod
    def sample_inputs():
        # Both sides of CUDA_WARP_MIN_EVENT_SIZE: a thread and a warp per sample.
        return opcheck_inputs("cuda", event_sizes=(3, backends.CUDA_WARP_MIN_EVENT_SIZE))

    def test_log_prob_ops(self):
        for matrix, args in self.sample_inputs():
            torch.library.opcheck(getattr(torch.ops.fusedgauss, FORWARD_OPS[matrix]).default, args)

    def test_backward_ops(self):
        for matrix, (value, loc, M) in self.sample_inputs():
            batch_shape = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], M.shape[:-2])
            for mask in ([True, True, True], [False, True, True]):
                for grads in upstream_gradients(matrix, batch_shape, device="cuda"):
                    torch.library.opcheck(
                        getattr(torch.ops.fusedgauss, BACKWARD_OPS[matrix]).default,
                        (*grads, value, loc.detach(), M.detach(), mask),
                    )

    @pytest.mark.parametrize("k", [4, backends.CUDA_WARP_MIN_EVENT_SIZE])
    def test_cholesky_ops(self, k):
        A = random_spd((2, 2), k).float().cuda()
        torch.library.opcheck(torch.ops.fusedgauss.cholesky.default, (A.requires_grad_(),))
        L = torch.linalg.cholesky(A.detach()).contiguous()
        torch.library.opcheck(torch.ops.fusedgauss.cholesky_backward.default, (torch.randn_like(L), L))


def test_event_sizes_beyond_the_kernels_go_to_torch():
    k = backends.MAX_EVENT_SIZE["cuda"] + 1
    assert backends.select("cuda", k) == "torch"
    with backends.use("cuda"), pytest.raises(backends.BackendUnavailableError, match="event sizes up to"):
        ops.mvn_tril_log_prob(*on_gpu([torch.zeros(k), torch.zeros(k), torch.eye(k)]))


# --- diagonal and squashed ops ------------------------------------------------------------------

from test_squashed_ops import (  # noqa: E402
    CASE_IDS,
    CASES,
    LAYOUT_SHAPES as SQUASHED_LAYOUT_SHAPES,
    SATURATED,
    check_case,
    opcheck_cases,
    reference_on_float64,
)


def cuda_outputs_and_grads(case, inputs):
    with backends.use("cuda"):
        out, grads = outputs_and_grads(case.op, on_gpu(inputs))
    return [o.cpu() for o in out], [g.cpu() for g in grads]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("layout", "batch_shape"), SQUASHED_LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 6, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_squashed_against_reference(case, layout, batch_shape, k, dtype):
    check_case(cuda_outputs_and_grads, case, layout, batch_shape, k, dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_loc", "shared_parameter"])
@pytest.mark.parametrize("k", [3, backends.CUDA_WARP_MIN_EVENT_SIZE])
def test_squashed_gradcheck(case, layout, k):
    inputs = [t.cuda().requires_grad_() for t in case.inputs(layout, (2, 3), k)]
    with backends.use("cuda"):
        assert torch.autograd.gradcheck(case.op, inputs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_parameter"])
def test_squashed_many_blocks(case, layout):
    # Enough samples for every block of the grid, so shared gradients add many partial rows.
    big = case.inputs(layout, (300000,), 6)
    expected, expected_grads = reference_on_float64(case, big)
    got, got_grads = cuda_outputs_and_grads(case, big)
    for g, e in zip(got + got_grads, expected + expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8 * (1 + e.abs().max().item()))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_squashed_saturation(case):
    k = SATURATED.numel()
    inputs = case.inputs("per_sample", (8,), k)
    if case.rsample:
        inputs = [SATURATED.expand(8, k).clone(), 0.05 * inputs[1], inputs[2]]
    elif "squashed" in case.name and "pre_tanh" in case.name:
        inputs[0] = SATURATED.expand(8, k).clone()
    inputs = [t.float() for t in inputs]
    expected, expected_grads = reference_on_float64(case, inputs)
    got, got_grads = cuda_outputs_and_grads(case, inputs)
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert torch.isfinite(g).all()
        scale = 1 + e.abs().max()
        torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-4)


def test_squashed_ops_opcheck():
    for name, args in opcheck_cases("cuda"):
        torch.library.opcheck(getattr(torch.ops.fusedgauss, name).default, args)
