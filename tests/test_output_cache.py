"""The CPU output cache (csrc/cpu/output_cache.cpp).

CPU outputs of a megabyte or more reuse blocks that earlier outputs freed. These tests check
that a freed block is reused and gives correct results, that a block a tensor still uses is
never handed out, that the cache keeps no more than its limit, and that its outputs are
ordinary tensors. They also check the limit's environment variable.
"""

import io

import pytest
import torch

from fusedgauss import backends, ops, reference
from helpers import random_scale_tril, random_spd, run_module

pytestmark = pytest.mark.skipif(not backends.COMPILED_CPU, reason="fusedgauss was built without CPU kernels")

MEGABYTE = 2**20
#: Samples of event size K whose (B, K, K) float32 matrix is exactly the cache's 1 MB threshold.
BATCH, K = 4096, 8


@pytest.fixture(autouse=True)
def emptied_cache():
    """Each test starts with no kept blocks and leaves the limit as it found it."""
    limit = backends.cpu_output_cache_stats()["limit_bytes"]
    backends.empty_cpu_output_cache()
    yield
    backends.set_cpu_output_cache_limit(limit)


def _scale_tril_gradient() -> torch.Tensor:
    """The (BATCH, K, K) scale_tril gradient of mvn_tril_log_prob for fresh inputs, checked
    against the reference's autograd gradient."""
    value, loc = torch.randn(BATCH, K), torch.randn(BATCH, K)
    scale_tril = random_scale_tril((BATCH,), K, dtype=torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(ops.mvn_tril_log_prob(value, loc, scale_tril).sum(), scale_tril)
    (expected,) = torch.autograd.grad(reference.mvn_tril_log_prob(value, loc, scale_tril)[0].sum(), scale_tril)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)
    return grad


def test_freed_output_is_reused_with_correct_values():
    first = _scale_tril_gradient()
    address = first.data_ptr()
    del first
    before = backends.cpu_output_cache_stats()
    assert before["cached_blocks"] == 1 and before["cached_bytes"] == 2 * MEGABYTE  # whole huge pages
    second = _scale_tril_gradient()
    after = backends.cpu_output_cache_stats()
    assert second.data_ptr() == address
    assert after["hits"] == before["hits"] + 1 and after["cached_blocks"] == 0


def test_live_outputs_never_share_a_block():
    first = _scale_tril_gradient()
    kept = first.clone()
    second = _scale_tril_gradient()
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_kept_bytes_never_exceed_the_limit():
    backends.set_cpu_output_cache_limit(3 * MEGABYTE)
    outputs = [_scale_tril_gradient() for _ in range(3)]  # 2 MB blocks
    del outputs
    stats = backends.cpu_output_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["cached_bytes"] == 2 * MEGABYTE
    backends.set_cpu_output_cache_limit(MEGABYTE)
    assert backends.cpu_output_cache_stats()["cached_bytes"] == 0


def test_a_zero_limit_turns_the_cache_off():
    live = _scale_tril_gradient()  # from the cache, given back after the limit drops to 0
    backends.set_cpu_output_cache_limit(0)
    before = backends.cpu_output_cache_stats()
    del live
    for _ in range(2):
        _scale_tril_gradient()
    after = backends.cpu_output_cache_stats()
    assert after["cached_bytes"] == 0
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_small_outputs_bypass_the_cache():
    before = backends.cpu_output_cache_stats()
    ops.cholesky(random_spd((BATCH // 2,), K, dtype=torch.float32))  # half a megabyte
    after = backends.cpu_output_cache_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


@pytest.mark.parametrize("op_name", ["cholesky", "packed_to_scale_tril", "squashed_diag_rsample_log_prob"])
def test_every_output_path_gives_correct_values_from_a_reused_block(op_name):
    """Forward outputs, sampled actions and unpacked factors take the cache too; the second
    call runs in the blocks the first one freed."""
    def call():
        if op_name == "cholesky":
            args = (random_spd((BATCH,), K, dtype=torch.float32),)
        elif op_name == "packed_to_scale_tril":
            args = (torch.randn(BATCH, K * (K + 1) // 2), "softplus", 1e-3)
        else:
            args = (torch.randn(8 * BATCH, K), torch.rand(8 * BATCH, K) + 0.5, torch.randn(8 * BATCH, K))
        got = getattr(ops, op_name)(*args)
        expected = getattr(reference, op_name)(*args)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    call()
    hits = backends.cpu_output_cache_stats()["hits"]
    call()
    assert backends.cpu_output_cache_stats()["hits"] > hits


def test_outputs_are_ordinary_tensors():
    out = _scale_tril_gradient()
    values = out.clone()
    out.resize_(2 * BATCH, K, K)  # the storage is resizable and keeps its contents
    torch.testing.assert_close(out[:BATCH], values, rtol=0, atol=0)
    out[BATCH:].normal_()  # the grown part holds whatever the new block held
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), out, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(out.numpy()), out, rtol=0, atol=0)
    shared = out.clone().share_memory_()
    torch.testing.assert_close(shared, out, rtol=0, atol=0)


def test_a_negative_limit_is_an_error():
    with pytest.raises(ValueError, match="the limit must be 0 or more bytes, got -1"):
        backends.set_cpu_output_cache_limit(-1)


def _info(env_value: str) -> str:
    return run_module("info", env={"FUSEDGAUSS_CPU_OUTPUT_CACHE_MB": env_value}, check=True).stdout


@pytest.mark.parametrize(
    ("env_value", "reported"),
    [
        ("16", "output cache: keeps up to 16 MB of freed outputs of 1 MB or more (FUSEDGAUSS_CPU_OUTPUT_CACHE_MB=16)"),
        ("0", "output cache: off (FUSEDGAUSS_CPU_OUTPUT_CACHE_MB=0)"),
        ("lots", "output cache: unusable: FUSEDGAUSS_CPU_OUTPUT_CACHE_MB must be a whole number of megabytes, "
                 "0 or more; got 'lots'"),
    ],
)
def test_environment_variable_sets_the_limit(env_value, reported):
    assert reported in _info(env_value)
