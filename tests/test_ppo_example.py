"""examples/ppo_continuous.py: --dist torch and --dist fusedgauss give the same losses and
returns over the first updates, for every policy head; a 2-process torchrun (DDP, gloo) run.

Hopper-v5 keeps these short runs meaningful: its early episodes end within tens of steps, so
the first updates see finished episodes, and before MuJoCo's contacts amplify the float32
rounding differences between the two distributions' kernels (over a few hundred steps of
HalfCheetah, one-ulp differences in the first actions grow to 1e-2)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
pytest.importorskip("mujoco", reason="the PPO example needs gymnasium's MuJoCo tasks")
ppo = pytest.importorskip("ppo_continuous")

SHORT_RUN = ["--env", "Hopper-v5", "--total-steps", "192", "--num-envs", "2", "--num-steps", "32",
             "--epochs", "2", "--minibatches", "2", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("head", ppo.HEADS)
def test_same_losses_and_returns(head, tmp_path):
    runs = {d: ppo.main(SHORT_RUN + ["--head", head, "--dist", d, "--out", str(tmp_path / d)]) for d in ppo.DISTS}
    torch_run, fused_run = runs["torch"], runs["fusedgauss"]
    assert len(torch_run["updates"]) == len(fused_run["updates"]) == 3
    for expected, got in zip(torch_run["updates"], fused_run["updates"]):
        for key in ("pg_loss", "v_loss", "entropy"):
            assert math.isfinite(got[key])
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        assert got["approx_kl"] == pytest.approx(expected["approx_kl"], abs=1e-5)
    assert len(torch_run["returns"]) == len(fused_run["returns"]) > 0
    for (step, expected), (got_step, got) in zip(torch_run["returns"], fused_run["returns"]):
        assert got_step == step and got == pytest.approx(expected, rel=1e-4)
    for name in ("returns.csv", "updates.csv", "learning_curve.png"):
        assert (tmp_path / "fusedgauss" / name).stat().st_size > 0


def test_policy_gradient_log_prob_never_uses_atanh():
    """The squashed head scores a stored action from its pre-tanh value: an action saturated
    to ±1 in float32 (where atanh would be inf) still has the finite log-prob of its u."""
    agent = ppo.Agent(11, 3, "tanh_tril", "fusedgauss")
    obs = torch.randn(4, 11)
    pre_tanh = torch.full((4, 3), 12.0)
    action = torch.tanh(pre_tanh)
    assert (action.abs() == 1).all()
    log_prob, _, _ = agent(obs, action, pre_tanh)
    torch_agent = ppo.Agent(11, 3, "tanh_tril", "torch")
    torch_agent.load_state_dict(agent.state_dict())
    expected, _, _ = torch_agent(obs, action, pre_tanh)
    assert torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, expected, rtol=1e-4, atol=1e-4)


def test_two_process_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "ppo_continuous.py"), *SHORT_RUN, "--total-steps", "256", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = (tmp_path / "updates.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # 256 steps in updates of 2 processes x 2 envs x 32 steps
    assert "nan" not in (tmp_path / "updates.csv").read_text()
