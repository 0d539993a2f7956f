"""The PPO update phase, torch.distributions against fusedgauss, in one run.

For each policy head of examples/ppo_continuous.py (its Agent: actor and critic with two
hidden layers of 64, observation size 17) and k in {6, 17}: one epoch over a buffer of 65536
transitions, in minibatches (4096 by default), each the forward and backward pass of the
example's clipped PPO loss (policy, clipped value, entropy bonus) with the minibatch gathered
from the buffer, as the example does it; no optimizer step. Columns, all measured in one run
with torch.utils.benchmark, from the same weights, buffer and minibatch order:

  torch        torch.distributions, with the plain-PyTorch head construction (zeros, index
               assignment, softplus, tril: examples/ppo_continuous.py plain_scale_tril)
  drop-in      the fusedgauss classes with that same plain-PyTorch head: the one-import change
  fused head   fusedgauss ``from_head``: the full-covariance heads read the actor's whole
               output, loc and the packed scale_tril, and hand it back its gradient in one
               tensor

Ceilings, the same epoch with parts of the update made free:

  free dist    the clipped PPO loss with the plain-PyTorch head built, but a stand-in for
               the distribution that computes nothing and hands back fixed dense gradients
               (FreeDistributionAgent): torch ms / free-dist ms is the ceiling of the drop-in
               class, which keeps that head
  free dist and head
               the same without the head construction (one gradient goes to the actor's whole
               output): the ceiling of the fused head with the PPO loss's own arithmetic kept
  MLP alone    a squared-output loss on the actor and critic, no PPO loss at all: the
               ceiling of any change to the distribution

Heads: ``tril`` (state-dependent full covariance), ``tanh_tril`` (the same, tanh-squashed,
scored from the stored pre-tanh value), ``diag`` (state-independent log-std; no packed head).

The columns are timed in interleaved rounds (each round times one epoch of every column),
and each column's median over the rounds is reported, so that the drift of a shared
machine's speed during the run reaches every column alike.

    python benchmarks/bench_ppo.py                     # k in {6, 17}, every head
    python benchmarks/bench_ppo.py --k 6 --heads tril  # one cell
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import fusedgauss  # noqa: E402
from torch.utils import benchmark  # noqa: E402
from ppo_continuous import HEADS, Agent, gather_minibatch, plain_scale_tril, ppo_loss  # noqa: E402

OBS_SIZE = 17
CLIP, ENT_COEF, VF_COEF = 0.2, 0.0, 0.5
# (column, --dist of the example's Agent, plain_head)
VARIANTS = (("torch", "torch", True), ("drop-in", "fusedgauss", True), ("fused head", "fusedgauss", False))
#: The ceiling columns (see the module docstring), and their ratio columns' headers.
CEILINGS = {"free dist": "ceiling of the drop-in", "free dist and head": "ceiling of the fused head",
            "MLP alone": "ceiling (× MLP alone)"}


def make_buffer(agent: Agent, size: int, generator: torch.Generator) -> dict:
    """A rollout-like buffer: random observations, actions sampled from `agent` with their
    log-probs and values, and random advantages and returns."""
    obs = torch.randn(size, OBS_SIZE, generator=generator)
    actions, log_probs, pre_tanh, values = agent.act(obs)
    return {"obs": obs, "actions": actions, "pre_tanh": pre_tanh, "log_probs": log_probs, "values": values,
            "advantages": torch.randn(size, generator=generator),
            "returns": values + torch.randn(size, generator=generator)}


class _FreeLogProb(torch.autograd.Function):
    """A log-prob that costs nothing: the forward computes nothing (zeros), the backward hands
    back fixed dense gradients, allocated once, as dense as a real distribution's. (A sum of
    the outputs would give the head a stride-0 gradient, whose backward reads almost nothing;
    a product with weights would allocate a fresh gradient per call, which on this machine's
    costly page faults made the stand-in slower than the fused distribution: either way, not
    a ceiling.) The engine never accumulates into them in place, as they stay referenced."""

    @staticmethod
    def forward(ctx, gradients, *inputs):
        ctx.gradients = gradients  # one per input
        return inputs[0].new_zeros(inputs[0].shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        return (None, *ctx.gradients)


class FreeDistributionAgent:
    """An Agent's update pass with the distribution free: the actor and critic as the Agent
    runs them (and, with `plain_head`, its plain-PyTorch scale_tril), a log-prob that costs
    nothing (_FreeLogProb) and a constant entropy, so that the PPO loss built on them costs
    what it does with a real distribution minus the distribution itself."""

    def __init__(self, agent: Agent, plain_head: bool):
        self.agent, self.plain_head = agent, plain_head
        self.gradients = {}

    def _gradient(self, t: torch.Tensor) -> torch.Tensor:
        """Fixed random values shaped like t, made once per shape."""
        if t.shape not in self.gradients:
            self.gradients[t.shape] = torch.randn(t.shape, generator=torch.Generator().manual_seed(len(self.gradients)))
        return self.gradients[t.shape]

    def __call__(self, obs, action, pre_tanh):
        agent = self.agent
        if agent.head != "diag" and not self.plain_head:
            inputs = (agent.actor(obs),)  # the fused head's: the actor's whole output
        else:
            loc, packed = agent.actor_outputs(obs)
            inputs = (loc, agent.log_std.exp() if agent.head == "diag" else plain_scale_tril(packed, agent.k,
                                                                                            agent.min_diag))
        log_prob = _FreeLogProb.apply(tuple(self._gradient(t) for t in inputs), *inputs)
        return log_prob, torch.zeros_like(log_prob), agent.critic(obs).squeeze(-1)


def free_distribution_loss(plain_head: bool):
    stand_ins = {}  # per agent, made once: its fixed gradients are part of what is free

    def loss(agent: Agent, mb: dict, *args):
        if agent not in stand_ins:
            stand_ins[agent] = FreeDistributionAgent(agent, plain_head)
        return ppo_loss(stand_ins[agent], mb, *args)

    return loss


def mlp_alone_loss(agent: Agent, mb: dict, *_):
    """The actor and critic with no distribution: a loss that uses every output."""
    return agent.actor(mb["obs"]).square().mean() + agent.critic(mb["obs"]).square().mean(), {}


def update_epoch(agent: Agent, buffer: dict, order: torch.Tensor, minibatch: int, loss_fn=ppo_loss):
    """One epoch of the update phase: forward and backward of the PPO loss per minibatch."""

    def run():
        for start in range(0, order.numel(), minibatch):
            index = order[start:start + minibatch]
            mb = gather_minibatch(buffer, index)
            loss, _ = loss_fn(agent, mb, CLIP, ENT_COEF, VF_COEF)
            agent.zero_grad(set_to_none=True)
            loss.backward()

    return run


def interleaved_medians(steps: dict, rounds: int) -> dict:
    """Median seconds of each step over `rounds` rounds, each round timing every step once
    (after one warm-up call each)."""
    timers = {}
    for name, step in steps.items():
        step()
        timers[name] = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(1).median)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def run_head(head: str, k: int, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    agents = {name: Agent(OBS_SIZE, k, head, dist, plain_head=plain) for name, dist, plain in VARIANTS
              if head != "diag" or plain}  # the diagonal head has no packed construction
    reference = agents["torch"]
    for agent in agents.values():
        agent.load_state_dict(reference.state_dict())
    buffer = make_buffer(reference, args.buffer, generator)
    order = torch.randperm(args.buffer, generator=generator)
    losses = {name: ppo_loss(agent, buffer, CLIP, ENT_COEF, VF_COEF)[0].item() for name, agent in agents.items()}
    for name, loss in losses.items():  # every column computes the same update
        if abs(loss - losses["torch"]) > 1e-4 * (1 + abs(losses["torch"])):
            raise RuntimeError(f"{head} k={k}: the {name} loss {loss} differs from torch's {losses['torch']}")
    row = {"head": head, "k": k, "buffer": args.buffer, "minibatch": args.minibatch, "rounds": args.rounds,
           "loss": losses}
    steps = {name: update_epoch(agent, buffer, order, args.minibatch) for name, agent in agents.items()}
    steps["free dist"] = update_epoch(reference, buffer, order, args.minibatch, free_distribution_loss(True))
    if head != "diag":
        steps["free dist and head"] = update_epoch(reference, buffer, order, args.minibatch,
                                                   free_distribution_loss(False))
    steps["MLP alone"] = update_epoch(reference, buffer, order, args.minibatch, mlp_alone_loss)
    for name, seconds in interleaved_medians(steps, args.rounds).items():
        row[f"{name} ms"] = seconds * 1e3
    for name in steps:
        if name != "torch":
            row[f"{name} ×"] = row["torch ms"] / row[f"{name} ms"]
    return row


def to_markdown(rows: list[dict], meta: dict) -> str:
    names = [name for name, _, _ in VARIANTS] + list(CEILINGS)
    lines = [
        f"# PPO update phase ({meta['date']})",
        "",
        f"{meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, fusedgauss {meta['fusedgauss']} "
        f"(CPU kernels at SIMD level {meta.get('cpu_simd')}); float32. "
        f"One epoch over {meta['buffer']} transitions in minibatches of {meta['minibatch']} (forward+backward of the "
        f"clipped PPO loss); medians over {meta['rounds']} interleaved rounds timed with torch.utils.benchmark, all "
        "columns in one run. Ceilings (torch ÷ the epoch with parts made free): free dist, the drop-in class's "
        "(the plain-PyTorch head kept); free dist and head, the fused head's with the PPO loss kept; MLP alone, "
        "any change's.",
        "",
        "| head | k | " + " | ".join(f"{n} ms" for n in names)
        + " | drop-in × torch | fused head × torch | " + " | ".join(CEILINGS.values()) + " |",
        "|---|---:|" + "---:|" * (len(names) + 2 + len(CEILINGS)),
    ]
    for r in rows:
        cells = [f"{r[f'{n} ms']:.1f}" if f"{n} ms" in r else "–" for n in names]
        ratios = [f"{r[f'{n} ×']:.2f}" if f"{n} ×" in r else "–" for n in ("drop-in", "fused head", *CEILINGS)]
        lines.append(f"| {r['head']} | {r['k']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[6, 17])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--buffer", type=int, default=65536, help="transitions in the buffer")
    parser.add_argument("--minibatch", type=int, default=4096, help="transitions per minibatch")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default=None, help="file name stem (default: ppo_update_<threads>t)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or f"ppo_update_{args.threads}t"
    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu": fusedgauss.backends.cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fusedgauss": fusedgauss.__version__,
        "cpu_simd": fusedgauss.backends.cpu_simd_level(),
        "buffer": args.buffer,
        "minibatch": args.minibatch,
        "rounds": args.rounds,
    }
    rows = [run_head(head, k, args) for k in args.k for head in args.heads]
    markdown = to_markdown(rows, meta)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{name}.md").write_text(markdown)
    print(f"wrote {args.out / name}.json and .md")
    return rows


if __name__ == "__main__":
    main()
