"""CPU benchmark: our BN (backend="torch") against torch.nn.BatchNorm*d, training forward+backward.

    python benchmarks/cpu.py [--threads N] [--min-run-time SECONDS] [--rounds R]

Prints a table (median time per call, ratio ours / torch) and writes it to
benchmarks/results/cpu-<processor>.md and .json. Target: ratio <= 1.3 on every shape.

Shared machines drift: the two are timed in alternation for ``--rounds`` rounds and the table
reports each one's median over rounds and the median of the per-round ratios, with the
smallest and largest per-round ratio beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
from pathlib import Path

import torch
import torch.utils.benchmark as bench
from torch import nn

import batchnorm

# (label, shape, channels_last)
SHAPES = [
    ("MNIST MLP layer", (60, 100), False),
    ("wide FC", (256, 1024), False),
    ("BN1d sequence", (32, 64, 128), False),
    ("conv early", (32, 64, 28, 28), False),
    ("conv early, channels_last", (32, 64, 28, 28), True),
    ("conv late", (32, 256, 7, 7), False),
    ("conv 3d", (4, 32, 8, 16, 16), False),
]
RESULTS = Path(__file__).parent / "results"


def processor_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_class(shape):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]


def time_train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, min_run_time: float):
    """Median seconds of one training forward+backward (input and parameter gradients)."""

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(dy)

    timer = bench.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for label, shape, channels_last in SHAPES:
        x = torch.randn(shape) * 2 + 1
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn_like(x)
        theirs = torch_class(shape)(shape[1]).train()
        ours = batchnorm.convert(torch_class(shape)(shape[1])).train()
        time_train_step(ours, x, dy, 0.05)  # first use: compiles the CPU kernels
        pairs = [(time_train_step(theirs, x, dy, args.min_run_time),
                  time_train_step(ours, x, dy, args.min_run_time)) for _ in range(args.rounds)]
        ratios = sorted(o / t for t, o in pairs)
        rows.append(dict(shape=label + " " + str(tuple(shape)),
                         torch_ms=statistics.median(t for t, _ in pairs) * 1e3,
                         ours_ms=statistics.median(o for _, o in pairs) * 1e3,
                         ratio=statistics.median(ratios), ratio_min=ratios[0],
                         ratio_max=ratios[-1]))
    device = processor_name()
    header = (f"# CPU benchmark: training forward+backward, float32\n\n"
              f"Device: {device}, {args.threads} threads, torch {torch.__version__}. "
              f"{args.rounds} alternating rounds of `torch.utils.benchmark` medians; ratio = "
              f"ours / torch, median over rounds [min, max] (target <= 1.3).\n\n"
              "| shape | torch.nn (ms) | ours (ms) | ratio [min, max] |\n|---|---:|---:|---:|\n")
    table = header + "".join(
        f"| {r['shape']} | {r['torch_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.2f} "
        f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] |\n" for r in rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "cpu-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(json.dumps(
        dict(device=device, threads=args.threads, torch=torch.__version__, rows=rows), indent=2))
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
