"""Bad input gets a clear error that names the problem, and no partial result."""

from __future__ import annotations

import pytest
import torch
from helpers import random_scale_tril, random_spd

import fusedgauss
from fusedgauss import backends, ops, validation

from conftest import requires_compiled_cpu

CPU_BACKENDS = [pytest.param("cpu", marks=requires_compiled_cpu), "torch"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", [ops.mvn_tril_log_prob, ops.mvn_cov_log_prob])
class TestOpErrors:
    def test_mismatched_event_sizes(self, backend, op):
        with backends.use(backend), pytest.raises(ValueError, match="event sizes differ: value has 3, loc has 4"):
            op(torch.randn(3), torch.randn(4), torch.eye(3))

    def test_non_square_matrix(self, backend, op):
        with backends.use(backend), pytest.raises(ValueError, match=r"square matrices .*got shape \(3, 4\)"):
            op(torch.randn(3), torch.randn(3), torch.randn(3, 4))

    def test_shapes_that_do_not_broadcast(self, backend, op):
        with backends.use(backend), pytest.raises(ValueError, match=r"batch shapes do not broadcast: value \(5,\), loc \(4,\)"):
            op(torch.randn(5, 2), torch.randn(4, 2), torch.eye(2))

    def test_integer_dtype(self, backend, op):
        with backends.use(backend), pytest.raises(TypeError, match="value must be a floating-point tensor, got torch.int64"):
            op(torch.ones(2, dtype=torch.long), torch.randn(2), torch.eye(2))

    def test_mixed_devices(self, backend, op):
        with backends.use(backend), pytest.raises(ValueError, match="all tensors must be on one device.*loc on meta"):
            op(torch.randn(2), torch.randn(2, device="meta"), torch.eye(2))

    def test_mixed_float_dtypes_are_promoted(self, backend, op):
        with backends.use(backend):
            out = op(torch.randn(2), torch.randn(2, dtype=torch.float64), torch.eye(2))
        assert out.dtype == torch.float64


class TestDistributionErrors:
    def test_non_positive_scale_tril_diagonal(self):
        L = random_scale_tril((2, 3), 3)
        L[1, 2, 1, 1] = -0.5
        with pytest.raises(ValueError, match=r"positive diagonal, but at batch index \(1, 2\)"):
            fusedgauss.MultivariateNormal(torch.zeros(3, dtype=torch.float64), scale_tril=L, validate_args=True)

    def test_scale_tril_not_lower_triangular(self):
        L = random_scale_tril((4,), 3)
        L[3, 0, 2] = 1.0
        with pytest.raises(ValueError, match=r"lower-triangular, but at batch index \(3,\)"):
            fusedgauss.MultivariateNormal(torch.zeros(3, dtype=torch.float64), scale_tril=L, validate_args=True)

    def test_covariance_not_positive_definite_names_first_index(self):
        cov = random_spd((5,), 3)
        cov[3] = -cov[3]
        cov[4] = -cov[4]
        with pytest.raises(ValueError, match=r"covariance_matrix is not positive-definite at batch index \(3,\): the leading minor of order 1"):
            fusedgauss.MultivariateNormal(torch.zeros(3, dtype=torch.float64), covariance_matrix=cov, validate_args=True)

    def test_covariance_not_symmetric(self):
        cov = random_spd((2,), 3)
        cov[1, 0, 2] += 1.0
        with pytest.raises(ValueError, match=r"covariance_matrix is not symmetric at batch index \(1,\)"):
            fusedgauss.MultivariateNormal(torch.zeros(3, dtype=torch.float64), covariance_matrix=cov, validate_args=True)

    def test_precision_not_positive_definite(self):
        with pytest.raises(ValueError, match="precision_matrix is not positive-definite"):
            fusedgauss.MultivariateNormal(torch.zeros(2), precision_matrix=-torch.eye(2), validate_args=True)

    def test_loc_with_nan(self):
        with pytest.raises(ValueError, match="loc contains NaN"):
            fusedgauss.MultivariateNormal(torch.tensor([0.0, float("nan")]), scale_tril=torch.eye(2), validate_args=True)

    def test_event_size_mismatch(self):
        with pytest.raises(ValueError, match=r"scale_tril must have shape \(\*, 3, 3\)"):
            fusedgauss.MultivariateNormal(torch.zeros(3), scale_tril=torch.eye(2))

    def test_exactly_one_matrix(self):
        with pytest.raises(ValueError, match="Exactly one of"):
            fusedgauss.MultivariateNormal(torch.zeros(2), scale_tril=torch.eye(2), covariance_matrix=torch.eye(2))

    def test_sample_of_wrong_shape(self):
        dist = fusedgauss.MultivariateNormal(torch.zeros(3), scale_tril=torch.eye(3), validate_args=True)
        with pytest.raises(ValueError):
            dist.log_prob(torch.zeros(2))

    def test_no_validation_no_error(self):
        """With validate_args off nothing is checked (nothing syncs): the bad sample is NaN."""
        cov = random_spd((3,), 2)
        cov[1] = -cov[1]
        dist = fusedgauss.MultivariateNormal(torch.zeros(2, dtype=torch.float64), covariance_matrix=cov, validate_args=False)
        lp = dist.log_prob(torch.zeros(3, 2, dtype=torch.float64))
        assert torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2]]).all()


