"""mvn_tril_log_prob and mvn_cov_log_prob against the float64 reference and
torch.distributions, on every backend that runs here."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import outputs_and_grads, random_scale_tril, random_spd, symmetrise, torch_mvn_log_prob

import fusedgauss
from fusedgauss import backends, ops, reference

from conftest import BACKENDS, requires_compiled_cpu

CPU_BACKENDS = [
    pytest.param("cpu", marks=requires_compiled_cpu),
    "torch",
]
EVENT_SIZES = [1, 2, 3, 6, 17, 32, 64]
BATCH_SHAPES = [(), (7,), (4, 3)]
# Which operands are shared by the whole batch, or broadcast only partly.
LAYOUTS = ["per_sample", "shared_value", "shared_loc", "shared_matrix", "expanded_matrix", "partial"]


def make_operands(layout, batch_shape, k, *, matrix, dtype=torch.float64, condition=None):
    """value, loc and a scale_tril or covariance with the given layout, float64 leaves."""
    batch_shape = tuple(batch_shape)
    value_shape, loc_shape, matrix_shape = batch_shape, batch_shape, batch_shape
    if layout == "shared_value":
        value_shape = ()
    elif layout == "shared_loc":
        loc_shape = (1,) * len(batch_shape)
    elif layout in ("shared_matrix", "expanded_matrix"):
        matrix_shape = ()
    elif layout == "partial":
        assert len(batch_shape) >= 2, "partial broadcasts need two batch dimensions"
        loc_shape = batch_shape[1:]
        matrix_shape = (batch_shape[0], 1)
    value = torch.randn(value_shape + (k,), dtype=torch.float64)
    loc = torch.randn(loc_shape + (k,), dtype=torch.float64)
    make = random_scale_tril if matrix == "scale_tril" else random_spd
    M = make(matrix_shape, k, condition=condition)
    if layout == "expanded_matrix":
        M = M.expand(batch_shape + (k, k))
    return value.to(dtype), loc.to(dtype), M.to(dtype)


OPS = {
    "scale_tril": (ops.mvn_tril_log_prob, reference.log_prob_of(reference.mvn_tril_log_prob)),
    "covariance": (ops.mvn_cov_log_prob, reference.mvn_cov_log_prob),
}


def upstream_gradients(matrix, batch_shape, dtype=torch.float32, device="cpu", with_log_det=True):
    """The upstream gradients that a log-prob backward op takes first: of the log-prob and, for
    the scale_tril op, of its log_det output (None: unused; with `with_log_det`, also a tensor)."""
    grad = torch.randn(batch_shape, dtype=dtype, device=device)
    if matrix != "scale_tril":
        return [(grad,)]
    return [(grad, None)] + ([(grad, torch.randn(batch_shape, dtype=dtype, device=device))] if with_log_det else [])


def grads_of(fn, inputs, weights):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
    return out.detach(), grads


# Partial broadcasts need two batch dimensions.
LAYOUT_SHAPES = [
    (layout, shape) for layout in LAYOUTS for shape in BATCH_SHAPES if layout != "partial" or len(shape) >= 2
]


def run_on(backend, device="cpu"):
    """fn(op, inputs, weights) -> (output, gradients): the op on `backend`, the inputs moved
    to `device`, the results brought back to the CPU."""

    def run(op, inputs, weights):
        with backends.use(backend):
            out, grads = grads_of(op, [t.to(device) for t in inputs], weights.to(device))
        return out.cpu(), [g.cpu() for g in grads]

    return run


def check_float64(run, matrix, layout, batch_shape, k):
    """float64 results and gradients equal the float64 reference."""
    op, ref = OPS[matrix]
    inputs = make_operands(layout, batch_shape, k, matrix=matrix)
    weights = torch.randn(batch_shape, dtype=torch.float64)
    expected, expected_grads = grads_of(ref, inputs, weights)
    got, got_grads = run(op, inputs, weights)
    assert got.shape == expected.shape == torch.Size(batch_shape)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(("value", "loc", matrix), got_grads, expected_grads):
        assert g.shape == e.shape, name
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8, msg=lambda m: f"{name}: {m}")


def check_float32(run, matrix, layout, batch_shape, k):
    """float32 results and gradients equal the float64 reference within rounding."""
    op, ref = OPS[matrix]
    inputs = make_operands(layout, batch_shape, k, matrix=matrix)
    weights = torch.randn(batch_shape, dtype=torch.float64)
    expected, expected_grads = grads_of(ref, inputs, weights)
    got, got_grads = run(op, [t.float() for t in inputs], weights.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-5 * k, atol=2e-5 * k)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == torch.float32
        scale = 1 + e.abs().max()
        torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-4 * k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize(("layout", "batch_shape"), LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", EVENT_SIZES)
class TestAgainstReference:
    def test_float64(self, backend, matrix, layout, batch_shape, k):
        check_float64(run_on(backend), matrix, layout, batch_shape, k)

    def test_float32(self, backend, matrix, layout, batch_shape, k):
        check_float32(run_on(backend), matrix, layout, batch_shape, k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 17])
def test_same_as_torch_distributions(backend, k):
    value = torch.randn(5, k, dtype=torch.float64)
    loc = torch.randn(5, k, dtype=torch.float64)
    L = random_scale_tril((5,), k)
    cov = L @ L.mT
    with backends.use(backend):
        torch.testing.assert_close(ops.mvn_tril_log_prob(value, loc, L), torch_mvn_log_prob(value, loc, scale_tril=L))
        torch.testing.assert_close(
            ops.mvn_cov_log_prob(value, loc, cov), torch_mvn_log_prob(value, loc, covariance_matrix=cov)
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_half_precision_in_float32(backend, dtype, matrix):
    """Half inputs are computed in float32 and returned in their dtype: the error is that of
    rounding the inputs and the result, no more."""
    op, ref = OPS[matrix]
    inputs = [t.to(dtype) for t in make_operands("per_sample", (64,), 6, matrix=matrix)]
    expected = ref(*(t.double() for t in inputs))
    with backends.use(backend):
        got, grads = grads_of(op, inputs, torch.ones(64, dtype=dtype))
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), expected, rtol=2 * eps, atol=4 * eps * expected.abs().max().item())
    _, expected_grads = grads_of(ref, [t.double() for t in inputs], torch.ones(64, dtype=torch.float64))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=4 * eps, atol=4 * eps * (1 + e.abs().max().item()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix"])
@pytest.mark.parametrize("k", [6, 17])
def test_ill_conditioned(backend, condition, matrix, layout, k):
    """At condition numbers up to 1e6: float64 agrees with the reference, and float32 is no
    less accurate than torch.distributions in float32. (A shared factor is applied through its
    inverse on the CPU, a per-sample one through solves.)"""
    op, ref = OPS[matrix]
    inputs = make_operands(layout, (256,), k, matrix=matrix, condition=condition)
    expected = ref(*inputs)
    with backends.use(backend):
        torch.testing.assert_close(op(*inputs), expected, rtol=1e-9, atol=1e-9 * condition)
        got32 = op(*(t.float() for t in inputs)).double()
    value, loc, M = (t.float() for t in inputs)
    kwargs = {"scale_tril": M} if matrix == "scale_tril" else {"covariance_matrix": M}
    torch32 = torch_mvn_log_prob(value, loc, **kwargs).double()
    our_error = (got32 - expected).abs().max().item()
    torch_error = (torch32 - expected).abs().max().item()
    assert math.isfinite(our_error)
    assert our_error <= 2 * torch_error + 1e-4 * (1 + expected.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_non_contiguous_inputs(backend, matrix):
    op, ref = OPS[matrix]
    k, B = 5, 9
    value = torch.randn(k, B, dtype=torch.float64).T
    loc = torch.randn(B, 2 * k, dtype=torch.float64)[:, ::2]
    M = make_operands("per_sample", (B,), k, matrix=matrix)[2].mT.contiguous().mT
    assert not (value.is_contiguous() or loc.is_contiguous() or M.is_contiguous())
    weights = torch.randn(B, dtype=torch.float64)
    expected, expected_grads = grads_of(ref, (value, loc, M), weights)
    with backends.use(backend):
        got, got_grads = grads_of(op, (value, loc, M), weights)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


# Every op whose kernels read per-sample operands at their batch stride (the full-covariance
# ops): the op on the operands it names (value is eps for a sample).
STRIDED_SAMPLE_OPS = {
    "mvn_tril": (lambda v, loc, L: ops.mvn_tril_log_prob(v, loc, L, return_log_det=True),
                 ("value", "loc", "scale_tril")),
    "mvn_cov": (ops.mvn_cov_log_prob, ("value", "loc", "covariance")),
    "squashed_tril": (lambda v, loc, L: ops.squashed_tril_log_prob(v, loc, L, True, return_log_det=True),
                      ("value", "loc", "scale_tril")),
    "squashed_tril_rsample": (lambda eps, loc, L: ops.squashed_tril_rsample_log_prob(loc, L, eps),
                              ("value", "loc", "scale_tril")),
    "mvn_packed": (lambda v, loc, P: ops.mvn_packed_log_prob(v, loc, P, "softplus", 0.1, return_log_det=True),
                   ("value", "loc", "packed")),
    "squashed_packed": (lambda v, loc, P: ops.squashed_packed_log_prob(v, loc, P, "softplus", 0.1, True,
                                                                       return_log_det=True),
                        ("value", "loc", "packed")),
}


def sliced_operands(batch_shape, k, flattens, device):
    """float32 value, loc and packed as column slices of one wide tensor (a policy network's
    output split in parts), scale_tril and covariance as slices of larger batches of
    matrices. With `flattens`, each operand's samples lie one fixed stride apart (every other
    matrix). Otherwise the samples are the first half of a last batch dimension twice as
    long, so that a batch of two dimensions does not flatten to one stride."""
    n = k * (k + 1) // 2
    last = batch_shape[-1]
    big = batch_shape[:-1] + ((last if flattens else 2 * last),)
    wide, L_all, S_all = (t.to(device, torch.float32) for t in (
        0.5 * torch.randn(big + (2 * k + n + 3,), dtype=torch.float64),
        random_scale_tril(batch_shape[:-1] + (2 * last,), k),
        random_spd(batch_shape[:-1] + (2 * last,), k)))
    rows = wide if flattens else wide[..., :last, :]
    L, S = (M[..., ::2, :, :] if flattens else M[..., :last, :, :] for M in (L_all, S_all))
    return {"value": rows[..., :k], "loc": rows[..., k:2 * k], "scale_tril": L, "covariance": S,
            "packed": rows[..., 2 * k:2 * k + n]}


def aten_ops_run_by(fn):
    """The aten ops fn runs, as the profiler records them: those inside the C++ ops included."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize(("backend", "device"), [p for p in BACKENDS if p.id in ("cpu", "cuda")])
