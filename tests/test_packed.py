"""packed_to_scale_tril, the fused policy head, and packed_scale_tril_log_det on every backend
that runs here: against the float64 reference and the plain-PyTorch head they replace,
gradients included; gradcheck, opcheck, half precision, non-contiguous, zero-size and
saturated inputs, and their errors; then the packed log-probs and from_packed."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import OpRecorder, plain_torch_scale_tril

from fusedgauss import backends, ops, reference

from conftest import BACKENDS, FUSED_BACKENDS, ON_GPU, OPCHECK_LIBRARIES, requires_compiled_cpu

# 17, 32 and 40: a CUDA warp per sample, with one and two slots per lane.
EVENT_SIZES = [1, 2, 3, 6, 17, 32, 40]
BATCH_SHAPES = [(), (7,), (4, 3)]
TRANSFORMS = ["softplus", "exp", "none"]


def packed_size(k):
    return k * (k + 1) // 2


def random_packed(batch_shape, k, dtype=torch.float64):
    return torch.randn(tuple(batch_shape) + (packed_size(k),), dtype=dtype)


def value_and_grad(fn, packed, seed=1):
    """fn(packed) and the gradient of a random weighting of it (the same weights for every fn)."""
    x = packed.detach().requires_grad_()
    out = fn(x)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (grad,) = torch.autograd.grad((out.double() * weights.to(out.device)).sum(), x)
    return out.detach(), grad


def on_backend(backend, diag_transform, min_diag):
    def run(packed):
        with backends.use(backend):
            return ops.packed_to_scale_tril(packed, diag_transform, min_diag)

    return run


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("k", EVENT_SIZES)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
class TestAgainstReference:
    def test_values_and_gradients(self, backend, device, k, batch_shape, diag_transform, dtype):
        packed = random_packed(batch_shape, k, dtype)
        min_diag = 1e-3
        expected, expected_grad = value_and_grad(
            lambda x: plain_torch_scale_tril(x, diag_transform, min_diag), packed.double()
        )
        got, got_grad = value_and_grad(on_backend(backend, diag_transform, min_diag), packed.to(device))
        assert got.shape == batch_shape + (k, k) and got.dtype == dtype
        assert got_grad.shape == packed.shape and got_grad.dtype == dtype
        tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(got.cpu().double(), expected, **tolerance)
        torch.testing.assert_close(got_grad.cpu().double(), expected_grad, **tolerance)
        assert (got.cpu().triu(1) == 0).all()


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
def test_gradcheck(backend, device, diag_transform):
    packed = random_packed((3, 2), 4).to(device).requires_grad_()
    assert torch.autograd.gradcheck(on_backend(backend, diag_transform, 0.5), (packed,))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_float32(backend, device, dtype):
    packed = random_packed((50,), 6, dtype).to(device)
    got, got_grad = value_and_grad(on_backend(backend, "softplus", 0.0), packed)
    expected, expected_grad = value_and_grad(
        lambda x: reference.packed_to_scale_tril(x.float(), "softplus", 0.0), packed
    )
    assert got.dtype == dtype and got_grad.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected.to(dtype).cpu())
    torch.testing.assert_close(got_grad.cpu(), expected_grad.to(dtype).cpu())


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_non_contiguous_input(backend, device):
    wide = random_packed((12,), 6).to(device)[:, ::1].repeat(1, 2)[:, ::2]  # every other column
    assert not wide.is_contiguous()
    got, got_grad = value_and_grad(on_backend(backend, "softplus", 0.1), wide)
    expected, expected_grad = value_and_grad(lambda x: plain_torch_scale_tril(x, "softplus", 0.1), wide.cpu())
    torch.testing.assert_close(got.cpu(), expected)
    torch.testing.assert_close(got_grad.cpu(), expected_grad)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_zero_size_batch(backend, device):
    packed = random_packed((0, 3), 4).to(device).requires_grad_()
    L = on_backend(backend, "exp", 0.0)(packed)
    assert L.shape == (0, 3, 4, 4)
    L.sum().backward()
    assert packed.grad.shape == packed.shape


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
def test_large_entries_stay_finite(backend, device, diag_transform):
    """Entries of ±30 (float32): softplus and exp of the diagonal without overflow in the
    forward or NaN in the gradient, and large off-diagonal entries untouched."""
    packed = (30.0 * torch.randn(64, packed_size(5)).sign()).to(device)
    got, got_grad = value_and_grad(on_backend(backend, diag_transform, 0.0), packed)
    expected, expected_grad = value_and_grad(
        lambda x: reference.packed_to_scale_tril(x, diag_transform, 0.0), packed.double().cpu()
    )
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad.cpu().double(), expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_upper_triangle_gradient_is_ignored(backend, device):
    """The upper triangle of L is constant zero: a gradient there reaches nothing."""
    packed = random_packed((5,), 4).to(device).requires_grad_()
    upper = torch.ones(4, 4, dtype=torch.float64, device=device).triu(1)
    (on_backend(backend, "none", 0.0)(packed) * upper).sum().backward()
    assert (packed.grad == 0).all()


@requires_compiled_cpu
class TestOpcheck:
    @staticmethod
    def sample_inputs(device="cpu"):
        for diag_transform in TRANSFORMS:
            for shape in [(3,), (2, 3), ()]:
                yield random_packed(shape, 3, torch.float32).to(device).requires_grad_(), diag_transform, 0.25

    def test_forward(self):
        for args in self.sample_inputs():
            torch.library.opcheck(torch.ops.fusedgauss.packed_to_scale_tril.default, args)

    def test_backward(self):
        for packed, diag_transform, _ in self.sample_inputs():
            grad = torch.randn(packed.shape[:-1] + (3, 3))
            torch.library.opcheck(
                torch.ops.fusedgauss.packed_to_scale_tril_backward.default, (grad, packed.detach(), diag_transform)
            )


@pytest.mark.skipif(not (ON_GPU and backends.TRITON_KERNELS), reason="opcheck of a triton_op needs a GPU")
def test_triton_opcheck():
    from fusedgauss import triton_ops  # noqa: F401

    for args in TestOpcheck.sample_inputs("cuda"):
        torch.library.opcheck(torch.ops.fusedgauss_triton.packed_to_scale_tril.default, args)


@pytest.mark.skipif(not (ON_GPU and backends.COMPILED_CUDA), reason="needs a GPU and the CUDA kernels")
def test_cuda_opcheck():
    for args in TestOpcheck.sample_inputs("cuda"):
        torch.library.opcheck(torch.ops.fusedgauss.packed_to_scale_tril.default, args)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.randn(4, 5),), ValueError, "k(k+1)/2 values for some k >= 1"),
        ((torch.randn(4, 0),), ValueError, "k(k+1)/2 values for some k >= 1"),
        ((torch.randn(()),), ValueError, "packed needs an event dimension"),
        ((torch.ones(4, 6, dtype=torch.int64),), TypeError, "packed must be a floating-point tensor"),
        ((torch.randn(4, 6), "relu"), ValueError, "diag_transform must be one of softplus, exp, none, got 'relu'"),
        ((torch.randn(4, 6), "softplus", -1e-3), ValueError, "min_diag must be a finite number >= 0"),
    ],
)
def test_errors(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ops.packed_to_scale_tril(*args)


@requires_compiled_cpu
def test_compiled_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="diag_transform must be"):
        torch.ops.fusedgauss.packed_to_scale_tril(torch.randn(2, 3), "relu", 0.0)
    with pytest.raises(RuntimeError, match="got 5"):
        torch.ops.fusedgauss.packed_to_scale_tril(torch.randn(2, 5), "exp", 0.0)


# --- the log-determinant of a packed factor ---------------------------------------------------


def log_det_on_backend(backend, diag_transform, min_diag):
    def run(packed):
        with backends.use(backend):
            return ops.packed_scale_tril_log_det(packed, diag_transform, min_diag)

    return run


def plain_torch_log_det(packed, diag_transform, min_diag):
    """Σᵢ log Lᵢᵢ of the plain-PyTorch head's L: the oracle the fused op replaces."""
    return plain_torch_scale_tril(packed, diag_transform, min_diag).diagonal(dim1=-2, dim2=-1).log().sum(-1)


