"""Bad input gets a clear error that names the problem, and no partial result."""

from __future__ import annotations

import pytest
import torch
from helpers import random_scale_tril, random_spd

import fusedgauss
from fusedgauss import backends, ops

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
