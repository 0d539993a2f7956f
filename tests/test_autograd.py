"""The ops' autograd formulas, called on the ops themselves: C++ for the compiled ops
(csrc/autograd/autograd.cpp), Python for the Triton ones (ops.register_autograd).

For every op and every output: the gradients of that output alone, the others unused (their
gradients then reach the backward op as absent, not as zeros), against autograd through the
float64 reference; gradients only for the inputs that require them; second derivatives (a
backward pass with create_graph=True, which runs fusedgauss.ops.differentiable_backward)
against autograd's through the reference, and with gradgradcheck; and differentiating a
backward op itself raises, naming it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_GPU, TRITON_DEVICE, requires_compiled_cpu
from helpers import hessian_vector_products, symmetrise

from fusedgauss import backends, ops, reference, testing

K = 3
BATCH = (2, 3)


def sample_inputs(name: str) -> list:
    """Fresh float64 arguments of op `name`: its tensors (per-sample), then its other arguments."""
    return testing.op_arguments(name, BATCH, K)


LIBRARIES = [
    pytest.param("fusedgauss", "cpu", marks=requires_compiled_cpu, id="cpu"),
    pytest.param("fusedgauss", "cuda", id="cuda", marks=pytest.mark.skipif(
        not (ON_GPU and backends.COMPILED_CUDA), reason="needs a GPU and the CUDA kernels")),
    pytest.param("fusedgauss_triton", TRITON_DEVICE, id="triton", marks=pytest.mark.skipif(
        backends.unavailable_reason("triton", TRITON_DEVICE) is not None, reason="the triton backend cannot run here")),
]


def op_of(namespace: str, name: str):
    if namespace == "fusedgauss_triton":
        from fusedgauss import triton_ops  # noqa: F401  (registers the Triton ops)
    ops_of_namespace = getattr(torch.ops, namespace)
    if not hasattr(ops_of_namespace, name):
        pytest.skip(f"{namespace} has no {name}")
    return getattr(ops_of_namespace, name)


def on(device: str, args: list, dtype=torch.float32, requires_grad=True) -> list:
    """args with every tensor moved to device and dtype, as a leaf that requires grad."""
    return [a.to(device, dtype).requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("namespace, device", LIBRARIES)
@pytest.mark.parametrize("name", ops.OPS)
class TestAutograd:
    def test_each_output_alone(self, namespace, device, name):
        op = op_of(namespace, name)
        args = sample_inputs(name)
        expected_outputs = testing.as_tuple(getattr(reference, name)(*on("cpu", args, torch.float64)))
        for index in range(len(expected_outputs)):
            weights = torch.randn(expected_outputs[index].shape, dtype=torch.float64)
            ours, theirs = on(device, args), on("cpu", args, torch.float64)
            ours_tensors = [a for a in ours if isinstance(a, torch.Tensor)]
            theirs_tensors = [a for a in theirs if isinstance(a, torch.Tensor)]
            # An output may not depend on every input (log_det on value and loc): zeros there.
            got = torch.autograd.grad((testing.as_tuple(op(*ours))[index].double() * weights.to(device)).sum(),
                                      ours_tensors, allow_unused=True, materialize_grads=True)
            want = torch.autograd.grad((testing.as_tuple(getattr(reference, name)(*theirs))[index] * weights).sum(),
                                       theirs_tensors, allow_unused=True, materialize_grads=True)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{name} output {index}: {m}")

    def test_gradients_only_where_required(self, namespace, device, name):
        op = op_of(namespace, name)
        args = on(device, sample_inputs(name), requires_grad=False)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        for wanted in tensors:
            args[wanted].requires_grad_()
            result = testing.as_tuple(op(*args))
            differentiable = [o for o in result if o.requires_grad]
            assert differentiable, f"{name}: no output requires grad when input {wanted} does"
            total = sum(o.sum() for o in differentiable)
            total.backward()
            assert args[wanted].grad is not None and torch.isfinite(args[wanted].grad).all()
            assert all(args[i].grad is None for i in tensors if i != wanted)
            args[wanted].grad = None
            args[wanted].requires_grad_(False)

    def test_second_derivative(self, namespace, device, name):
        """A Hessian-vector product: the gradient of <∇ loss, v>, loss a random weighting of
        every output."""
        op = op_of(namespace, name)
        args = sample_inputs(name)
        expected_outputs = testing.as_tuple(getattr(reference, name)(*on("cpu", args, torch.float64)))
        weights = [torch.randn(o.shape, dtype=torch.float64) for o in expected_outputs]
        vectors = [torch.randn(a.shape, dtype=torch.float64) for a in args if isinstance(a, torch.Tensor)]

        def hessian_times_vectors(fn, args, device):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            loss = sum((o.double() * w.to(device)).sum() for o, w in zip(testing.as_tuple(fn(*args)), weights))
            return hessian_vector_products(loss, tensors, vectors)

        got = hessian_times_vectors(op, on(device, args), device)
        want = hessian_times_vectors(getattr(reference, name), on("cpu", args, torch.float64), "cpu")
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu().double(), w, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")


@requires_compiled_cpu
@pytest.mark.parametrize("name", ops.OPS)
def test_gradgradcheck(name):
    """Second derivatives of the compiled ops in float64 against finite differences of their
    fused first-order gradients (Triton's float64 is too slow in the interpreter)."""
    op = op_of("fusedgauss", name)
    args = on("cpu", sample_inputs(name), torch.float64)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    symmetric = {"cholesky": 0, "mvn_cov_log_prob": 2}.get(name)

    def fn(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            # A symmetric matrix operand is read through its lower triangle and given a
            # symmetric gradient: differentiate it at symmetric inputs only.
            full[i] = symmetrise(t) if i == symmetric else t
        return op(*full)

    assert torch.autograd.gradgradcheck(fn, [args[i] for i in positions])


@pytest.mark.parametrize("namespace, device", LIBRARIES)
def test_differentiating_a_backward_op_raises(namespace, device):
    """A backward op called directly is first-order (every one has the same formula)."""
    name = "diag_normal_log_prob"
    backward_op = op_of(namespace, name + "_backward")
    value, loc, scale = on(device, sample_inputs(name))
    gradients = backward_op(torch.rand(BATCH, device=device), value, loc, scale, [True, True, True])
    with pytest.raises(NotImplementedError, match=f"second derivative through {name}_backward is not implemented"):
        sum(g.sum() for g in gradients).backward()