def positive_when_untransformed(packed, diag_transform):
    """With no transform, the diagonal entries made positive (a log-determinant needs them)."""
    if diag_transform != "none":
        return packed
    k = reference.event_size_of_packed(packed.shape[-1])
    diagonal = [i * (i + 3) // 2 for i in range(k)]
    packed = packed.clone()
    packed[..., diagonal] = 0.5 + packed[..., diagonal].abs()
    return packed


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("k", EVENT_SIZES)
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_log_det_against_plain_head(backend, device, k, batch_shape, diag_transform, dtype):
    packed = positive_when_untransformed(random_packed(batch_shape, k, dtype), diag_transform)
    expected, expected_grad = value_and_grad(
        lambda x: plain_torch_log_det(x, diag_transform, 1e-3), packed.double()
    )
    got, got_grad = value_and_grad(log_det_on_backend(backend, diag_transform, 1e-3), packed.to(device))
    assert got.shape == batch_shape and got.dtype == dtype
    assert got_grad.shape == packed.shape and got_grad.dtype == dtype
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6 * k}
    torch.testing.assert_close(got.cpu().double(), expected, **tolerance)
    torch.testing.assert_close(got_grad.cpu().double(), expected_grad, **tolerance)
    off_diagonal = torch.ones(packed.shape[-1], dtype=torch.bool)
    off_diagonal[[i * (i + 3) // 2 for i in range(k)]] = False
    assert (got_grad[..., off_diagonal] == 0).all()


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
def test_log_det_gradcheck(backend, device, diag_transform):
    packed = positive_when_untransformed(random_packed((3, 2), 4), diag_transform).to(device).requires_grad_()
    assert torch.autograd.gradcheck(log_det_on_backend(backend, diag_transform, 0.5), (packed,))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_log_det_half_non_contiguous_zero_size_and_large_entries(backend, device):
    run = log_det_on_backend(backend, "softplus", 0.1)
    for dtype in (torch.float16, torch.bfloat16):
        packed = random_packed((50,), 6, dtype).to(device)
        got, got_grad = value_and_grad(run, packed)
        expected, expected_grad = value_and_grad(lambda x: reference.packed_scale_tril_log_det(x.float(), "softplus", 0.1), packed)
        assert got.dtype == dtype and got_grad.dtype == dtype
        torch.testing.assert_close(got.cpu(), expected.to(dtype).cpu())
        torch.testing.assert_close(got_grad.cpu(), expected_grad.to(dtype).cpu())
    wide = random_packed((12,), 6).to(device).repeat(1, 2)[:, ::2]
    assert not wide.is_contiguous()
    torch.testing.assert_close(
        value_and_grad(run, wide), value_and_grad(lambda x: plain_torch_log_det(x, "softplus", 0.1), wide.contiguous())
    )
    empty = random_packed((0, 3), 4).to(device).requires_grad_()
    log_det = run(empty)
    assert log_det.shape == (0, 3)
    log_det.sum().backward()
    assert empty.grad.shape == empty.shape
    # Entries of ±30 in float32: softplus and exp of the diagonal without overflow, and a
    # finite gradient.
    for diag_transform in ("softplus", "exp"):
        packed = (30.0 * torch.randn(64, packed_size(5)).sign()).to(device)
        got, got_grad = value_and_grad(log_det_on_backend(backend, diag_transform, 0.0), packed)
        expected, expected_grad = value_and_grad(
            lambda x: reference.packed_scale_tril_log_det(x, diag_transform, 0.0), packed.double().cpu()
        )
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got_grad.cpu().double(), expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("namespace", "device"), OPCHECK_LIBRARIES)
def test_log_det_opcheck(namespace, device):
    if namespace == "fusedgauss_triton":
        from fusedgauss import triton_ops  # noqa: F401  (registers the Triton ops)
    library = getattr(torch.ops, namespace)
    for packed, diag_transform, min_diag in TestOpcheck.sample_inputs(device):
        packed = positive_when_untransformed(packed.detach(), diag_transform).requires_grad_()
        torch.library.opcheck(library.packed_scale_tril_log_det.default, (packed, diag_transform, min_diag))
        grad = torch.randn(packed.shape[:-1], device=device)
        torch.library.opcheck(
            library.packed_scale_tril_log_det_backward.default, (grad, packed.detach(), diag_transform, min_diag)
        )


def test_log_det_errors():
    with pytest.raises(ValueError, match=re.escape("k(k+1)/2 values for some k >= 1")):
        ops.packed_scale_tril_log_det(torch.randn(4, 5))
    with pytest.raises(ValueError, match=re.escape("diag_transform must be one of softplus, exp, none, got 'relu'")):
        ops.packed_scale_tril_log_det(torch.randn(4, 6), "relu")
    with pytest.raises(TypeError, match="packed must be a floating-point tensor"):
        ops.packed_scale_tril_log_det(torch.ones(4, 6, dtype=torch.int64))


@requires_compiled_cpu
def test_compiled_log_det_backward_checks_the_gradient_shape():
    with pytest.raises(RuntimeError, match=re.escape("grad has shape [3] but the log-determinants of packed [4, 6]")):
        torch.ops.fusedgauss.packed_scale_tril_log_det_backward(torch.randn(3), torch.randn(4, 6), "softplus", 0.0)


# --- log-probs that read the packed factor directly ------------------------------------------

# (value, loc, packed) batch shapes: per-sample, a packed factor shared by the batch (a
# state-independent L), a shared loc, and a partial broadcast.
LOG_PROB_LAYOUTS = {
    "per_sample": ((7,), (7,), (7,)),
    "shared_packed": ((4, 3), (4, 3), ()),
    "shared_loc": ((5,), (), (5,)),
    "partial": ((4, 1), (1, 3), (4, 3)),
}
LOG_PROB_OPS = {
    "mvn": (lambda v, m, p, t, d: ops.mvn_packed_log_prob(v, m, p, t, d),
            lambda v, m, p, t, d: reference.mvn_tril_log_prob(v, m, plain_torch_scale_tril(p, t, d))[0]),
    "squashed_pre_tanh": (lambda v, m, p, t, d: ops.squashed_packed_log_prob(v, m, p, t, d, True),
                          lambda v, m, p, t, d: reference.squashed_tril_log_prob(v, m, plain_torch_scale_tril(p, t, d), True)[0]),
    "squashed_action": (lambda v, m, p, t, d: ops.squashed_packed_log_prob(v.tanh(), m, p, t, d, False),
                        lambda v, m, p, t, d: reference.squashed_tril_log_prob(v.tanh(), m, plain_torch_scale_tril(p, t, d), False)[0]),
}


def log_prob_inputs(layout, k, dtype=torch.float64):
    value_shape, loc_shape, packed_shape = LOG_PROB_LAYOUTS[layout]
    value = torch.randn(value_shape + (k,), dtype=torch.float64)
    loc = 0.3 * torch.randn(loc_shape + (k,), dtype=torch.float64)
    packed = 0.5 * torch.randn(packed_shape + (packed_size(k),), dtype=torch.float64)
    return [t.to(dtype) for t in (value, loc, packed)]


def log_prob_and_grads(fn, inputs, diag_transform, min_diag):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves, diag_transform, min_diag)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out.double() * weights.to(out.device)).sum(), leaves)
    return [out.detach(), *grads]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", LOG_PROB_OPS)
