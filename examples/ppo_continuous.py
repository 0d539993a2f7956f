"""PPO for continuous control on gymnasium MuJoCo tasks, with the action distribution from
torch.distributions or fusedgauss (``--dist``), and nothing else changed.

    python examples/ppo_continuous.py                                   # HalfCheetah-v5, full covariance
    python examples/ppo_continuous.py --env Hopper-v5 --head tanh_tril --dist torch
    torchrun --nproc_per_node 2 examples/ppo_continuous.py --total-steps 200000

The algorithm is the usual single-file PPO (clipped surrogate objective, GAE, minibatch epochs,
clipped value loss, entropy bonus, gradient-norm clipping, observation and reward
normalisation), on ``--num-envs`` vectorised environments per process. Policy heads
(``--head``):

- ``diag``: a diagonal Gaussian with a state-independent log-std.
- ``tril``: a full covariance whose scale_tril is state-dependent: the actor outputs the mean
  and k(k+1)/2 packed entries of L, row by row as ``torch.tril_indices`` lists them, with the
  diagonal through softplus (plus ``--min-diag``). With ``--dist torch`` L is built the usual
  plain-PyTorch way (zeros, index assignment, softplus, tril); with ``--dist fusedgauss`` the
  actor's whole output goes to ``MultivariateNormal.from_head`` (``--plain-head`` keeps the
  plain-PyTorch construction and swaps the class only).
- ``tanh_tril``: that full covariance squashed by tanh into the action bounds. The rollout
  stores the pre-tanh value u with each action and the update scores the action from u: the
  log-prob of u under the Gaussian minus the tanh Jacobian, never atanh of a stored action.
  Its entropy bonus is the entropy of the pre-tanh Gaussian (the squashed one has no closed
  form).

Under torchrun every process runs its own environments (seeded apart) and
DistributedDataParallel averages the gradients (gloo on CPU, nccl on GPU); rank 0 reports.
The progress bar shows steps per second and the latest episodic return. At the end, rank 0
writes to ``--out``: ``returns.csv`` (every finished episode), ``updates.csv`` (the losses of
each update) and ``learning_curve.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.distributions as td
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import fusedgauss

HEADS = ("diag", "tril", "tanh_tril")
DISTS = ("fusedgauss", "torch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5", help="any gymnasium MuJoCo v5 task")
    p.add_argument("--head", choices=HEADS, default="tril")
    p.add_argument("--dist", choices=DISTS, default="fusedgauss")
    p.add_argument("--plain-head", action="store_true",
                   help="with --dist fusedgauss: build L the plain-PyTorch way, swap the class only")
    p.add_argument("--total-steps", type=int, default=200_000,
                   help="environment steps, all processes together (rounded up to whole updates)")
    p.add_argument("--num-envs", type=int, default=4, help="environments per process")
    p.add_argument("--num-steps", type=int, default=512, help="steps per environment per rollout")
    p.add_argument("--minibatches", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--ent-coef", type=float, default=0.0)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--min-diag", type=float, default=1e-3, help="added to the diagonal of L")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("runs/ppo"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# --- the policy ------------------------------------------------------------------------------


def packed_size(k: int) -> int:
    return k * (k + 1) // 2


def plain_scale_tril(packed: torch.Tensor, k: int, min_diag: float) -> torch.Tensor:
    """The usual plain-PyTorch construction of a state-dependent scale_tril."""
    rows, cols = torch.tril_indices(k, k, device=packed.device)
    L = packed.new_zeros(packed.shape[:-1] + (k, k))
    L[..., rows, cols] = packed
    return L.tril(-1) + torch.diag_embed(F.softplus(L.diagonal(dim1=-2, dim2=-1)) + min_diag)


def layer(n_in: int, n_out: int, std: float = math.sqrt(2)) -> nn.Linear:
    linear = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(linear.weight, std)
    nn.init.zeros_(linear.bias)
    return linear


def mlp(n_in: int, n_out: int, hidden: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(layer(n_in, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(), layer(hidden, n_out, out_std))


class Agent(nn.Module):
    """Actor and critic, two hidden layers each. ``forward`` is the update's pass (what
    DistributedDataParallel wraps); ``act`` samples during the rollout."""

    def __init__(self, obs_size: int, k: int, head: str, dist_name: str, *, hidden: int = 64,
                 min_diag: float = 1e-3, action_low=None, action_high=None, plain_head: bool = False):
        super().__init__()
        self.k, self.head, self.min_diag = k, head, min_diag
        self.fused = dist_name == "fusedgauss"
        self.fused_head = self.fused and not plain_head
        self.critic = mlp(obs_size, 1, hidden, 1.0)
        self.actor = mlp(obs_size, k + (0 if head == "diag" else packed_size(k)), hidden, 0.01)
        if head == "diag":
            self.log_std = nn.Parameter(torch.zeros(k))
        else:
            # Start with L about the identity, as the diagonal head starts with a std of 1:
            # the diagonal outputs' bias is softplus^-1(1) = log(e - 1), less min_diag.
            rows, cols = torch.tril_indices(k, k)
            diagonal = k + torch.nonzero(rows == cols).squeeze(-1)
            with torch.no_grad():
                self.actor[-1].bias[diagonal] = math.log(math.e - 1.0) - min_diag
        low = torch.as_tensor(-1.0 if action_low is None else action_low, dtype=torch.float32)
        high = torch.as_tensor(1.0 if action_high is None else action_high, dtype=torch.float32)
        self.register_buffer("action_center", ((high + low) / 2).expand(k).clone())
        self.register_buffer("action_half_range", ((high - low) / 2).expand(k).clone())
        # Bounds of [-1, 1] need no rescale after the tanh: fusedgauss then skips it.
        self.unit_bounds = bool((low == -1).all() and (high == 1).all())

    def actor_outputs(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loc, the packed scale_tril values) from the actor; (loc, None) for the diagonal head."""
        out = self.actor(obs)
        if self.head == "diag":
            return out, None
        # split rather than two slices: its backward writes the two gradients into one
        # tensor (a cat), where each slice's zeroes a full-width tensor and the two are then
        # added (k=17, B=4096, two threads, a loop of the log-prob alone: 1.8 -> 1.1 ms).
        return out.split([self.k, out.shape[-1] - self.k], dim=-1)

    def distribution(self, obs: torch.Tensor) -> td.Distribution:
        if self.fused_head and self.head != "diag":
            # The actor's whole output, [loc | packed]: its gradient comes back in one tensor.
            cls = fusedgauss.MultivariateNormal if self.head == "tril" else fusedgauss.TanhMultivariateNormal
            bounds = ({} if self.head == "tril" or self.unit_bounds
                      else {"low": self.action_low, "high": self.action_high})
            return cls.from_head(self.actor(obs), "softplus", self.min_diag, validate_args=False, **bounds)
        loc, packed = self.actor_outputs(obs)
        if self.head == "diag":
            scale = self.log_std.exp()
            if self.fused:
                return fusedgauss.DiagNormal(loc, scale, validate_args=False)
            return td.Independent(td.Normal(loc, scale.expand_as(loc), validate_args=False), 1)
        L = plain_scale_tril(packed, self.k, self.min_diag)
        if self.head == "tril":
            cls = fusedgauss.MultivariateNormal if self.fused else td.MultivariateNormal
            return cls(loc, scale_tril=L, validate_args=False)
        if self.fused:
            bounds = {} if self.unit_bounds else {"low": self.action_low, "high": self.action_high}
            return fusedgauss.TanhMultivariateNormal(loc, scale_tril=L, validate_args=False, **bounds)
        # With torch.distributions, the squashed policy is sampled and scored from its base
        # Gaussian and u (act, _torch_squashed_log_prob): TransformedDistribution.log_prob
        # would take atanh of the stored action.
        return td.MultivariateNormal(loc, scale_tril=L, validate_args=False)

    @property
    def action_low(self) -> torch.Tensor:
        return self.action_center - self.action_half_range

    @property
    def action_high(self) -> torch.Tensor:
        return self.action_center + self.action_half_range

    def _torch_squashed_log_prob(self, base: td.MultivariateNormal, pre_tanh: torch.Tensor) -> torch.Tensor:
        """log p(a) for a = center + half_range tanh(u), from u: the Gaussian log-prob of u minus
        the log-Jacobians of tanh (in TanhTransform's stable form) and of the rescale."""
        tanh_log_det = td.TanhTransform().log_abs_det_jacobian(pre_tanh, torch.tanh(pre_tanh)).sum(-1)
        return base.log_prob(pre_tanh) - tanh_log_det - self.action_half_range.log().sum()

    @torch.no_grad()
    def act(self, obs: torch.Tensor):
        """(action, its log-prob, the pre-tanh value u (the action itself without a squash), value)."""
        d = self.distribution(obs)
        value = self.critic(obs).squeeze(-1)
        if self.head != "tanh_tril":
            action = d.sample()
            return action, d.log_prob(action), action, value
        if self.fused:
            action, log_prob, pre_tanh = d.sample_log_prob(return_pre_tanh=True)
            return action, log_prob, pre_tanh, value
        pre_tanh = d.sample()
        action = self.action_center + self.action_half_range * torch.tanh(pre_tanh)
        return action, self._torch_squashed_log_prob(d, pre_tanh), pre_tanh, value

    def forward(self, obs: torch.Tensor, action: torch.Tensor, pre_tanh: torch.Tensor):
        """(log-prob of the stored actions, entropy, value) for the update."""
        d = self.distribution(obs)
        value = self.critic(obs).squeeze(-1)
        if self.head != "tanh_tril":
            return d.log_prob(action), d.entropy(), value
        if self.fused:
            return d.log_prob(action, pre_tanh=pre_tanh), d.base_dist.entropy(), value
        return self._torch_squashed_log_prob(d, pre_tanh), d.entropy(), value


