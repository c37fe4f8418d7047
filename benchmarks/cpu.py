"""CPU benchmark: our BN (backend="torch") against torch.nn.BatchNorm*d, training forward+backward.

    python benchmarks/cpu.py [--threads N] [--min-run-time SECONDS] [--rounds R]

Prints a table (median time per call, ratio ours / torch) and writes it to
benchmarks/results/cpu-<processor>.md and .json. Target: ratio <= 1.3 on every shape.

Shared machines drift: the two are timed in alternation for ``--rounds`` rounds and the table
reports each one's median over rounds and the median of the per-round ratios, with the
smallest and largest per-round ratio beside it.

The hardware limit is taken as the rate of ``dst.copy_(x)`` for a tensor of the same shape,
measured in the same run (so the same caches are in play): training forward+backward must move
at least five tensors of that size (read x, write y; read x and dy, write dx), a copy moves two,
so ``2.5 * copy time / our time`` is the fraction of that limit we reach, overheads included.
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


MIN_TENSORS_MOVED = 5  # forward reads x, writes y; backward reads x and dy, writes dx


def time_copy(x: torch.Tensor, min_run_time: float) -> float:
    """Median seconds of ``dst.copy_(x)``: the memory system's rate at this size."""
    dst = torch.empty_like(x)
    timer = bench.Timer(stmt="dst.copy_(x)", globals={"dst": dst, "x": x},
                        num_threads=torch.get_num_threads())
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
        ours_s = statistics.median(o for _, o in pairs)
        copy_s = time_copy(x.detach(), args.min_run_time)
        rows.append(dict(shape=label + " " + str(tuple(shape)),
                         torch_ms=statistics.median(t for t, _ in pairs) * 1e3,
                         ours_ms=ours_s * 1e3,
                         ratio=statistics.median(ratios), ratio_min=ratios[0],
                         ratio_max=ratios[-1], copy_ms=copy_s * 1e3,
                         ours_gbps=MIN_TENSORS_MOVED * x.nbytes / ours_s / 1e9,
                         fraction_of_copy=MIN_TENSORS_MOVED / 2 * copy_s / ours_s))
    device = processor_name()
    header = (f"# CPU benchmark: training forward+backward, float32\n\n"
              f"Device: {device}, {args.threads} threads, torch {torch.__version__}. "
              f"{args.rounds} alternating rounds of `torch.utils.benchmark` medians; ratio = "
              f"ours / torch, median over rounds [min, max] (target <= 1.3). Hardware limit: "
              f"the same-size copy rate, measured in this run; ours moves at least "
              f"{MIN_TENSORS_MOVED} tensors per step.\n\n"
              "| shape | torch.nn (ms) | ours (ms) | ratio [min, max] | ours GB/s | "
              "of copy rate |\n|---|---:|---:|---:|---:|---:|\n")
    table = header + "".join(
        f"| {r['shape']} | {r['torch_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.2f} "
        f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] | {r['ours_gbps']:.1f} | "
        f"{r['fraction_of_copy']:.0%} |\n" for r in rows)
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
