"""A sample's noise: fusedgauss.standard_normal and the compiled standard_normal_ give
torch's normal_ bit for bit, from the same generator state, and leave the generator where
torch leaves it; every sampler draws it, so a seed still gives PyTorch's samples.

The compiled op mirrors two of torch's Box-Muller transforms: the AVX2 one (torch's AVX2 and
AVX512 CPU capabilities; 8 lanes, or 16 where the CPU kernels run AVX-512, so every comparison
runs at each SIMD level this CPU has) and the scalar one (DEFAULT); DEFAULT and AVX2 are also
chosen in a subprocess with ATEN_CPU_CAPABILITY, whatever this CPU's own capability.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.distributions as td

import fusedgauss
from fusedgauss import backends, ops

from conftest import requires_compiled_cpu

# Sizes around the edges that matter: below one Box-Muller run of 16, one run and a partial
# one (torch redraws the last 16), the 624 words of one mt19937 state and one past it, and
# many states with a ragged end.
SIZES = [1, 15, 16, 17, 31, 624, 625, 1000, 1247, 4096, 4099, 65536 * 6 + 5]
SEEDS = [0, 1, 2026]


def _draws(draw, seed: int, size: int, generator: torch.Generator | None = None):
    """The noise `draw(size, generator)` gives after seeding, and the uniforms the generator
    gives next (where it was left), after a few draws that move the mt19937 state part way."""
    source = generator if generator is not None else torch.default_generator
    source.manual_seed(seed)
    torch.rand(seed % 7 + 1, generator=generator)
    noise = draw(size, generator)
    return noise, torch.rand(1000, generator=generator)


def _torch_normal(size, generator):
    return torch.empty(size).normal_(generator=generator)


def _compiled_op(size, generator):
    noise = torch.empty(size)
    torch.ops.fusedgauss.standard_normal_(noise, generator)
    return noise


@requires_compiled_cpu
def test_the_mirror_draws_here():
    """The comparisons below test the mirror only where it draws (torch's own normal_ would
    pass them too): on x86 at torch's AVX2, AVX512 and DEFAULT CPU capabilities it must."""
    expected = {"AVX2": "avx2", "AVX512": "avx2", "DEFAULT": "scalar"}.get(torch.backends.cpu.get_cpu_capability())
    if platform.machine() not in ("x86_64", "AMD64") or expected is None:
        pytest.skip("torch's Box-Muller at this CPU capability is not mirrored")
    assert backends.cpu_normal_transform() == expected


@requires_compiled_cpu
@pytest.mark.parametrize("level", backends.cpu_simd_levels())
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_op_is_torchs_normal(size, seed, level):
    expected, expected_after = _draws(_torch_normal, seed, size)
    with backends.use_cpu_simd(level):
        noise, after = _draws(_compiled_op, seed, size)
    assert torch.equal(noise, expected)
    assert torch.equal(after, expected_after)
    # Fresh numbers, not a constant: the mirror of a generator that drew nothing would fail
    # the comparison above only by luck.
    assert size < 2 or noise.std() > 0.5


@requires_compiled_cpu
@pytest.mark.parametrize("level", backends.cpu_simd_levels())
def test_compiled_op_is_torchs_normal_over_many_uniforms(level):
    """2^24 normals: the Box-Muller transform of 2^23 pairs of uniforms, each uniform one of
    2^24 values, so a good part of each one's range (the 16-lane transform was compared with
    torch's 8-lane one over all of it when it was written)."""
    expected, expected_after = _draws(_torch_normal, 12, 1 << 24)
    with backends.use_cpu_simd(level):
        noise, after = _draws(_compiled_op, 12, 1 << 24)
    assert torch.equal(noise, expected)
    assert torch.equal(after, expected_after)


@requires_compiled_cpu
def test_compiled_op_with_a_generator_leaves_the_default_one_alone():
    torch.manual_seed(5)
    default_before = torch.get_rng_state()
    expected, expected_after = _draws(_torch_normal, 11, 5000, torch.Generator())
    noise, after = _draws(_compiled_op, 11, 5000, torch.Generator())
    assert torch.equal(noise, expected) and torch.equal(after, expected_after)
    assert torch.equal(torch.get_rng_state(), default_before)


@requires_compiled_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_compiled_op_other_dtypes_and_layouts_are_torchs(dtype):
    """What the op does not mirror (another dtype; a non-contiguous tensor) is torch's normal_."""
    torch.manual_seed(3)
    expected = torch.empty(64, 65, dtype=dtype).t().normal_()
    torch.manual_seed(3)
    noise = torch.empty(64, 65, dtype=dtype).t()
    torch.ops.fusedgauss.standard_normal_(noise)
    assert torch.equal(noise, expected)


