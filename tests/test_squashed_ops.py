"""The diagonal and tanh-squashed ops against the float64 reference and torch.distributions,
on every backend that runs here:

    diag_normal_log_prob, tanh_log_abs_det_jacobian,
    squashed_{diag,tril}_log_prob (from the action and from the pre-tanh value),
    squashed_{diag,tril}_rsample_log_prob
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributions as td
from helpers import outputs_and_grads, random_scale_tril

from fusedgauss import backends, ops, reference

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]
EVENT_SIZES = [1, 2, 3, 6, 17]
BATCH_SHAPES = [(), (7,), (4, 3)]
# Which operands are shared by the whole batch, or broadcast only partly. The parameter is
# scale (diagonal) or scale_tril; the first operand is the value (log-prob ops) or eps (rsample).
LAYOUTS = ["per_sample", "shared_parameter", "shared_loc", "shared_first", "expanded_parameter", "partial"]
LAYOUT_SHAPES = [
    (layout, shape) for layout in LAYOUTS for shape in BATCH_SHAPES if layout != "partial" or len(shape) >= 2
]


@dataclass(frozen=True)
class Case:
    """One op with its reference and its inputs: `first` is the value (log-prob ops) or eps
    (rsample ops), drawn by `draw_first`; the parameter is a diagonal scale or a scale_tril."""

    name: str
    op: Callable
    ref: Callable
    parameter: str  # "scale" or "scale_tril"
    draw_first: Callable[[tuple], torch.Tensor]
    rsample: bool = False

    def inputs(self, layout, batch_shape, k, dtype=torch.float64):
        """The op's tensor arguments in call order, float64 drawn then cast."""
        batch_shape = tuple(batch_shape)
        first_shape, loc_shape, parameter_shape = batch_shape, batch_shape, batch_shape
        if layout == "shared_loc":
            loc_shape = (1,) * len(batch_shape)
        elif layout == "shared_first":
            first_shape = ()
        elif layout in ("shared_parameter", "expanded_parameter"):
            parameter_shape = ()
        elif layout == "partial":
            loc_shape = batch_shape[1:]
            parameter_shape = (batch_shape[0], 1)
        first = self.draw_first(first_shape + (k,))
        loc = torch.randn(loc_shape + (k,), dtype=torch.float64)
        if self.parameter == "scale":
            parameter = torch.rand(parameter_shape + (k,), dtype=torch.float64) + 0.5
        else:
            parameter = random_scale_tril(parameter_shape, k)
        if layout == "expanded_parameter":
            event = parameter.shape
            parameter = parameter.expand(batch_shape + tuple(event))
        args = (loc, parameter, first) if self.rsample else (first, loc, parameter)
        return [t.to(dtype) for t in args]

    def call(self, fn, args):
        return fn(*args)


def _normal(shape):
    return torch.randn(shape, dtype=torch.float64)


def _pre_tanh(shape):
    return 2 * torch.randn(shape, dtype=torch.float64)


def _action(shape):
    # Away from ±1, where atanh is ill-conditioned and float64 finite differences are poor.
    return 0.9 * torch.tanh(torch.randn(shape, dtype=torch.float64))


def _squashed(op, value_is_pre_tanh):
    return lambda value, loc, parameter: op(value, loc, parameter, value_is_pre_tanh)


CASES = [
    Case("diag_normal_log_prob", ops.diag_normal_log_prob, reference.diag_normal_log_prob, "scale", _normal),
    Case(
        "squashed_diag_log_prob[pre_tanh]",
        _squashed(ops.squashed_diag_log_prob, True),
        _squashed(reference.squashed_diag_log_prob, True),
        "scale",
        _pre_tanh,
    ),
    Case(
        "squashed_diag_log_prob[action]",
        _squashed(ops.squashed_diag_log_prob, False),
        _squashed(reference.squashed_diag_log_prob, False),
        "scale",
        _action,
    ),
    Case(
        "squashed_tril_log_prob[pre_tanh]",
        _squashed(ops.squashed_tril_log_prob, True),
        _squashed(reference.log_prob_of(reference.squashed_tril_log_prob), True),
        "scale_tril",
        _pre_tanh,
    ),
    Case(
        "squashed_tril_log_prob[action]",
        _squashed(ops.squashed_tril_log_prob, False),
        _squashed(reference.log_prob_of(reference.squashed_tril_log_prob), False),
        "scale_tril",
        _action,
    ),
    Case(
        "squashed_diag_rsample_log_prob",
        ops.squashed_diag_rsample_log_prob,
        reference.squashed_diag_rsample_log_prob,
        "scale",
        _normal,
        rsample=True,
    ),
    Case(
        "squashed_tril_rsample_log_prob",
        ops.squashed_tril_rsample_log_prob,
        reference.squashed_tril_rsample_log_prob,
        "scale_tril",
        _normal,
        rsample=True,
    ),
]
CASE_IDS = [case.name for case in CASES]