@pytest.mark.parametrize("op_name", STRIDED_SAMPLE_OPS)
@pytest.mark.parametrize("k", [6, 17])
@pytest.mark.parametrize(("batch_shape", "flattens"), [((37,), True), ((4, 3), True), ((4, 3), False)],
                         ids=["one_stride", "one_stride_2d", "copied"])
def test_samples_a_stride_apart_are_read_in_place(backend, device, op_name, k, batch_shape, flattens):
    """Operands whose samples lie a fixed stride apart reach the kernels as they are, with the
    same bits as contiguous copies give, forward and backward; a batch that does not flatten
    to one stride is copied, which the profiler sees (so it would see a copy of the others)."""
    op, names = STRIDED_SAMPLE_OPS[op_name]
    operands = sliced_operands(batch_shape, k, flattens, device)
    strided = [operands[name] for name in names]
    assert not any(t.is_contiguous() for t in strided)
    with backends.use(backend):
        got, got_grads = outputs_and_grads(op, strided)
        expected, expected_grads = outputs_and_grads(op, [t.contiguous() for t in strided])
        copies = {"aten::clone", "aten::contiguous"} & aten_ops_run_by(lambda: op(*strided))
    for g, e in zip(got + got_grads, expected + expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert bool(copies) == (not flattens), copies


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix", "expanded_matrix"])
def test_zero_size_batch(backend, matrix, layout):
    op, _ = OPS[matrix]
    value, loc, M = make_operands(layout, (0,), 4, matrix=matrix)
    with backends.use(backend):
        out, grads = grads_of(op, (value, loc, M), torch.ones(0, dtype=torch.float64))
    assert out.shape == (0,)
    for g, t in zip(grads, (value, loc, M)):
        assert g.shape == t.shape
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_value", "shared_matrix", "partial"])
def test_gradcheck(backend, matrix, layout):
    """Analytic gradients (the fused backward ops) against finite differences, in float64."""
    op, _ = OPS[matrix]
    value, loc, M = make_operands(layout, (2, 3), 3, matrix=matrix)
    value.requires_grad_()
    loc.requires_grad_()
    M.requires_grad_()
    if matrix == "scale_tril":
        fn = lambda v, m, L: op(v, m, L.tril())  # noqa: E731  (only the lower triangle is read)
    else:
        fn = lambda v, m, S: op(v, m, symmetrise(S))  # noqa: E731  (the gradient is symmetric)
    with backends.use(backend):
        assert torch.autograd.gradcheck(fn, (value, loc, M))


@requires_compiled_cpu
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_matrix", "shared_loc", "partial"])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)])
def test_backward_op(matrix, layout, mask):
    """The explicit backward op returns, for each requested input, the gradient that
    autograd computes through the reference; unrequested entries are empty."""
    _, ref = OPS[matrix]
    backward = getattr(torch.ops.fusedgauss, f"mvn_{'tril' if matrix == 'scale_tril' else 'cov'}_log_prob_backward")
    inputs = make_operands(layout, (4, 3), 5, matrix=matrix)
    # The log_det output of the scale_tril op is unused here (test_log_det_output.py checks it).
    [upstream] = upstream_gradients(matrix, (4, 3), torch.float64, with_log_det=False)
    _, expected = grads_of(ref, inputs, upstream[0])
    got = backward(*upstream, *inputs, list(mask))
    for g, e, wanted in zip(got, expected, mask):
        if wanted:
            torch.testing.assert_close(g, e)
        else:
            assert g.numel() == 0


@requires_compiled_cpu
@pytest.mark.parametrize("matrix", ["scale_tril", "covariance"])
def test_shared_gradient_is_deterministic(matrix):
    """Shared gradients are reduced in fixed chunks: the same bits at any thread count."""
    op, _ = OPS[matrix]
    value, loc, M = make_operands("shared_matrix", (20000,), 6, matrix=matrix, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            _, grads = grads_of(op, (value, loc, M), torch.ones(20000))
            results.append(grads[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


# Each op that writes a per-sample (n, k, k) gradient, as (inputs -> weighted loss) on n samples.
def _streamed_losses():
    def log_prob(op):
        return lambda value, loc, M, w: (op(value, loc, M) * w).sum()

    def packed(value, loc, M, w):
        rows, cols = torch.tril_indices(M.shape[-1], M.shape[-1])
        return (ops.mvn_packed_log_prob(value, loc, M[..., rows, cols], "softplus") * w).sum()

    def rsample(eps, loc, M, w):
        action, pre_tanh, log_prob = ops.squashed_tril_rsample_log_prob(loc, M, eps)
        return (action.sum(-1) * w).sum() + (pre_tanh.sum(-1) * w).sum() + (log_prob * w).sum()

    return {
        "scale_tril": ("scale_tril", log_prob(ops.mvn_tril_log_prob)),
        "covariance": ("covariance", log_prob(ops.mvn_cov_log_prob)),
        "packed": ("scale_tril", packed),
        "rsample": ("scale_tril", rsample),
    }


@requires_compiled_cpu
@pytest.mark.parametrize("name", ["scale_tril", "covariance", "packed", "rsample"])
def test_gradients_too_big_for_the_caches(name):
    """A per-sample gradient of 8 MB or more is written with non-temporal stores
    (kStreamingOutputBytes, csrc/cpu/lanes.h): the same bits as the plain stores give the
    same samples in smaller batches, wherever a chunk's rows start."""
    matrix, loss = _streamed_losses()[name]
    # float32 gradients of 18.9 MB (n, k, k) and 10.0 MB (packed, n x 153) for the whole batch;
    # the parts' are below 8 MB.
    k, n = 17, 16384
    bounds = [0, 4099, 8200, 12301, n]
    value, loc, M = make_operands("per_sample", (n,), k, matrix=matrix, dtype=torch.float32)
    weights = torch.randn(n)

    def grads(part):
        inputs = [t[part].detach().requires_grad_() for t in (value, loc, M)]
        return torch.autograd.grad(loss(*inputs, weights[part]), inputs)

    whole = grads(slice(0, n))
    parts = [grads(slice(a, b)) for a, b in zip(bounds, bounds[1:])]
    for i, g in enumerate(whole):
        assert torch.equal(g, torch.cat([part[i] for part in parts]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_not_positive_definite_poisons_its_samples_only(backend):
    value, loc, cov = make_operands("per_sample", (5,), 3, matrix="covariance")
    cov[2] = -cov[2]
    cov.requires_grad_()
    loc.requires_grad_()
    with backends.use(backend):
        out = ops.mvn_cov_log_prob(value, loc, cov)
        out.sum().backward()
    bad = torch.zeros(5, dtype=torch.bool)
    bad[2] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert torch.isfinite(loc.grad[~bad]).all() and torch.isfinite(cov.grad[~bad]).all()


def opcheck_inputs(device="cpu", event_sizes=(3,)):
    """(matrix, (value, loc, matrix)) for opcheck: per-sample, shared and partly broadcast."""
    for k in event_sizes:
        for matrix in ("scale_tril", "covariance"):
            for layout in ("per_sample", "shared_matrix", "partial"):
                value, loc, M = make_operands(layout, (2, 3), k, matrix=matrix, dtype=torch.float32)
                yield matrix, (value.to(device), loc.to(device).requires_grad_(), M.to(device).requires_grad_())


@requires_compiled_cpu
class TestOpcheck:
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch."""

    @staticmethod
    def sample_inputs():
        return opcheck_inputs()

    def test_log_prob_ops(self):
        for matrix, args in self.sample_inputs():
            name = "mvn_tril_log_prob" if matrix == "scale_tril" else "mvn_cov_log_prob"
            torch.library.opcheck(getattr(torch.ops.fusedgauss, name).default, args)

    def test_backward_ops(self):
        for matrix, (value, loc, M) in self.sample_inputs():
            name = "mvn_tril_log_prob_backward" if matrix == "scale_tril" else "mvn_cov_log_prob_backward"
            batch_shape = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], M.shape[:-2])
            for mask in ([True, True, True], [False, True, True]):
                for grads in upstream_gradients(matrix, batch_shape):
                    torch.library.opcheck(
                        getattr(torch.ops.fusedgauss, name).default, (*grads, value, loc.detach(), M.detach(), mask)
                    )


def test_public_api():
    assert fusedgauss.mvn_tril_log_prob is ops.mvn_tril_log_prob
    assert fusedgauss.mvn_cov_log_prob is ops.mvn_cov_log_prob
