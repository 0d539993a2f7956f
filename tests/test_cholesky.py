"""The batched small-matrix cholesky op and its backward."""

from __future__ import annotations

import pytest
import torch
from helpers import random_spd, symmetrise

from fusedgauss import backends, ops, reference

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]


def check_against_torch_linalg(backend, k, batch_shape, dtype, device="cpu"):
    """The factor and its gradient equal torch.linalg.cholesky's; the gradient is symmetric."""
    A = random_spd(batch_shape, k).to(dtype).requires_grad_()
    G = torch.randn(batch_shape + (k, k), dtype=dtype)
    with backends.use(backend):
        L = ops.cholesky(A.to(device))
        (grad,) = torch.autograd.grad((L * G.to(device)).sum(), A)
    expected = torch.linalg.cholesky(A)
    (expected_grad,) = torch.autograd.grad((expected * G).sum(), A)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * k)
    torch.testing.assert_close(L.cpu(), expected, **tol)
    scale = 1 + expected_grad.abs().max()
    torch.testing.assert_close(grad / scale, expected_grad / scale, **tol)
    torch.testing.assert_close(grad, grad.mT)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 6, 17, 32, 64])
@pytest.mark.parametrize("batch_shape", [(), (7,), (4, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_against_torch_linalg(backend, k, batch_shape, dtype):
    check_against_torch_linalg(backend, k, batch_shape, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    A = random_spd((2,), 4).requires_grad_()
    with backends.use(backend):
        assert torch.autograd.gradcheck(lambda X: ops.cholesky(symmetrise(X)), (A,))


# 37 matrices: two whole blocks of the CPU kernel's lanes and a part; k = 4 takes its
# compile-time event size, 11 a runtime one; float32 moves whole matrices through the
# transposes (the upper triangle included), float64 the lower triangles alone.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [4, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reads_the_lower_triangle_only_and_writes_zeros_above(backend, k, dtype):
    A = random_spd((37,), k).to(dtype)
    garbage_above = A + torch.randn(37, k, k, dtype=dtype).triu(1)
    with backends.use(backend):
        L = ops.cholesky(garbage_above)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(L, torch.linalg.cholesky(A), **tol)
    assert (L.triu(1) == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [3, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_not_positive_definite_gives_nan_for_that_matrix_only(backend, k, dtype):
    A = random_spd((37,), k).to(dtype)
    failing = [1, 20, 36]
    A[failing] = -A[failing]
    with backends.use(backend):
        L = ops.cholesky(A)
    assert torch.isnan(L[failing]).all()
    others = [b for b in range(37) if b not in failing]
    assert torch.isfinite(L[others]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    A = random_spd((16,), 5).to(dtype)
    with backends.use(backend):
        L = ops.cholesky(A)
    assert L.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(L.double(), reference.cholesky(A.double()), rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_and_non_contiguous(backend):
    with backends.use(backend):
        assert ops.cholesky(torch.empty(0, 3, 3)).shape == (0, 3, 3)
        A = random_spd((5,), 3).mT  # non-contiguous view of a symmetric batch
        assert not A.is_contiguous()
        torch.testing.assert_close(ops.cholesky(A), torch.linalg.cholesky(A))


@requires_compiled_cpu
class TestOpcheck:
    @staticmethod
    def sample_inputs():
        for batch_shape in ((), (3,), (2, 2)):
            A = random_spd(batch_shape, 4).float()
            yield A.requires_grad_()

    def test_cholesky(self):
        for A in self.sample_inputs():
            torch.library.opcheck(torch.ops.fusedgauss.cholesky.default, (A,))

    def test_cholesky_backward(self):
        for A in self.sample_inputs():
            L = torch.linalg.cholesky(A.detach()).contiguous()
            torch.library.opcheck(torch.ops.fusedgauss.cholesky_backward.default, (torch.randn_like(L), L))

    def test_backward_op_against_torch(self):
        A = random_spd((6,), 5)
        L = torch.linalg.cholesky(A)
        G = torch.randn_like(L)
        A_leaf = A.clone().requires_grad_()
        (expected,) = torch.autograd.grad((torch.linalg.cholesky(A_leaf) * G).sum(), A_leaf)
        torch.testing.assert_close(torch.ops.fusedgauss.cholesky_backward(G, L), expected)