def on_backend(backend, fn):
    def run(*args):
        with backends.use(backend):
            return fn(*args)

    return run


def reference_on_float64(case, inputs):
    return outputs_and_grads(case.ref, [t.double() for t in inputs])


def check_case(run, case, layout, batch_shape, k, dtype):
    """run(case, inputs) -> (outputs, gradients) on the CPU, against the float64 reference at
    the very same inputs: float64 to 1e-9, float32 within what its rounding allows (outputs and
    gradients relative to their largest entry). Shared by the CPU, CUDA and Triton tests."""
    inputs = [t.to(dtype) for t in case.inputs(layout, batch_shape, k)]
    expected, expected_grads = reference_on_float64(case, inputs)
    got, got_grads = run(case, inputs)
    for g, e, t in zip(got_grads, expected_grads, inputs):
        assert g.shape == t.shape
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert g.shape == e.shape and g.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
        else:
            scale = 1 + e.abs().max()
            torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-5 * k + 1e-5)


def run_on(backend):
    def run(case, inputs):
        return outputs_and_grads(on_backend(backend, case.op), inputs)

    return run


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("layout", "batch_shape"), LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("k", EVENT_SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_against_reference(backend, case, layout, batch_shape, k, dtype):
    check_case(run_on(backend), case, layout, batch_shape, k, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k", [1, 4, 17])
def test_diag_normal_is_independent_normal(backend, k):
    value, loc, scale = CASES[0].inputs("per_sample", (9,), k)
    expected = td.Independent(td.Normal(loc, scale), 1).log_prob(value)
    with backends.use(backend):
        torch.testing.assert_close(ops.diag_normal_log_prob(value, loc, scale), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_squashed_log_prob_is_torch_transformed_distribution(backend, parameter):
    """log-prob of tanh(u) equals torch's TransformedDistribution(base, TanhTransform), from the
    action (torch inverts it) and from u (torch's cache hit)."""
    k = 5
    loc = torch.randn(9, k, dtype=torch.float64)
    if parameter == "scale":
        scale = torch.rand(9, k, dtype=torch.float64) + 0.5
        base = td.Independent(td.Normal(loc, scale), 1)
        op = ops.squashed_diag_log_prob
    else:
        scale = random_scale_tril((9,), k)
        base = td.MultivariateNormal(loc, scale_tril=scale)
        op = ops.squashed_tril_log_prob
    dist = td.TransformedDistribution(base, [td.TanhTransform(cache_size=1)])
    u = base.sample()
    action = torch.tanh(u)
    with backends.use(backend):
        torch.testing.assert_close(op(u, loc, scale, True), dist.log_prob(action))
        torch.testing.assert_close(op(action, loc, scale, False), dist.log_prob(action.clone()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tanh_log_abs_det_jacobian(backend):
    u = torch.cat([torch.randn(1000, dtype=torch.float64) * 8, torch.tensor([0.0, 1e-30, -1e-8, 40.0, -400.0])])
    # Each form where float64 evaluates it without cancellation: log1p(-tanh²) near 0, and
    # 2 (log 2 - |u| - log1p(e^{-2|u|})) beyond (where tanh² rounds towards 1).
    a = u.abs()
    expected = torch.where(a < 0.5, torch.log1p(-torch.tanh(u) ** 2), 2 * (math.log(2) - a - torch.log1p(torch.exp(-2 * a))))
    with backends.use(backend):
        torch.testing.assert_close(ops.tanh_log_abs_det_jacobian(u), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            td.TanhTransform().log_abs_det_jacobian(u[:-5], torch.tanh(u[:-5])),
            ops.tanh_log_abs_det_jacobian(u[:-5]),
        )
        got32 = ops.tanh_log_abs_det_jacobian(u.float())
        assert torch.isfinite(got32).all()
        torch.testing.assert_close(got32.double(), expected, rtol=1e-6, atol=1e-6)
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ops.tanh_log_abs_det_jacobian, (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_parameter", "partial"])
def test_gradcheck(backend, case, layout):
    """The fused backward ops against finite differences, in float64."""
    inputs = [t.requires_grad_() for t in case.inputs(layout, (2, 3), 3)]
    fn = case.op
    if case.parameter == "scale_tril":
        position = 1  # only the lower triangle is read
        fn = lambda *args: case.op(*(a.tril() if i == position else a for i, a in enumerate(args)))  # noqa: E731
    with backends.use(backend):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES[5:], ids=CASE_IDS[5:])
@pytest.mark.parametrize("used", ["action", "pre_tanh", "log_prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rsample_with_one_output_used(backend, case, used, dtype):
    """Outputs nobody differentiates reach the backward op as None, and count as zero (over
    several of the CPU kernels' blocks of rows, whose zeros are filled once)."""
    index = ("action", "pre_tanh", "log_prob").index(used)
    batch_shape, k = ((6,), 4) if dtype == torch.float64 else ((1000,), 6)
    inputs = case.inputs("per_sample", batch_shape, k, dtype)
    fn = lambda *args: case.op(*args)[index]  # noqa: E731
    ref = lambda *args: case.ref(*args)[index]  # noqa: E731
    expected, expected_grads = outputs_and_grads(ref, [t.double() for t in inputs])
    got, got_grads = outputs_and_grads(on_backend(backend, fn), inputs)
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for g, e in zip(got + got_grads, expected + expected_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_half_precision_in_float32(backend, dtype, case):
    """Half inputs are computed in float32 and returned in their dtype."""
    inputs = [t.to(dtype) for t in case.inputs("per_sample", (64,), 6)]
    expected, expected_grads = reference_on_float64(case, inputs)
    got, got_grads = outputs_and_grads(on_backend(backend, case.op), inputs)
    eps = torch.finfo(dtype).eps
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=4 * eps, atol=8 * eps * (1 + e.abs().max().item()))
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=8 * eps, atol=8 * eps * (1 + e.abs().max().item()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_contiguous_inputs(backend, case):
    inputs = case.inputs("per_sample", (9,), 5)
    strided = [torch.stack([t, t], dim=-1)[..., 0] if t.dim() == 2 else t.mT.contiguous().mT for t in inputs]
    assert not any(t.is_contiguous() for t in strided)
    expected, expected_grads = outputs_and_grads(case.ref, inputs)
    got, got_grads = outputs_and_grads(on_backend(backend, case.op), strided)
    for g, e in zip(got + got_grads, expected + expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["per_sample", "shared_parameter", "expanded_parameter"])
def test_zero_size_batch(backend, case, layout):
    inputs = case.inputs(layout, (0,), 4)
    got, grads = outputs_and_grads(on_backend(backend, case.op), inputs)
    assert got[-1].shape == (0,)
    for g, t in zip(grads, inputs):
        assert g.shape == t.shape
        assert torch.all(g == 0)


# The diagonal cases whose value can be drawn from the scale (a pre-tanh value, not an action).
DIAG_SCALE_CASES = [case for case in CASES if case.parameter == "scale" and not case.name.endswith("[action]")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", DIAG_SCALE_CASES, ids=[case.name for case in DIAG_SCALE_CASES])
@pytest.mark.parametrize("k", [6, 8, 33, 150])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_log_scale_sum_at_any_magnitude(backend, case, k, dtype):
    """sum_i log s_i of a per-sample scale over few entries (float rows of 6 and 8 are reduced
    in loops over rows) and many (more than the 32 a log product takes between
    renormalisations, and more than float32 holds a product of mantissas for) and magnitudes
    (1e-30 to 1e30, and a subnormal one), with
    the value drawn at that scale so that the log-prob is mostly that sum; a row with two
    negative entries is NaN (a product of entries, not of their logs, would make it finite)."""
    tiny = torch.finfo(dtype).tiny
    scale = 10 ** (60 * torch.rand(9, k, dtype=torch.float64) - 30)
    scale[3, 5] = tiny / 64  # subnormal
    scale[4, :] = 1e30
    scale[5, :] = 1e-30
    scale[7, :] = 1.99  # mantissas near 2: their product overflows float32 past 128 entries
    loc = torch.randn(9, k, dtype=torch.float64)
    noise = torch.randn(9, k, dtype=torch.float64)
    first = noise if case.rsample else loc + scale * noise
    scale[6, 2] = scale[6, k - 1] = -1.0
    args = [t.to(dtype) for t in ((loc, scale, first) if case.rsample else (first, loc, scale))]
    with torch.no_grad():
        got = on_backend(backend, case.op)(*args)
        expected = case.ref(*[t.double() for t in args])
    got, expected = (got[-1], expected[-1]) if case.rsample else (got, expected)
    assert torch.isnan(got[6]) and torch.isnan(expected[6])
    finite = torch.arange(9) != 6
    assert torch.isfinite(expected[finite]).all()
    tolerance = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-3)
    torch.testing.assert_close(got[finite].double(), expected[finite], **tolerance)


@requires_compiled_cpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shared_gradient_is_deterministic(case):
    """A shared parameter's gradient is reduced in fixed chunks: the same bits at any thread
    count."""
    inputs = [t.float() for t in case.inputs("shared_parameter", (20000,), 6)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            with backends.use("cpu"):
                _, grads = outputs_and_grads(case.op, inputs)
            results.append(grads)
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], grads))


# --- saturation -----------------------------------------------------------------------------


SATURATED = torch.tensor([-20.0, -15.0, -9.0, -3.0, 0.0, 2.0, 9.5, 15.0, 20.0], dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_saturated_pre_tanh_log_prob(backend, parameter):
    """Pre-tanh values up to |u| = 20 in float32, where tanh(u) rounds to ±1: the log-prob from
    u is finite and matches the float64 reference, and so are its gradients."""
    k = SATURATED.numel()
    u = SATURATED.expand(4, k).clone()
    loc = u + 0.3 * torch.randn(4, k, dtype=torch.float64)
    if parameter == "scale":
        scale, op, ref = torch.rand(4, k, dtype=torch.float64) + 0.5, ops.squashed_diag_log_prob, reference.squashed_diag_log_prob
    else:
        scale, op, ref = random_scale_tril((4,), k), ops.squashed_tril_log_prob, reference.log_prob_of(reference.squashed_tril_log_prob)
    inputs32 = [t.float() for t in (u, loc, scale)]
    expected, expected_grads = outputs_and_grads(lambda *a: ref(*a, True), [t.double() for t in inputs32])
    got, got_grads = outputs_and_grads(on_backend(backend, lambda *a: op(*a, True)), inputs32)
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-4)
    for g, e in zip(got_grads, expected_grads):
        scale_ = 1 + e.abs().max()
        torch.testing.assert_close(g.double() / scale_, e / scale_, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_saturated_rsample_log_prob(backend, parameter):
    """rsample_log_prob with u = loc + noise reaching |u| = 20 in float32: finite outputs and
    gradients, equal to the float64 reference (which computes tanh and its Jacobian in the
    stable form too)."""
    k = SATURATED.numel()
    loc = SATURATED.expand(4, k).clone()
    eps = torch.randn(4, k, dtype=torch.float64)
    if parameter == "scale":
        scale, op, ref = 0.01 + 0.1 * torch.rand(4, k, dtype=torch.float64), ops.squashed_diag_rsample_log_prob, reference.squashed_diag_rsample_log_prob
    else:
        scale, op, ref = 0.05 * random_scale_tril((4,), k), ops.squashed_tril_rsample_log_prob, reference.squashed_tril_rsample_log_prob
    inputs32 = [t.float() for t in (loc, scale, eps)]
    expected, expected_grads = outputs_and_grads(ref, [t.double() for t in inputs32])
    got, got_grads = outputs_and_grads(on_backend(backend, op), inputs32)
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-4)
    for g, e in zip(got_grads, expected_grads):
        assert torch.isfinite(g).all()
        scale_ = 1 + e.abs().max()
        torch.testing.assert_close(g.double() / scale_, e / scale_, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parameter", ["scale", "scale_tril"])
def test_action_at_the_bounds_is_clamped(backend, dtype, parameter):
    check_action_at_the_bounds(backend, dtype, parameter)


def check_action_at_the_bounds(backend, dtype, parameter, device="cpu"):
    """An action at exactly ±1 without its pre-tanh value: a finite log-prob, the one at
    u = ±atanh(1 - ε) with ε the dtype's epsilon (the documented clamp)."""
    k = 3
    action = torch.tensor([[1.0, -1.0, 0.5]], dtype=dtype)
    loc = torch.zeros(1, k, dtype=dtype)
    eps = torch.finfo(dtype).eps
    u = torch.atanh(torch.tensor([[1 - eps, -(1 - eps), 0.5]], dtype=torch.float64))
    if parameter == "scale":
        scale, op, ref = torch.ones(1, k, dtype=dtype), ops.squashed_diag_log_prob, reference.squashed_diag_log_prob
    else:
        scale, op, ref = torch.eye(k, dtype=dtype)[None], ops.squashed_tril_log_prob, reference.log_prob_of(reference.squashed_tril_log_prob)
    with backends.use(backend):
        got = op(action.to(device), loc.to(device), scale.to(device), False).cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref(u, loc.double(), scale.double(), True), rtol=1e-5, atol=1e-5)


# --- op registration ------------------------------------------------------------------------


def opcheck_cases(device="cpu"):
    """(name, args) of every new op and backward op for opcheck, per-sample and shared."""
    for layout in ("per_sample", "shared_parameter"):
        diag = [t.float().to(device) for t in CASES[0].inputs(layout, (2, 3), 3)]
        tril = [t.float().to(device) for t in CASES[3].inputs(layout, (2, 3), 3)]
        grad = torch.randn(2, 3, device=device)
        value, loc, scale = diag
        yield "diag_normal_log_prob", (value, loc.requires_grad_(), scale.requires_grad_())
        yield "diag_normal_log_prob_backward", (grad, value, loc.detach(), scale.detach(), [True, True, True])
        for pre_tanh in (True, False):
            v = value if pre_tanh else torch.tanh(value)
            yield "squashed_diag_log_prob", (v, loc, scale, pre_tanh)
            yield "squashed_diag_log_prob_backward", (grad, v, loc.detach(), scale.detach(), pre_tanh, [False, True, True])
            t_value, t_loc, L = tril
            tv = t_value if pre_tanh else torch.tanh(t_value)
            yield "squashed_tril_log_prob", (tv, t_loc.requires_grad_(), L.requires_grad_(), pre_tanh)
            for grad_log_det in (None, torch.randn(2, 3, device=device)):
                yield "squashed_tril_log_prob_backward", (grad, grad_log_det, tv, t_loc.detach(), L.detach(), pre_tanh,
                                                          [True, True, True])
        eps = torch.randn(2, 3, 3, device=device)
        rows = torch.randn(2, 3, 3, device=device)
        yield "squashed_diag_rsample_log_prob", (loc, scale, eps)
        yield "squashed_tril_rsample_log_prob", (tril[1], tril[2], eps)
        for grads in ((rows, rows, grad), (None, None, grad), (rows, None, None)):
            yield "squashed_diag_rsample_log_prob_backward", (*grads, loc.detach(), scale.detach(), eps, [True, True, True])
            yield "squashed_tril_rsample_log_prob_backward", (*grads, tril[1].detach(), tril[2].detach(), eps, [True, True, False])
    u = torch.randn(4, 5, device=device)
    yield "tanh_log_abs_det_jacobian", (u.requires_grad_(),)
    yield "tanh_log_abs_det_jacobian_backward", (torch.randn(4, 5, device=device), u.detach())


@requires_compiled_cpu
class TestOpcheck:
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch."""

    @staticmethod
    def sample_inputs():
        return opcheck_cases()

    def test_ops(self):
        names = set()
        for name, args in self.sample_inputs():
            torch.library.opcheck(getattr(torch.ops.fusedgauss, name).default, args)
            names.add(name)
        assert len(names) == 12  # six ops and their backward ops