def ppo_loss(agent: nn.Module, mb: dict, clip: float, ent_coef: float, vf_coef: float):
    """The clipped PPO objective on one minibatch: (loss, its parts for logging)."""
    log_prob, entropy, value = agent(mb["obs"], mb["actions"], mb["pre_tanh"])
    log_ratio = log_prob - mb["log_probs"]
    ratio = log_ratio.exp()
    advantages = mb["advantages"]
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    value_clipped = mb["values"] + (value - mb["values"]).clamp(-clip, clip)
    v_loss = 0.5 * torch.max((value - mb["returns"]) ** 2, (value_clipped - mb["returns"]) ** 2).mean()
    entropy = entropy.mean()
    loss = pg_loss - ent_coef * entropy + vf_coef * v_loss
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": entropy.item(),
                  "approx_kl": approx_kl.item()}


def gather_minibatch(batch: dict, index: torch.Tensor) -> dict:
    """The rows `index` of each tensor of `batch`. index_select, not batch[name][index]:
    advanced indexing's general path took 2.5x as long for these row gathers."""
    return {name: tensor.index_select(0, index) for name, tensor in batch.items()}


# --- environments and rollouts -----------------------------------------------------------------


def make_env(env_id: str, gamma: float):
    def thunk():
        env = gym.make(env_id)
        env = gym.wrappers.FlattenObservation(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.NormalizeObservation(env)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)
        env = gym.wrappers.NormalizeReward(env, gamma=gamma)
        env = gym.wrappers.TransformReward(env, lambda reward: float(np.clip(reward, -10, 10)))
        return env

    return thunk


def gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Generalised advantage estimates and returns over a rollout (T, N)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        not_done = 1.0 - (next_done if t == rewards.shape[0] - 1 else dones[t + 1])
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * following * not_done - values[t]
        last = delta + gamma * lam * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def main(argv=None) -> dict:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if args.device == "cuda" else None)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed + rank)

    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env, args.gamma) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    obs_size = int(np.prod(envs.single_observation_space.shape))
    k = int(np.prod(envs.single_action_space.shape))
    low, high = envs.single_action_space.low, envs.single_action_space.high
    agent = Agent(obs_size, k, args.head, args.dist, hidden=args.hidden, min_diag=args.min_diag,
                  action_low=low, action_high=high,
                  plain_head=args.plain_head).to(device)
    model = nn.parallel.DistributedDataParallel(agent) if world > 1 else agent
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)

    T, N = args.num_steps, args.num_envs
    steps_per_update = T * N * world
    updates = max(1, math.ceil(args.total_steps / steps_per_update))  # at least --total-steps
    buffers = {name: torch.zeros((T, N) + shape, device=device) for name, shape in
               {"obs": (obs_size,), "actions": (k,), "pre_tanh": (k,), "log_probs": (), "rewards": (),
                "dones": (), "values": ()}.items()}
    shuffle = torch.Generator().manual_seed(args.seed)
    returns_log: list[tuple[int, float]] = []
    updates_log: list[dict] = []

    obs, _ = envs.reset(seed=args.seed + rank * N)
    next_obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
    next_done = torch.zeros(N, device=device)
    global_step, start = 0, time.perf_counter()
    progress = tqdm(total=updates * steps_per_update, disable=rank != 0 or args.no_progress, unit="step")
    for update in range(updates):
        for t in range(T):
            buffers["obs"][t], buffers["dones"][t] = next_obs, next_done
            action, log_prob, pre_tanh, value = agent.act(next_obs)
            buffers["actions"][t], buffers["pre_tanh"][t] = action, pre_tanh
            buffers["log_probs"][t], buffers["values"][t] = log_prob, value
            # A Gaussian action may leave the bounds: the environment gets it clipped, the
            # buffer keeps it as sampled (its log-prob is the sample's).
            obs, reward, terminated, truncated, info = envs.step(np.clip(action.cpu().numpy(), low, high))
            buffers["rewards"][t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
            next_done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32, device=device)
            global_step += N * world
            # Autoreset in the same step: a finished episode's statistics are in final_info.
            episode = info.get("final_info", {}).get("episode")
            if episode is not None:
                returns_log.extend((global_step, float(r)) for r in episode["r"][episode["_r"]])
        with torch.no_grad():
            next_value = agent.critic(next_obs).squeeze(-1)
        advantages, returns = gae(buffers["rewards"], buffers["values"], buffers["dones"], next_value, next_done,
                                  args.gamma, args.gae_lambda)
        batch = {name: buffers[name].reshape((T * N,) + buffers[name].shape[2:])
                 for name in ("obs", "actions", "pre_tanh", "log_probs", "values")}
        batch["advantages"], batch["returns"] = advantages.reshape(-1), returns.reshape(-1)

        minibatch = T * N // args.minibatches
        parts = []
        for _ in range(args.epochs):
            order = torch.randperm(T * N, generator=shuffle).to(device)
            for s in range(0, T * N - minibatch + 1, minibatch):
                mb = gather_minibatch(batch, order[s:s + minibatch])
                loss, logged = ppo_loss(model, mb, args.clip, args.ent_coef, args.vf_coef)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                parts.append(logged)
        elapsed = time.perf_counter() - start
        recent = [r for _, r in returns_log[-10:]]
        updates_log.append({"update": update + 1, "global_step": global_step, "seconds": elapsed,
                            **{key: float(np.mean([p[key] for p in parts])) for key in parts[0]},
                            "mean_return_recent": float(np.mean(recent)) if recent else float("nan")})
        progress.update(steps_per_update)
        progress.set_postfix(sps=f"{global_step / elapsed:.0f}",
                             ret=f"{recent[-1]:.1f}" if recent else "-")
    progress.close()
    envs.close()
    result = {"returns": returns_log, "updates": updates_log, "seconds": time.perf_counter() - start}
    if rank == 0:
        write_results(args, result)
    if world > 1:
        dist.destroy_process_group()
    return result


def write_results(args: argparse.Namespace, result: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "returns.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_step", "episodic_return"])
        writer.writerows(result["returns"])
    with open(args.out / "updates.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["updates"][0]))
        writer.writeheader()
        writer.writerows(result["updates"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if result["returns"]:
        steps, returns = zip(*result["returns"])
        ax.plot(steps, returns, ".", alpha=0.4, label="episodes")
        window = max(1, len(returns) // 20)
        smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"mean of {window}")
        ax.legend()
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episodic return")
    ax.set_title(f"PPO {args.env}, head {args.head}, {args.dist} ({result['seconds']:.0f} s)")
    fig.tight_layout()
    fig.savefig(args.out / "learning_curve.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch 2.14 keeps a Python object (a contextvars.Context) in the thread-local state
        # of every backward pass, so in DDP's gradient all-reduces, and gloo's worker thread
        # can be the one to release such an all-reduce. destroy_process_group leaves those
        # threads running once DDP has used the group; if one releases while the interpreter
        # finalises, the process aborts ("terminate called without an active exception").
        # Everything is written and the group destroyed: leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