class TestBackendErrors:
    def test_forcing_triton_on_cpu_tensors_without_the_interpreter(self, monkeypatch):
        monkeypatch.setattr(backends, "TRITON_INTERPRETING", False)
        with backends.use("triton"), pytest.raises(backends.BackendUnavailableError, match="'triton' was forced but cannot run: .*interpreter"):
            ops.mvn_tril_log_prob(torch.randn(2), torch.randn(2), torch.eye(2))

    def test_forcing_triton_without_triton(self, monkeypatch):
        monkeypatch.setattr(backends, "TRITON_KERNELS", False)
        with backends.use("triton"), pytest.raises(backends.BackendUnavailableError, match="triton is not installed"):
            ops.mvn_tril_log_prob(torch.randn(2), torch.randn(2), torch.eye(2))

    def test_forcing_cuda_on_cpu_tensors(self):
        with backends.use("cuda"), pytest.raises(backends.BackendUnavailableError, match="'cuda' was forced but cannot run"):
            ops.cholesky(torch.eye(2))

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="unknown fusedgauss backend 'fast'"):
            with backends.use("fast"):
                pass


def _outcome(check, *args):
    """What an operand check gives: its error (type and message), or the dtypes, shapes and
    values of the tensors it hands back."""
    try:
        tensors = check(*args)
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return [(t.dtype, t.shape, t.tolist()) for t in tensors]


def _vectors(*shapes, dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
            for shape in shapes]


F64 = torch.float64
ROWS_CASES = [
    _vectors((4, 3), (4, 3), (4, 3)),
    _vectors((4, 3), (3,), (4, 3)),  # a parameter shared by the batch
    _vectors((3,), (4, 3), (4, 3)),
    _vectors((4, 3), (2, 4, 3), (4, 3)),  # broadcasts, through the general checks
    _vectors((4, 3), (5, 3), (4, 3)),
    _vectors((4, 3), (4, 2), (4, 3)),
    _vectors((4, 0), (4, 0), (4, 0)),
    [*_vectors((4, 3), (4, 3)), torch.randn(4, 3, dtype=F64)],  # promoted
    [*_vectors((4, 3), dtype=torch.int64), *_vectors((4, 3), (4, 3))],
    _vectors((4, 3), (4, 3), (4, 3), dtype=torch.int64),
    [*_vectors((4, 3), (4, 3)), torch.ones(4, 3, dtype=torch.int64)],
    [torch.randn(()), *_vectors((1,), (1,))],
    [*_vectors((4, 3), (4, 3)), 1.0],
    [*_vectors((4, 3), (4, 3)), torch.randn(4, 3, device="meta")],
]
MATRIX_CASES = [
    _vectors((4, 3), (4, 3), (4, 3, 3)),
    _vectors((4, 3), (3,), (3, 3)),
    _vectors((4, 3), (4, 3), (2, 4, 3, 3)),
    _vectors((4, 3), (4, 3), (5, 3, 3)),
    _vectors((4, 3), (4, 3), (4, 3, 2)),
    _vectors((4, 3), (4, 3), (4, 3)),
    [*_vectors((4, 3), (4, 3)), torch.randn(4, 3, 3, dtype=F64)],
]
PACKED_CASES = [
    (*_vectors((4, 3), (4, 3), (4, 6)), "softplus", 0.0),
    (*_vectors((4, 3), (3,), (6,)), "exp", 1e-3),
    (*_vectors((4, 3), (4, 3), (4, 5)), "softplus", 0.0),
    (*_vectors((4, 2), (4, 2), (4, 6)), "softplus", 0.0),
    (*_vectors((4, 0), (4, 0), (4, 0)), "softplus", 0.0),
    (*_vectors((4, 3), (4, 3), (4, 6)), "relu", 0.0),
    (*_vectors((4, 3), (4, 3), (4, 6)), "none", -1.0),
    (*_vectors((4, 3), (4, 3), (4, 6)), "none", float("inf")),
    (*_vectors((4, 3), (4, 3)), torch.randn(4, 6, dtype=F64), "none", 0.5),
]


class TestUsualCallShortcut:
    """The operand checks answer the usual call (one dtype and device, shapes that need no
    broadcast) first, in a few attribute reads (validation._usual_vectors). Whatever they let
    through there, the general checks would too, with the same tensors back: each case gives
    the same outcome with the shortcut turned off."""

    @staticmethod
    def _same_without_shortcut(monkeypatch, check, *args):
        with_shortcut = _outcome(check, *args)
        monkeypatch.setattr(validation, "_usual_vectors", lambda *tensors: False)
        assert _outcome(check, *args) == with_shortcut

    @pytest.mark.parametrize("operands", ROWS_CASES)
    def test_rows_operands(self, monkeypatch, operands):
        named = dict(zip(("value", "loc", "scale"), operands))
        self._same_without_shortcut(monkeypatch, validation.rows_operands, "op", named)

    @pytest.mark.parametrize("operands", MATRIX_CASES)
    def test_mvn_operands(self, monkeypatch, operands):
        self._same_without_shortcut(monkeypatch, validation.mvn_operands, "op", *operands, "scale_tril")

    @pytest.mark.parametrize("operands", PACKED_CASES)
    def test_packed_mvn_operands(self, monkeypatch, operands):
        self._same_without_shortcut(monkeypatch, validation.packed_mvn_operands, "op", *operands)

    def test_the_usual_call_takes_it(self, monkeypatch):
        """The cases above with the shortcut on do take it (a shortcut that took nothing would
        pass them all): here the general checks would raise."""

        def unreachable(*args):
            raise AssertionError("the general checks ran")

        monkeypatch.setattr(validation, "_check_vectors", unreachable)
        monkeypatch.setattr(validation, "_check_tensor", unreachable)
        for operands, check in [(ROWS_CASES[1], lambda *t: validation.rows_operands("op", dict(zip("abc", t)))),
                                (MATRIX_CASES[1], lambda *t: validation.mvn_operands("op", *t, "scale_tril")),
                                (PACKED_CASES[1], lambda *t: validation.packed_mvn_operands("op", *t))]:
            returned = check(*operands)
            assert len(returned) == 3 and all(a is b for a, b in zip(returned, operands[:3]))
