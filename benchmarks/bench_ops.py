"""fusedgauss against torch.distributions on the CPU: the full-covariance log-prob.

For each case (per-sample scale_tril, shared scale_tril, per-sample covariance), event size k
and batch size B, times in one run, with torch.utils.benchmark (warm-up excluded, fresh
random inputs; the columns of a cell in interleaved rounds, see timed_columns):

  torch          torch.distributions.MultivariateNormal(...).log_prob, eager
  torch.compile  the same function under torch.compile
  fusedgauss     fusedgauss.MultivariateNormal(...).log_prob

for the forward pass alone and for forward+backward (gradients to loc and the matrix, as in a
policy-gradient step; the actions are data). It prints speed-ups and the fraction of the
machine's copy bandwidth the fused kernel reaches (bytes that must move / time / bandwidth,
the bandwidth measured here by a large tensor copy), and writes JSON, markdown and a plot.

    python benchmarks/bench_ops.py                 # the full grid
    python benchmarks/bench_ops.py --quick         # B=4096, k in {2, 6}: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributions as td
from torch.utils import benchmark
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fusedgauss  # noqa: E402
from helpers import random_scale_tril, random_spd  # noqa: E402

CASES = ("scale_tril", "shared_scale_tril", "covariance")
DTYPE = torch.float32


@dataclass
class Row:
    case: str
    k: int
    batch: int
    passes: str  # "forward" or "forward+backward"
    torch_ms: float
    compile_ms: float | None
    fusedgauss_ms: float
    speedup_vs_torch: float
    speedup_vs_compile: float | None
    bytes_moved: int
    bandwidth_fraction: float
    # Where a benchmark times the step with the distribution made free (a stand-in that
    # computes nothing), that step's time, and torch's time over it: the most any
    # distribution library could reach in the cell.
    free_ms: float | None = None
    ceiling_vs_torch: float | None = None


def measure_copy_bandwidth(min_run_time: float) -> float:
    """Bytes per second of a large tensor copy (read + write) on this machine."""
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    t = benchmark.Timer(
        "dst.copy_(src)", globals={"dst": dst, "src": src}, num_threads=torch.get_num_threads()
    ).blocked_autorange(
        min_run_time=min_run_time
    )
    return 2 * src.numel() * src.element_size() / t.median


# Distinct random matrices per input; larger batches repeat them (in their own memory), since
# the timings do not depend on the values and generating 2^20 large SPD matrices would take
# longer than the benchmark.
MATRIX_POOL = 2**14


def make_inputs(case: str, batch: int, k: int, device: str = "cpu"):
    """value (data), loc and matrix (leaves that require grad), matrix keyword."""
    value = torch.randn(batch, k, dtype=DTYPE, device=device)
    loc = torch.randn(batch, k, dtype=DTYPE, device=device).requires_grad_()
    distinct = min(batch, MATRIX_POOL)
    if case == "covariance":
        matrix, keyword = random_spd((distinct,), k, dtype=DTYPE), "covariance_matrix"
    elif case == "shared_scale_tril":
        matrix, keyword = random_scale_tril((), k, dtype=DTYPE), "scale_tril"
    else:
        matrix, keyword = random_scale_tril((distinct,), k, dtype=DTYPE), "scale_tril"
    matrix = matrix.to(device)
    if matrix.dim() == 3 and distinct < batch:
        matrix = matrix.repeat(-(-batch // distinct), 1, 1)[:batch]
    return value, loc, matrix.contiguous().requires_grad_(), keyword


def bytes_moved(case: str, batch: int, k: int, passes: str) -> int:
    """Bytes the computation must read and write at the least (float32).

    Forward: read value, loc and the matrix (per sample: k*k), write the log-prob.
    Backward: read them again with the upstream gradient, write the gradients of loc and of
    the matrix (a shared matrix's gradient is reduced in the kernel: k*k once).
    """
    per_sample_matrix = case != "shared_scale_tril"
    matrix = k * k * (batch if per_sample_matrix else 1)
    forward = batch * (2 * k + 1) + matrix
    backward = batch * (2 * k + 1) + matrix + batch * k + matrix
    return 4 * (forward + (backward if passes == "forward+backward" else 0))


#: Interleaved rounds per cell: each round times every column once.
ROUNDS = 5


def timed_columns(steps, min_run_time: float, rounds: int = ROUNDS) -> list[float | None]:
    """Seconds per call of each zero-argument step (None stays None), in `rounds` interleaved
    rounds of min_run_time / rounds each: the median over the rounds of each round's median.
    A shared machine's speed drifts within seconds; interleaving lets the drift reach every
    column alike, so the ratios hold even when the absolute times move."""
    live = [step for step in steps if step is not None]
    for step in live:
        step()  # warm-up (and compilation) outside the measurement
    timers = [benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()) for step in live]
    per_round = [[] for _ in live]
    for _ in range(rounds):
        for timer, times in zip(timers, per_round):
            times.append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median)
    medians = iter(statistics.median(times) for times in per_round)
    return [next(medians) if step is not None else None for step in steps]


def log_prob_steps(case: str, batch: int, k: int, passes: str, device: str = "cpu"):
    """Zero-argument steps over fresh inputs: torch.distributions eager, a function that
    returns the same step under torch.compile (compiling on its first call), and fusedgauss
    (on whichever backend is chosen when it runs)."""
    value, loc, matrix, keyword = make_inputs(case, batch, k, device)

    def torch_log_prob(loc, matrix, value):
        return td.MultivariateNormal(loc, validate_args=False, **{keyword: matrix}).log_prob(value)

    def fused_log_prob(loc, matrix, value):
        return fusedgauss.MultivariateNormal(loc, validate_args=False, **{keyword: matrix}).log_prob(value)

    def as_step(log_prob):
        if passes == "forward":
            return lambda: log_prob(loc, matrix, value)
        return lambda: torch.autograd.grad(log_prob(loc, matrix, value).sum(), (loc, matrix))

    def compiled_step():
        torch._dynamo.reset()
        return as_step(torch.compile(torch_log_prob, dynamic=False))

    return as_step(torch_log_prob), compiled_step, as_step(fused_log_prob)


def run_columns(torch_step, compiled_step, fused_step, compile_torch: bool, min_run_time: float, free_step=None):
    """(torch ms, torch.compile ms or None, fusedgauss ms[, free ms]), timed interleaved; the
    fourth with a `free_step` (the step with the distribution made free)."""
    compiled = compiled_step() if compile_torch else None
    seconds = timed_columns([torch_step, compiled, fused_step, free_step], min_run_time)
    columns = [s * 1e3 if s is not None else None for s in seconds]
    return tuple(columns if free_step is not None else columns[:3])


def run_cell(case, batch, k, passes, compile_torch, min_run_time):
    columns = run_columns(*log_prob_steps(case, batch, k, passes), compile_torch, min_run_time)
    return (*columns, bytes_moved(case, batch, k, passes))


def to_markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        f"# {meta['title']} ({meta['date']})",
        "",
        f"{meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, fusedgauss {meta['fusedgauss']} "
        f"(CPU kernels at SIMD level {meta.get('cpu_simd')}); float32; copy bandwidth "
        f"{meta['copy_bandwidth_gbps']:.1f} GB/s. Medians over {meta.get('rounds', 1)} interleaved rounds of "
        "torch.utils.benchmark medians.",
    ]
    with_free = any(r.free_ms is not None for r in rows)
    if with_free:
        lines[-1] += (" Free ms: the same step with the distribution made free (a stand-in that computes "
                      "nothing; what is left is the work every column shares); ceiling: torch ms / free ms, "
                      "the most any distribution library could reach in that cell.")
    lines += [
        "",
        "| case | k | B | passes | torch ms | torch.compile ms | fusedgauss ms | × torch | × compile | bandwidth |"
        + (" free ms | ceiling × torch |" if with_free else ""),
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_free else ""),
    ]

    def number(x: float | None, digits: int) -> str:
        return f"{x:.{digits}f}" if x is not None else "–"

    for r in rows:
        line = (f"| {r.case} | {r.k} | {r.batch} | {r.passes} | {r.torch_ms:.2f} | {number(r.compile_ms, 2)} | "
                f"{r.fusedgauss_ms:.2f} | {r.speedup_vs_torch:.1f} | {number(r.speedup_vs_compile, 1)} | "
                f"{100 * r.bandwidth_fraction:.0f}% |")
        if with_free:
            line += f" {number(r.free_ms, 2)} | {number(r.ceiling_vs_torch, 1)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(r.batch for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, passes in zip(axes, ("forward", "forward+backward")):
        for case in dict.fromkeys(r.case for r in rows):
            sel = [r for r in rows if r.case == case and r.passes == passes and r.batch == largest]
            if sel:
                ax.plot([r.k for r in sel], [r.speedup_vs_torch for r in sel], marker="o", label=case)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("event size k")
        ax.set_title(f"{passes}, B={largest}")
    axes[0].set_ylabel("speed-up over torch.distributions")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_grid_arguments(parser: argparse.ArgumentParser, cases, ks, name_stem: str) -> None:
    """The command line every CPU benchmark shares."""
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--k", type=int, nargs="+", default=ks)
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=cases)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for every column (default: all of this machine's)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON, markdown, plot")
    parser.add_argument("--name", default=None, help=f"file name stem of the results (default: {name_stem}_<threads>t)")
    parser.set_defaults(name_stem=name_stem)


def run_grid(args, title: str, run_cell) -> list[Row]:
    """Times every (case, B, k, passes) cell with run_cell(case, batch, k, passes, compile,
    min_run_time) -> (torch ms, compile ms, fusedgauss ms, bytes[, free ms]), prints the table
    and writes JSON, markdown and a plot named after args.name."""
    if args.name is None:
        args.name = f"{args.name_stem}_{args.threads}t"
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 256
    bandwidth = measure_copy_bandwidth(args.min_run_time)
    meta = {
        "title": title,
        "date": datetime.date.today().isoformat(),
        "cpu": fusedgauss.backends.cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fusedgauss": fusedgauss.__version__,
        "backend": fusedgauss.backends.default_backend("cpu"),
        "cpu_simd": fusedgauss.backends.cpu_simd_level(),
        "rounds": ROUNDS,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "python": platform.python_version(),
    }

    grid = [(c, b, k, p) for c in args.cases for b in args.batch for k in args.k
            for p in ("forward", "forward+backward")]
    rows = []
    for case, batch, k, passes in tqdm(grid, desc="benchmark", unit="cell"):
        torch_ms, compile_ms, fused_ms, moved, *free = run_cell(
            case, batch, k, passes, not args.no_compile, args.min_run_time
        )
        free_ms = free[0] if free else None
        rows.append(Row(
            case=case, k=k, batch=batch, passes=passes,
            torch_ms=torch_ms, compile_ms=compile_ms, fusedgauss_ms=fused_ms,
            speedup_vs_torch=torch_ms / fused_ms,
            speedup_vs_compile=compile_ms / fused_ms if compile_ms is not None else None,
            bytes_moved=moved, bandwidth_fraction=moved / (fused_ms * 1e-3) / bandwidth,
            free_ms=free_ms, ceiling_vs_torch=torch_ms / free_ms if free_ms is not None else None,
        ))

    markdown = to_markdown(rows, meta)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown)
    plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.json, .md and .png")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=4096, k in {2, 6}")
    add_grid_arguments(parser, CASES, [2, 6, 17, 32], "cpu_ops")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.k = [4096], [2, 6]
    run_grid(args, "CPU benchmark: fusedgauss vs torch.distributions", run_cell)


if __name__ == "__main__":
    main()