@pytest.mark.parametrize("layout", LOG_PROB_LAYOUTS)
@pytest.mark.parametrize("k", EVENT_SIZES)
@pytest.mark.parametrize("diag_transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_packed_log_prob_against_reference(backend, device, op, layout, k, diag_transform, dtype):
    """The packed log-probs, gradients to value, loc and packed included, against the scale_tril
    op of the float64 reference on the plain-PyTorch head's L."""
    if backend == "triton" and k > backends.MAX_EVENT_SIZE["triton"]:
        pytest.skip("beyond the Triton kernels' event sizes (test_triton.py covers the error)")
    if backend == "triton" and k > 6 and diag_transform != "softplus":
        pytest.skip("the interpreter is slow: the larger sizes run one transform")
    fused, oracle = LOG_PROB_OPS[op]
    inputs = log_prob_inputs(layout, k, dtype)
    if diag_transform == "none":  # keep the diagonal positive
        inputs[2] = inputs[2].clone()
        inputs[2][..., [i * (i + 3) // 2 for i in range(k)]] = 0.5 + inputs[2][..., [i * (i + 3) // 2 for i in range(k)]].abs()
    expected = log_prob_and_grads(oracle, [t.double() for t in inputs], diag_transform, 1e-3)
    with backends.use(backend):
        got = log_prob_and_grads(fused, [t.to(device) for t in inputs], diag_transform, 1e-3)
    for g, e, like in zip(got, expected, [None, *inputs]):
        assert g.dtype == dtype and g.shape == e.shape
        if like is not None:
            assert g.shape == like.shape
        if dtype == torch.float64:
            torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=1e-9)
        else:
            scale = 1 + e.abs().max()
            torch.testing.assert_close(g.cpu().double() / scale, e / scale, rtol=0, atol=1e-5 * k + 1e-5)


@pytest.mark.parametrize(("backend", "device"), FUSED_BACKENDS)
@pytest.mark.parametrize("op", LOG_PROB_OPS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_packed"])
def test_packed_log_prob_reads_packed_values(backend, device, op, layout):
    """On every fused backend the packed log-prob and its gradient are the packed ops
    themselves: packed_to_scale_tril, which would write the (B, k, k) factor, never runs."""
    fused, _ = LOG_PROB_OPS[op]
    value, loc, packed = (t.float().to(device) for t in log_prob_inputs(layout, 4))
    packed.requires_grad_()
    namespace = "fusedgauss_triton" if backend == "triton" else "fusedgauss"
    packed_op = "mvn_packed_log_prob" if op == "mvn" else "squashed_packed_log_prob"
    with backends.use(backend), OpRecorder() as recorder:
        torch.autograd.grad(fused(value, loc, packed, "softplus", 0.01).sum(), packed)
    assert f"{namespace}::{packed_op}" in recorder.names, recorder.names
    assert f"{namespace}::{packed_op}_backward" in recorder.names, recorder.names
    assert not [name for name in recorder.names if "packed_to_scale_tril" in name], recorder.names


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", LOG_PROB_OPS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_packed"])
def test_packed_log_prob_gradcheck(backend, device, op, layout):
    fused, _ = LOG_PROB_OPS[op]
    value, loc, packed = (t.to(device).requires_grad_() for t in log_prob_inputs(layout, 3))
    with backends.use(backend):
        assert torch.autograd.gradcheck(lambda v, m, p: fused(v, m, p, "softplus", 0.1), (value, loc, packed))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_packed_log_prob_zero_size_and_half(backend, device):
    value, loc, packed = log_prob_inputs("per_sample", 6)
    with backends.use(backend):
        empty = ops.mvn_packed_log_prob(value[:0].to(device), loc[:0].to(device), packed[:0].to(device).requires_grad_())
        assert empty.shape == (0,)
        # A factor expanded to the empty batch (stride 0) holds no event to share.
        expanded = packed[0].to(device).requires_grad_()
        empty = ops.mvn_packed_log_prob(value[:0].to(device), loc[:0].to(device), expanded.expand(0, -1))
        (gradient,) = torch.autograd.grad(empty.sum(), expanded)
        assert empty.shape == (0,) and torch.all(gradient == 0)
        for dtype in (torch.float16, torch.bfloat16):
            got = ops.mvn_packed_log_prob(*(t.to(dtype).to(device) for t in (value, loc, packed)))
            expected, _ = reference.mvn_packed_log_prob(*(t.to(dtype).float() for t in (value, loc, packed)), "softplus", 0.0)
            assert got.dtype == dtype
            torch.testing.assert_close(got.cpu().float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("namespace", "device"), OPCHECK_LIBRARIES)
@pytest.mark.parametrize("k", [3, backends.CUDA_WARP_MIN_EVENT_SIZE])
def test_packed_log_prob_opcheck(namespace, device, k):
    if namespace == "fusedgauss_triton":
        from fusedgauss import triton_ops  # noqa: F401  (registers the Triton ops)
    library = getattr(torch.ops, namespace)
    for layout in ("per_sample", "shared_packed", "partial"):
        value, loc, packed = (t.float().to(device) for t in log_prob_inputs(layout, k))
        args = (value, loc.requires_grad_(), packed.requires_grad_(), "softplus", 0.01)
        torch.library.opcheck(library.mvn_packed_log_prob.default, args)
        torch.library.opcheck(library.squashed_packed_log_prob.default, (*args, True))
        batch_shape = torch.broadcast_shapes(value.shape[:-1], loc.shape[:-1], packed.shape[:-1])
        grad = torch.randn(batch_shape, device=device)
        for mask in ([True, True, True], [False, False, True]):
            for grad_log_det in (None, torch.randn(batch_shape, device=device)):
                plain = (grad, grad_log_det, value, loc.detach(), packed.detach(), "exp", 0.0)
                torch.library.opcheck(library.mvn_packed_log_prob_backward.default, (*plain, mask))
                torch.library.opcheck(library.squashed_packed_log_prob_backward.default, (*plain, False, mask))


def test_packed_log_prob_errors():
    value, loc, packed = log_prob_inputs("per_sample", 3)
    with pytest.raises(ValueError, match=re.escape("event sizes differ: value has 3, loc has 3, packed holds the scale_tril of event size 2")):
        ops.mvn_packed_log_prob(value, loc, packed[..., :3])
    with pytest.raises(ValueError, match="batch shapes do not broadcast"):
        ops.mvn_packed_log_prob(value, loc, packed[:2])
    if backends.COMPILED_CPU:
        with pytest.raises(RuntimeError, match=re.escape("grad_log_det has shape [3] but log_det has shape [7]")):
            torch.ops.fusedgauss.mvn_packed_log_prob_backward(
                torch.ones(7, dtype=torch.float64), torch.ones(3, dtype=torch.float64), value, loc, packed, "softplus",
                0.0, [True, True, True])
    with pytest.raises(ValueError, match="diag_transform must be one of"):
        ops.squashed_packed_log_prob(value, loc, packed, "relu", 0.0, True)


# --- log-probs of a policy head's whole output [loc | packed] ---------------------------------

HEAD_OPS = {  # (squashed, value_is_pre_tanh, value from the Gaussian draw u)
    "mvn": (False, False, lambda u: u),
    "squashed_pre_tanh": (True, True, lambda u: u),
    "squashed_action": (True, False, torch.tanh),
}


def head_inputs(value_batch, head_batch, k, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(tuple(value_batch) + (k,), dtype=torch.float64, generator=generator)
    head = 0.5 * torch.randn(tuple(head_batch) + (k + packed_size(k),), dtype=torch.float64, generator=generator)
    return value.to(dtype), head.to(dtype)


def head_log_prob_and_grad(value, head, op, through_head):
    """(log_prob, log_det, d/dhead of a random weighting of both), through packed_head_log_prob
    or through the packed op on head.split (what from_packed does)."""
    squashed, pre_tanh, to_value = HEAD_OPS[op]
    head = head.detach().requires_grad_()
    value = to_value(value)
    k = value.shape[-1]
    if through_head:
        log_prob, log_det = ops.packed_head_log_prob(value, head, "softplus", 1e-3, squashed=squashed,
                                                     value_is_pre_tanh=pre_tanh, return_log_det=True)
    else:
        loc, packed = head.split([k, packed_size(k)], dim=-1)
        packed_op = ops.squashed_packed_log_prob if squashed else ops.mvn_packed_log_prob
        flags = (pre_tanh,) if squashed else ()
        log_prob, log_det = packed_op(value, loc, packed, "softplus", 1e-3, *flags, return_log_det=True)
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(log_prob.shape, dtype=torch.float64, generator=generator).to(head.device) for _ in range(2)]
    (grad,) = torch.autograd.grad((log_prob.double() * weights[0] + log_det.double() * weights[1]).sum(), head)
    return log_prob.detach(), log_det.detach(), grad


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", HEAD_OPS)
@pytest.mark.parametrize("k", [1, 3, 6, 17])
@pytest.mark.parametrize("batch_shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_packed_head_log_prob_is_the_split_ones(backend, device, op, k, batch_shape, dtype):
    """Through the head, the log-prob, log_det and the head's gradient are those of the packed
    op on the head's two parts (the same kernels: the same bits), which
    test_packed_log_prob_against_reference checks against the float64 reference."""
    if backend == "triton" and k > 6:
        pytest.skip("the interpreter is slow")
    value, head = (t.to(device) for t in head_inputs(batch_shape, batch_shape, k, dtype))
    with backends.use(backend):
        got = head_log_prob_and_grad(value, head, op, through_head=True)
        expected = head_log_prob_and_grad(value, head, op, through_head=False)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert got[2].shape == head.shape and got[2].is_contiguous()


@requires_compiled_cpu
def test_packed_head_log_prob_streams_large_gradients():
    """A head gradient too big for the caches (kStreamingOutputBytes, 8 MB: 12337 rows of
    k=17), which the split's packed gradient alone is not, leaves through non-temporal stores
    of whole rows, loc and packed together: the same bits as the split's two gradients."""
    value, head = head_inputs((12500,), (12500,), 17, torch.float32)
    got = head_log_prob_and_grad(value, head, "mvn", through_head=True)
    expected = head_log_prob_and_grad(value, head, "mvn", through_head=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@requires_compiled_cpu
@pytest.mark.parametrize("op", HEAD_OPS)
def test_packed_head_log_prob_writes_the_head_gradient(op):
    """On the compiled CPU ops, forward and backward are packed_head_log_prob's, and the split's
    cat (aten::cat) and the packed op's own backward never run."""
    value, head = head_inputs((64,), (64,), 6, torch.float32)
    with OpRecorder() as recorder:
        head_log_prob_and_grad(value, head, op, through_head=True)
    assert "fusedgauss::packed_head_log_prob" in recorder.names, recorder.names
    assert "fusedgauss::packed_head_log_prob_backward" in recorder.names, recorder.names
    assert not [name for name in recorder.names if name == "aten::cat" or name.endswith("packed_log_prob_backward")]


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_packed_head_log_prob_other_calls(backend, device):
    """The same numbers as the packed op on the head's parts for a value that requires grad
    (its gradient too), a non-contiguous head, a zero-size batch and no grad mode, and for a
    head shared by the batch (which is split)."""
    value, head = (t.to(device) for t in head_inputs((5,), (5,), 3))
    leaf = value.clone().requires_grad_()
    with backends.use(backend):
        got = ops.packed_head_log_prob(leaf, head.requires_grad_(), "softplus", 1e-3)
        expected = ops.mvn_packed_log_prob(value, *head.split([3, 6], -1), "softplus", 1e-3)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        (value_grad,) = torch.autograd.grad(got.sum(), leaf)
        loc, packed = head.detach().split([3, 6], -1)
        reference_leaf = value.clone().requires_grad_()
        reference_log_prob = ops.mvn_packed_log_prob(reference_leaf, loc, packed, "softplus", 1e-3)
        (reference_grad,) = torch.autograd.grad(reference_log_prob.sum(), reference_leaf)
        torch.testing.assert_close(value_grad, reference_grad, rtol=0, atol=0)
        shared = head[0].detach()
        got, expected = (head_log_prob_and_grad(value, shared, "mvn", through) for through in (True, False))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        wide = torch.randn(5, 2 * head.shape[-1], dtype=head.dtype, device=device)[:, ::2]
        got, expected = (head_log_prob_and_grad(value, wide, "mvn", through) for through in (True, False))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        got = head_log_prob_and_grad(value[:0], head[:0], "mvn", True)
        assert got[0].shape == (0,) and got[2].shape == (0, 9)
        with torch.no_grad():
            torch.testing.assert_close(ops.packed_head_log_prob(value, head, "softplus", 1e-3),
                                       ops.mvn_packed_log_prob(value, loc, packed, "softplus", 1e-3), rtol=0, atol=0)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", HEAD_OPS)
@pytest.mark.parametrize("value_batch", [(4,), (1,)], ids=["per_sample", "shared_value"])
def test_packed_head_log_prob_gradcheck(backend, device, op, value_batch):
    squashed, pre_tanh, to_value = HEAD_OPS[op]
    value, head = head_inputs(value_batch, (4,), 3)
    value, head = to_value(value).to(device).requires_grad_(), head.to(device).requires_grad_()
    with backends.use(backend):
        def log_prob(v, h):
            return ops.packed_head_log_prob(v, h, "softplus", 0.1, squashed=squashed, value_is_pre_tanh=pre_tanh,
                                            return_log_det=True)

        assert torch.autograd.gradcheck(log_prob, (value, head))
        assert torch.autograd.gradgradcheck(log_prob, (value, head))


@pytest.mark.parametrize(("namespace", "device"), [p for p in OPCHECK_LIBRARIES if p.id != "triton"])
def test_packed_head_log_prob_opcheck(namespace, device):
    library = getattr(torch.ops, namespace)
    for value_batch, head_batch in (((7,), (7,)), ((4, 3), (4, 3)), ((1, 3), (4, 3)), ((), ())):
        value, head = (t.float().to(device) for t in head_inputs(value_batch, head_batch, 4))
        grad = torch.randn(head_batch, device=device)
        for squashed, pre_tanh in ((False, False), (True, True), (True, False)):
            value_in = value.tanh() if squashed and not pre_tanh else value
            flags = ("softplus", 0.01, squashed, pre_tanh)
            torch.library.opcheck(library.packed_head_log_prob.default,
                                  (value_in.clone().requires_grad_(), head.clone().requires_grad_(), *flags))
            for grad_log_det in (None, torch.randn(head_batch, device=device)):
                for mask in ([True, True], [False, True], [True, False]):
                    args = (grad, grad_log_det, value_in, head, *flags, mask)
                    torch.library.opcheck(library.packed_head_log_prob_backward.default, args)


def test_packed_head_log_prob_errors():
    value, head = head_inputs((7,), (7,), 3)
    with pytest.raises(ValueError, match=re.escape("head must hold k + k(k+1)/2 values per sample for value's event "
                                                   "size k, got value (7, 3) and head (7, 8)")):
        ops.packed_head_log_prob(value, head[..., :8])
    if backends.COMPILED_CPU:
        with pytest.raises(RuntimeError, match=re.escape("head has batch shape [7] but the log-prob has batch shape "
                                                         "[2, 7]")):
            torch.ops.fusedgauss.packed_head_log_prob(value.expand(2, 7, 3), head, "softplus", 0.0, False, False)
        with pytest.raises(RuntimeError, match=re.escape("head must hold k + k(k+1)/2 = 9 values per sample")):
            torch.ops.fusedgauss.packed_head_log_prob_backward(
                torch.ones(7, dtype=torch.float64), None, value, head[..., :8], "softplus", 0.0, False, False,
                [False, True])


# --- the distributions' from_packed ---------------------------------------------------------


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("k", [1, 6, 17])
def test_multivariate_normal_from_packed(backend, device, k):
    """from_packed gives torch.distributions' numbers for the plain-PyTorch head's L: log-prob,
    entropy, rsample (with the same seed), scale_tril, KL, and gradients to packed."""
    import fusedgauss

    loc, packed = torch.randn(9, k, dtype=torch.float64, device=device), random_packed((9,), k).to(device)
    value = torch.randn(9, k, dtype=torch.float64, device=device)
    with backends.use(backend):
        x_ours, x_torch = packed.clone().requires_grad_(), packed.clone().requires_grad_()
        ours = fusedgauss.MultivariateNormal.from_packed(loc, x_ours, "softplus", 1e-3)
        theirs = torch.distributions.MultivariateNormal(loc, scale_tril=plain_torch_scale_tril(x_torch, "softplus", 1e-3))
        torch.testing.assert_close(ours.log_prob(value), theirs.log_prob(value))
        torch.testing.assert_close(ours.entropy(), theirs.entropy())
        loss_ours = (ours.log_prob(value) + ours.entropy()).sum()
        loss_theirs = (theirs.log_prob(value) + theirs.entropy()).sum()
        torch.testing.assert_close(torch.autograd.grad(loss_ours, x_ours)[0], torch.autograd.grad(loss_theirs, x_torch)[0])
        torch.manual_seed(3)
        sample = ours.rsample((2,))
        torch.manual_seed(3)
        torch.testing.assert_close(sample, theirs.rsample((2,)))
        torch.testing.assert_close(ours.scale_tril, theirs.scale_tril)
        torch.testing.assert_close(ours.expand((3, 9)).log_prob(value), theirs.expand((3, 9)).log_prob(value))
        other = fusedgauss.MultivariateNormal(loc.flip(0), scale_tril=theirs.scale_tril.flip(0))
        torch.testing.assert_close(
            torch.distributions.kl_divergence(ours, other),
            torch.distributions.kl_divergence(theirs, torch.distributions.MultivariateNormal(loc.flip(0), scale_tril=theirs.scale_tril.flip(0))),
        )


@pytest.mark.parametrize(("backend", "device"), FUSED_BACKENDS)
def test_from_packed_entropy_is_the_fused_log_det(backend, device):
    """The entropy of a packed Gaussian and its gradient run packed_scale_tril_log_det and its
    backward alone: neither L nor a plain-PyTorch transform of its diagonal."""
    import fusedgauss

    loc = torch.randn(5, 4, device=device)
    packed = random_packed((5,), 4, torch.float32).to(device).requires_grad_()
    namespace = "fusedgauss_triton" if backend == "triton" else "fusedgauss"
    with backends.use(backend), OpRecorder() as recorder:
        entropy = fusedgauss.MultivariateNormal.from_packed(loc, packed, "softplus", 1e-3, validate_args=False).entropy()
        torch.autograd.grad(entropy.sum(), packed)
    assert f"{namespace}::packed_scale_tril_log_det" in recorder.names, recorder.names
    assert f"{namespace}::packed_scale_tril_log_det_backward" in recorder.names, recorder.names
    assert not [name for name in recorder.names if "packed_to_scale_tril" in name or "softplus" in name], recorder.names


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_tanh_multivariate_normal_from_packed(backend, device):
    import fusedgauss

    loc, packed = torch.randn(9, 4, dtype=torch.float64, device=device), random_packed((9,), 4).to(device)
    with backends.use(backend):
        ours = fusedgauss.TanhMultivariateNormal.from_packed(loc, packed, "exp", 0.0, low=-2.0, high=3.0)
        theirs = fusedgauss.TanhMultivariateNormal(loc, scale_tril=plain_torch_scale_tril(packed, "exp"), low=-2.0, high=3.0)
        action, log_prob, pre_tanh = ours.rsample_log_prob(return_pre_tanh=True)
        torch.testing.assert_close(ours.log_prob(action.detach().clone(), pre_tanh=pre_tanh), log_prob)
        torch.testing.assert_close(ours.log_prob(action.detach().clone()), theirs.log_prob(action.detach().clone()))
        torch.testing.assert_close(ours.log_prob(action, pre_tanh=pre_tanh), theirs.log_prob(action, pre_tanh=pre_tanh))


def test_from_packed_errors():
    import fusedgauss

    with pytest.raises(ValueError, match=re.escape("packed must hold k(k+1)/2 values for loc's event size k")):
        fusedgauss.MultivariateNormal.from_packed(torch.zeros(3), torch.randn(3))
    with pytest.raises(ValueError, match="scale_tril must have a positive diagonal"):
        fusedgauss.MultivariateNormal.from_packed(torch.zeros(2), torch.tensor([1.0, 0.5, -1.0]), "none", 0.0,
                                                  validate_args=True)
    with pytest.raises(ValueError, match=re.escape("head must hold k + k(k+1)/2 values per sample (loc, then the "
                                                   "packed scale_tril), got shape (4, 8)")):
        fusedgauss.MultivariateNormal.from_head(torch.randn(4, 8))


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("squashed", [False, True], ids=["mvn", "tanh_mvn"])
def test_from_head_is_from_packed_of_the_split(backend, device, squashed):
    """from_head(head) is from_packed(*head.split(...)): log-prob (of the pre-tanh value and of
    the action, squashed), entropy, mean, samples, and the head's gradient through a PPO-like
    loss of log-prob and entropy."""
    import fusedgauss

    k = 4
    value, head = (t.to(device) for t in head_inputs((9,), (9,), k))
    heads = [head.clone().requires_grad_() for _ in range(2)]
    with backends.use(backend):
        if squashed:
            bounds = {"low": -2.0, "high": 3.0}
            ours = fusedgauss.TanhMultivariateNormal.from_head(heads[0], "softplus", 1e-3, **bounds)
            theirs = fusedgauss.TanhMultivariateNormal.from_packed(*heads[1].split([k, packed_size(k)], -1),
                                                                   "softplus", 1e-3, **bounds)
            action = 0.5 + 2.5 * value.tanh()
            log_probs = [d.log_prob(action, pre_tanh=value) for d in (ours, theirs)]
            torch.testing.assert_close(ours.log_prob(action), theirs.log_prob(action), rtol=0, atol=0)
            entropies = [d.base_dist.entropy() for d in (ours, theirs)]
        else:
            ours = fusedgauss.MultivariateNormal.from_head(heads[0], "softplus", 1e-3)
            theirs = fusedgauss.MultivariateNormal.from_packed(*heads[1].split([k, packed_size(k)], -1), "softplus",
                                                               1e-3)
            log_probs = [d.log_prob(value) for d in (ours, theirs)]
            entropies = [d.entropy() for d in (ours, theirs)]
            torch.testing.assert_close(ours.mean, theirs.mean, rtol=0, atol=0)
        torch.testing.assert_close(log_probs[0], log_probs[1], rtol=0, atol=0)
        torch.testing.assert_close(entropies[0], entropies[1], rtol=0, atol=0)
        grads = [torch.autograd.grad((lp.exp() * 0.3 - 0.01 * e).sum(), h)[0]
                 for lp, e, h in zip(log_probs, entropies, heads)]
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        torch.manual_seed(5)
        sample = ours.sample()
        torch.manual_seed(5)
        torch.testing.assert_close(sample, theirs.sample(), rtol=0, atol=0)