@requires_compiled_cpu
def test_opcheck():
    torch.library.opcheck(torch.ops.fusedgauss.standard_normal_.default, (torch.empty(100, 17),))
    torch.library.opcheck(torch.ops.fusedgauss.standard_normal_.default, (torch.empty(40), torch.Generator()))


@pytest.mark.parametrize("shape", [(3,), (4096, 6), (2, 5000, 17)])
def test_standard_normal_is_torchs(shape):
    torch.manual_seed(7)
    expected = td.utils._standard_normal(shape, dtype=torch.float32, device=torch.device("cpu"))
    expected_after = torch.rand(10)
    torch.manual_seed(7)
    noise = ops.standard_normal(shape, dtype=torch.float32, device="cpu")
    assert noise.shape == shape and torch.equal(noise, expected)
    assert torch.equal(torch.rand(10), expected_after)


@pytest.mark.parametrize("squashed", ["diag", "tril"])
def test_squashed_samples_are_torchs(squashed):
    """rsample_log_prob draws its noise with ops.standard_normal: the action is still the one
    torch.distributions samples after the same seed, at a batch large enough for the op."""
    batch, k = 1024, 6
    loc = torch.randn(batch, k)
    if squashed == "diag":
        scale = torch.rand(batch, k) + 0.5
        ours = fusedgauss.TanhNormal(loc, scale)
        base = td.Independent(td.Normal(loc, scale), 1)
    else:
        scale_tril = torch.eye(k) + 0.1 * torch.randn(k, k).tril(-1)
        ours = fusedgauss.TanhMultivariateNormal(loc, scale_tril=scale_tril)
        base = td.MultivariateNormal(loc, scale_tril=scale_tril)
    theirs = td.TransformedDistribution(base, [td.TanhTransform(cache_size=1)])
    torch.manual_seed(9)
    expected = theirs.rsample()
    torch.manual_seed(9)
    action, _ = ours.rsample_log_prob()
    torch.testing.assert_close(action, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parameterization", ["diag", "scale_tril", "packed"])
def test_samples_are_torchs(parameterization):
    """DiagNormal and MultivariateNormal sample with ops.standard_normal and PyTorch's formula:
    after the same seed, the very samples torch.distributions draws."""
    batch, k = 2048, 6
    loc = torch.randn(batch, k)
    if parameterization == "diag":
        scale = torch.rand(batch, k) + 0.5
        ours, theirs = fusedgauss.DiagNormal(loc, scale), td.Independent(td.Normal(loc, scale), 1)
    elif parameterization == "scale_tril":
        scale_tril = torch.eye(k) + 0.1 * torch.randn(batch, k, k).tril(-1)
        ours = fusedgauss.MultivariateNormal(loc, scale_tril=scale_tril)
        theirs = td.MultivariateNormal(loc, scale_tril=scale_tril)
    else:
        packed = torch.randn(batch, k * (k + 1) // 2)
        ours = fusedgauss.MultivariateNormal.from_packed(loc, packed)
        theirs = td.MultivariateNormal(loc, scale_tril=fusedgauss.packed_to_scale_tril(packed))
    for draw in ("rsample", "sample"):
        torch.manual_seed(21)
        expected = getattr(theirs, draw)((2,))
        torch.manual_seed(21)
        assert torch.equal(getattr(ours, draw)((2,)), expected), draw


_CAPABILITY_CHECK = """
import torch, fusedgauss
assert torch.backends.cpu.get_cpu_capability() == {capability!r}, torch.backends.cpu.get_cpu_capability()
assert fusedgauss.backends.cpu_normal_transform() == {transform!r}, fusedgauss.backends.cpu_normal_transform()
for size in {sizes}:
    torch.manual_seed(4)
    expected = torch.empty(size).normal_()
    torch.manual_seed(4)
    noise = torch.empty(size)
    torch.ops.fusedgauss.standard_normal_(noise)
    assert torch.equal(noise, expected), size
print("ok")
"""


@requires_compiled_cpu
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ATEN_CPU_CAPABILITY is read on Linux x86")
@pytest.mark.parametrize("capability, transform", [("DEFAULT", "scalar"), ("AVX2", "avx2")])
def test_compiled_op_mirrors_torchs_transform_at_a_chosen_capability(capability, transform):
    """Torch's normal_ at a CPU capability this CPU has, chosen with ATEN_CPU_CAPABILITY in a
    subprocess: the mirror follows it there too."""
    if capability == "AVX2" and "avx2" not in backends.cpu_simd_levels():
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    result = subprocess.run(
        [sys.executable, "-c", _CAPABILITY_CHECK.format(capability=capability, transform=transform,
                                                        sizes=[16, 17, 1000, 65536 + 3])],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
