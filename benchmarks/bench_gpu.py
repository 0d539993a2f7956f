"""fusedgauss against torch.distributions on a GPU.

The GPU counterpart of bench_ops.py and bench_squashed.py, with their cases, inputs and byte
counts. For each case (bench_ops': per-sample scale_tril, shared scale_tril, per-sample
covariance; bench_squashed's with --cases: the SAC and PPO paths, DiagNormal), event size k
and batch size B, times in one run (triton.testing.do_bench medians, which flush the L2 cache between
runs; CUDA events where Triton is missing):

  torch          torch.distributions.MultivariateNormal(...).log_prob, eager
  torch.compile  the same function under torch.compile
  cuda           fusedgauss.MultivariateNormal(...).log_prob on the compiled CUDA kernels
  triton         the same on the Triton kernels, where this version has them

for the forward pass alone and for forward+backward, with speed-ups over torch and the
fraction of the measured device-to-device copy bandwidth each fused kernel reaches. A column
that fails (torch's batched triangular solve beyond about 524k right-hand sides, or memory)
is recorded with its error instead of a time.

    python benchmarks/bench_gpu.py --out DIR           # the full grid of bench_ops' cases
    python benchmarks/bench_gpu.py --quick --out DIR   # B=2^14, k in {2, 6}
    python benchmarks/bench_gpu.py --cases sac_diag sac_tril ppo_diag ppo_tril diag_normal --k 6 17 \
        --name gpu_squashed --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_ops  # noqa: E402
import bench_squashed  # noqa: E402
import fusedgauss  # noqa: E402

#: Each case's step builder (case, B, k, passes, device) and byte count (case, B, k, passes).
SUITES = {
    **{case: (bench_ops.log_prob_steps, bench_ops.bytes_moved) for case in bench_ops.CASES},
    **{case: (bench_squashed.steps, bench_squashed.bytes_moved) for case in bench_squashed.CASES},
}

FUSED_BACKENDS = ("cuda", "triton")


@dataclass
class Row:
    case: str
    k: int
    batch: int
    passes: str
    bytes_moved: int
    ms: dict[str, float | None] = field(default_factory=dict)  # column -> median ms
    errors: dict[str, str] = field(default_factory=dict)  # column -> why it has no time
    speedup_vs_torch: dict[str, float] = field(default_factory=dict)
    bandwidth_fraction: dict[str, float] = field(default_factory=dict)


def time_ms(fn) -> float:
    """Median milliseconds of fn on the GPU, warm-up and compilation excluded."""
    fn()
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 5)
    return statistics.median(times)


def measure_copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (time_ms(lambda: dst.copy_(src)) * 1e-3)


def columns(compile_torch: bool) -> list[str]:
    names = ["torch"] + (["torch.compile"] if compile_torch else [])
    return names + [b for b in FUSED_BACKENDS if fusedgauss.backends.unavailable_reason(b, "cuda") is None]


def run_cell(case, batch, k, passes, names, bandwidth) -> Row:
    make_steps, bytes_moved = SUITES[case]
    row = Row(case=case, k=k, batch=batch, passes=passes, bytes_moved=bytes_moved(case, batch, k, passes))
    # (The SAC cases' fourth step, the free one, is a CPU column.)
    torch_step, compiled_step, fused_step, *_ = make_steps(case, batch, k, passes, device="cuda")
    for name in names:
        try:
            if name == "torch":
                row.ms[name] = time_ms(torch_step)
            elif name == "torch.compile":
                row.ms[name] = time_ms(compiled_step())
            else:
                with fusedgauss.backends.use(name):
                    row.ms[name] = time_ms(fused_step)
        except (RuntimeError, torch.OutOfMemoryError) as error:  # noqa: PERF203
            row.ms[name] = None
            row.errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
    for name in names:
        ms = row.ms.get(name)
        if ms is None or name.startswith("torch"):
            continue
        if row.ms.get("torch") is not None:
            row.speedup_vs_torch[name] = row.ms["torch"] / ms
        row.bandwidth_fraction[name] = row.bytes_moved / (ms * 1e-3) / bandwidth
    return row


def to_markdown(rows: list[Row], names: list[str], meta: dict) -> str:
    fused = [n for n in names if not n.startswith("torch")]
    header = ["case", "k", "B", "passes", *(f"{n} ms" for n in names)]
    header += [f"{n} × torch" for n in fused] + [f"{n} bandwidth" for n in fused]
    lines = [
        f"# GPU benchmark: fusedgauss vs torch.distributions ({meta['date']})",
        "",
        f"{meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}, "
        f"fusedgauss {meta['fusedgauss']}; float32; device copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s; "
        f"medians of {meta['timer']}. A dash is a column that failed (see the JSON for why).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if h in ("case", "passes") else "---:" for h in header) + "|",
    ]
    for r in rows:
        cells = [r.case, str(r.k), str(r.batch), r.passes]
        cells += [f"{r.ms[n]:.3f}" if r.ms.get(n) is not None else "–" for n in names]
        cells += [f"{r.speedup_vs_torch[n]:.1f}" if n in r.speedup_vs_torch else "–" for n in fused]
        cells += [f"{100 * r.bandwidth_fraction[n]:.0f}%" if n in r.bandwidth_fraction else "–" for n in fused]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=2^14, k in {2, 6}")
    parser.add_argument("--batch", type=int, nargs="+", default=[2**14, 2**17, 2**20])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 6, 17, 32, 64])
    parser.add_argument("--cases", nargs="+", default=list(bench_ops.CASES), choices=list(SUITES))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for JSON and markdown")
    parser.add_argument("--name", default="gpu_ops", help="file name stem of the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    if args.quick:
        args.batch, args.k = [2**14], [2, 6]

    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 256
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    bandwidth = measure_copy_bandwidth()
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fusedgauss": fusedgauss.__version__,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "timer": "triton.testing.do_bench" if triton_version != "not installed" else "CUDA events",
    }
    names = columns(not args.no_compile)
    grid = [(c, b, k, p) for c in args.cases for b in args.batch for k in args.k
            for p in ("forward", "forward+backward")]
    rows = [run_cell(*cell, names, bandwidth) for cell in tqdm(grid, desc="benchmark", unit="cell")]

    markdown = to_markdown(rows, names, meta)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "columns": names, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    (args.out / f"{args.name}.md").write_text(markdown)
    print(f"wrote {args.out / args.name}.json and .md")


if __name__ == "__main__":
    main()
