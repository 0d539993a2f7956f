"""The log_det output of the log-prob ops whose Cholesky factor is given (mvn_tril_log_prob,
squashed_tril_log_prob and their packed forms): Σᵢ log Lᵢᵢ per sample beside the log-prob,
which the kernel computes anyway, and its upstream gradient in their backward ops, on every
backend that runs here: against the float64 reference, gradients of both outputs included;
gradcheck; the shape error. Then the distributions' entropy built from it (PPO's loss: an
entropy beside a log-prob runs no op of its own), and the cases where it is not."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import OpRecorder, outputs_and_grads, plain_torch_scale_tril, random_scale_tril

import fusedgauss
from fusedgauss import backends, ops, reference

from conftest import BACKENDS, FUSED_BACKENDS, requires_compiled_cpu

# (value, loc, factor) batch shapes: per-sample; a factor shared by the batch (its gradient
# reduced in the kernel, the log-det's part added after it); the same factor expanded to the
# batch (read shared, its gradient per sample); a shared loc; a partial broadcast.
LAYOUTS = {
    "per_sample": ((7,), (7,), (7,)),
    "shared_factor": ((4, 3), (4, 3), ()),
    "expanded_factor": ((4, 3), (4, 3), "expanded"),
    "shared_loc": ((5,), (), (5,)),
    "partial": ((4, 1), (1, 3), (4, 3)),
}
PACKED = ("softplus", 1e-3)


def _squash(v, pre_tanh):
    return v if pre_tanh else v.tanh()


# op -> (factor kind, the op's public function (value, loc, factor, **kw), its float64 oracle
# (value, loc, factor) -> (log_prob, log_det)). A packed op's oracle is the scale_tril op's
# reference on the plain-PyTorch head's L.
OPS = {
    "mvn_tril": ("scale_tril", lambda v, m, L, **kw: ops.mvn_tril_log_prob(v, m, L, **kw),
                 reference.mvn_tril_log_prob),
    **{
        f"squashed_tril_{source}": (
            "scale_tril",
            lambda v, m, L, pre_tanh=pre_tanh, **kw: ops.squashed_tril_log_prob(_squash(v, pre_tanh), m, L, pre_tanh,
                                                                                 **kw),
            lambda v, m, L, pre_tanh=pre_tanh: reference.squashed_tril_log_prob(_squash(v, pre_tanh), m, L, pre_tanh),
        )
        for source, pre_tanh in (("pre_tanh", True), ("action", False))
    },
    "mvn_packed": ("packed", lambda v, m, p, **kw: ops.mvn_packed_log_prob(v, m, p, *PACKED, **kw),
                   lambda v, m, p: reference.mvn_tril_log_prob(v, m, plain_torch_scale_tril(p, *PACKED))),
    "squashed_packed": (
        "packed", lambda v, m, p, **kw: ops.squashed_packed_log_prob(v, m, p, *PACKED, True, **kw),
        lambda v, m, p: reference.squashed_tril_log_prob(v, m, plain_torch_scale_tril(p, *PACKED), True),
    ),
}


def make_inputs(layout, k, factor_kind, dtype=torch.float64):
    """value, loc and a scale_tril or packed factor with the layout's batch shapes."""
    value_shape, loc_shape, factor_shape = LAYOUTS[layout]
    expanded = factor_shape == "expanded"
    if expanded:
        factor_shape = ()
    value = torch.randn(value_shape + (k,), dtype=torch.float64)
    loc = 0.3 * torch.randn(loc_shape + (k,), dtype=torch.float64)
    if factor_kind == "scale_tril":
        factor = random_scale_tril(factor_shape, k)
    else:
        factor = 0.5 * torch.randn(factor_shape + (k * (k + 1) // 2,), dtype=torch.float64)
    tensors = [t.to(dtype) for t in (value, loc, factor)]
    if expanded:
        tensors[2] = tensors[2].expand(value_shape + tensors[2].shape)
    return tensors


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [3, 6, 17])
def test_log_det_output(backend, device, op, layout, k):
    """Both outputs, and the gradients of a random weighting of both, against the float64
    reference. Per sample the log-det's gradient joins the log-prob's inside the backward
    kernel; for a factor shared by the batch it is added from the sum of its upstream
    gradient."""
    if backend == "triton" and k > 6:
        pytest.skip("the interpreter is slow: the Triton kernels run the smaller sizes")
    factor_kind, fused, oracle = OPS[op]
    inputs = make_inputs(layout, k, factor_kind, torch.float32)
    expected, expected_grads = outputs_and_grads(oracle, [t.double() for t in inputs], seed=3)
    with backends.use(backend):
        got, got_grads = outputs_and_grads(lambda *a: fused(*a, return_log_det=True), [t.to(device) for t in inputs],
                                           seed=3)
    for g, e in zip([*got, *got_grads], [*expected, *expected_grads]):
        assert g.shape == e.shape and g.dtype == torch.float32
        scale = 1 + e.abs().max()
        torch.testing.assert_close(g.cpu().double() / scale, e / scale, rtol=0, atol=1e-5 * k + 1e-5)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("op", ["mvn_tril", "squashed_tril_action", "mvn_packed"])
@pytest.mark.parametrize("layout", ["per_sample", "shared_factor"])
def test_log_det_gradcheck(backend, device, op, layout):
    factor_kind, fused, _ = OPS[op]
    inputs = [t.to(device).requires_grad_() for t in make_inputs(layout, 3, factor_kind)]
    with backends.use(backend):
        assert torch.autograd.gradcheck(lambda *a: fused(*a, return_log_det=True), inputs)


@requires_compiled_cpu
def test_backward_op_checks_the_log_det_gradient_shape():
    value, loc, L = make_inputs("per_sample", 3, "scale_tril")
    for op in (torch.ops.fusedgauss.mvn_tril_log_prob_backward, torch.ops.fusedgauss.squashed_tril_log_prob_backward):
        flags = () if op is torch.ops.fusedgauss.mvn_tril_log_prob_backward else (True,)
        with pytest.raises(RuntimeError, match=re.escape("grad_log_det has shape [3] but log_det has shape [7]")):
            op(torch.ones(7, dtype=torch.float64), torch.ones(3, dtype=torch.float64), value, loc, L, *flags,
               [True, True, True])


# --- the distributions' entropy -------------------------------------------------------------

# Policy heads: a full covariance from a network output, as scale_tril (the drop-in's
# plain-PyTorch head), packed (from_packed) or a covariance L Lᵀ, tanh-squashed or not.
HEADS = ["scale_tril", "tanh_scale_tril", "packed", "tanh_packed", "tanh_covariance"]


def _fused_distribution(head, loc, parameter):
    if head == "scale_tril":
        return fusedgauss.MultivariateNormal(loc, scale_tril=parameter)
    if head == "tanh_scale_tril":
        return fusedgauss.TanhMultivariateNormal(loc, scale_tril=parameter)
    if head == "tanh_covariance":
        return fusedgauss.TanhMultivariateNormal(loc, covariance_matrix=parameter)
    cls = fusedgauss.TanhMultivariateNormal if head == "tanh_packed" else fusedgauss.MultivariateNormal
    return cls.from_packed(loc, parameter, *PACKED)


def _head_outputs(head, network_output, k):
    """loc and the head's matrix parameter, out of a network output's graph."""
    loc, packed = network_output[..., :k], network_output[..., k:]
    if head.endswith("packed"):
        return loc, packed
    L = plain_torch_scale_tril(packed, *PACKED)
    return loc, (L @ L.mT if head == "tanh_covariance" else L)


def _own_entropy_op(head, namespace):
    """The op that shows an entropy computed on its own: the fused packed log-det, or the log of
    L's diagonal in PyTorch's entropy."""
    return f"{namespace}::packed_scale_tril_log_det" if head.endswith("packed") else "aten::log"


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("head", HEADS)
def test_entropy_after_log_prob_shares_its_pass(backend, device, head):
    """PPO's loss: an entropy after a log-prob of a policy head's outputs (out of a network's
    graph) is built from the log-prob op's log_det, so no op of its own runs, either way; the
    loss and its gradients are torch.distributions' (on the plain-PyTorch head)."""
    k = 4
    network_output = torch.randn(6, k + k * (k + 1) // 2, dtype=torch.float64, device=device, requires_grad=True)
    pre_tanh = torch.randn(6, k, dtype=torch.float64, device=device)
    advantages = torch.randn(6, dtype=torch.float64, device=device)
    squashed = head.startswith("tanh")

    def loss(log_prob, base):
        return -(log_prob * advantages).mean() - 0.01 * base.entropy().mean()

    namespace = "fusedgauss_triton" if backend == "triton" else "fusedgauss"
    with backends.use(backend):
        loc, parameter = _head_outputs(head, network_output, k)
        with OpRecorder() as recorder:
            dist = _fused_distribution(head, loc, parameter)
            if squashed:
                ours = loss(dist.log_prob(pre_tanh.tanh(), pre_tanh=pre_tanh), dist.base_dist)
            else:
                ours = loss(dist.log_prob(pre_tanh), dist)
            ours_grad, = torch.autograd.grad(ours, network_output)
    loc, packed = network_output[:, :k], network_output[:, k:]
    base = torch.distributions.MultivariateNormal(loc, scale_tril=plain_torch_scale_tril(packed, *PACKED))
    jacobian = torch.distributions.TanhTransform().log_abs_det_jacobian(pre_tanh, pre_tanh.tanh()).sum(-1)
    theirs = loss(base.log_prob(pre_tanh) - (jacobian if squashed else 0), base)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, torch.autograd.grad(theirs, network_output)[0])
    if backend != "torch":
        assert _own_entropy_op(head, namespace) not in recorder.names, recorder.names


@pytest.mark.parametrize(("backend", "device"), FUSED_BACKENDS)
@pytest.mark.parametrize("head", ["scale_tril", "tanh_scale_tril", "packed"])
def test_entropy_keeps_its_own_pass_where_sharing_would_surprise(backend, device, head):
    """The entropy is computed on its own: for leaf parameters (an entropy-only backward must
    not pass through the log-prob, and must leave loc without a gradient, as PyTorch does),
    for a log-prob of another shape (a sample dimension), and in another grad mode than the
    log-prob's (no graph from under no_grad)."""
    k = 3
    namespace = "fusedgauss_triton" if backend == "triton" else "fusedgauss"
    own_op = _own_entropy_op(head, namespace)
    value = torch.randn(5, k, device=device).tanh()  # an action, for the squashed heads too

    def base_of(dist):
        return dist.base_dist if head.startswith("tanh") else dist

    with backends.use(backend):
        network_output = torch.randn(5, k + k * (k + 1) // 2, device=device)
        loc, parameter = (t.detach().requires_grad_() for t in _head_outputs(head, network_output, k))
        dist = _fused_distribution(head, loc, parameter)
        dist.log_prob(value)
        with OpRecorder() as recorder:
            entropy = base_of(dist).entropy()
        assert own_op in recorder.names
        entropy.sum().backward()
        assert loc.grad is None and parameter.grad is not None

        network_output.requires_grad_()
        dist = _fused_distribution(head, *_head_outputs(head, network_output * 1.0, k))
        dist.log_prob(torch.randn(2, 5, k, device=device).tanh())
        with OpRecorder() as recorder:
            base_of(dist).entropy()
        assert own_op in recorder.names
        with torch.no_grad():
            dist.log_prob(value)
        with OpRecorder() as recorder:
            entropy = base_of(dist).entropy()
        assert own_op in recorder.names and entropy.requires_grad
        dist.log_prob(value)
        with torch.no_grad(), OpRecorder() as recorder:
            entropy = base_of(dist).entropy()
        assert own_op in recorder.names and not entropy.requires_grad
