"""CPU benchmark of the BN family: training forward+backward of each variant against our plain BN.

    python benchmarks/variants.py [--threads 1] [--min-run-time SECONDS] [--rounds R]

Shapes are benchmarks/cpu.py's. Per shape, our ``batchnorm.BatchNorm*d`` and each variant are
timed in alternation for ``--rounds`` rounds (``torch.utils.benchmark`` median per round); the
table gives each one's median time and the median of its per-round ratio to plain BN, with the
smallest and largest per-round ratio. Target: ratio <= 1.2. In-place ABN is also compared with
the block it replaces, BN + leaky ReLU (our fused ``activation="leaky_relu"``).

Variants: Batch Renormalization (r_max = 3, d_max = 5 fixed, so r and d clip), Ghost BN with
4 virtual batches (``ghost_batch_size = N // 4``), frozen BN (in training mode: the fixed
affine map, gradient to the input only), in-place ABN (leaky ReLU, slope 0.01).
Writes benchmarks/results/variants-cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from cpu import SHAPES, processor_name, time_train_step

import batchnorm
import batchnorm.variants as variants

RESULTS = Path(__file__).parent / "results"


def contenders(shape) -> dict[str, torch.nn.Module]:
    """Plain BN, BN + leaky ReLU and the variants, for an input of ``shape``."""
    c, n = shape[1], shape[0]
    rank = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]

    def cls(prefix: str, where=variants):
        return getattr(where, f"{prefix}{rank}d")

    return {
        "BN": cls("BatchNorm", batchnorm)(c),
        "BN+leaky": cls("BatchNorm", batchnorm)(c, activation="leaky_relu"),
        "renorm": cls("BatchRenorm")(c, r_max=3.0, d_max=5.0),
        "ghost": cls("GhostBatchNorm")(c, ghost_batch_size=max(1, n // 4)),
        "frozen": variants.FrozenBatchNorm.from_batchnorm(cls("BatchNorm", batchnorm)(c)),
        "inplace_abn": cls("InPlaceABN")(c),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (("--threads", int, 1), ("--min-run-time", float, 0.2),
                                ("--rounds", int, 5),
                                ("--out", Path, RESULTS / "variants-cpu.md")):
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for label, shape, channels_last in SHAPES:
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = (torch.randn(shape) * 2 + 1).to(memory_format=layout).requires_grad_()
        dy = torch.randn_like(x)
        modules = {name: m.train() for name, m in contenders(shape).items()}
        for m in modules.values():
            time_train_step(m, x, dy, 0.02)  # warm up (and build the CPU kernels once)
        times = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, m in modules.items():
                times[name].append(time_train_step(m, x, dy, args.min_run_time))
        row = {"shape": f"{label} {tuple(shape)}"}
        for name, ts in times.items():
            ratios = sorted(t / b for t, b in zip(ts, times["BN"], strict=True))
            row[name] = (statistics.median(ts) * 1e3, statistics.median(ratios), ratios[0],
                         ratios[-1])
        leaky = sorted(a / b for a, b in zip(times["inplace_abn"], times["BN+leaky"],
                                             strict=True))
        row["abn_vs_leaky"] = (statistics.median(leaky), leaky[0], leaky[-1])
        rows.append(row)
        print(row, flush=True)
    names = ["renorm", "ghost", "frozen", "inplace_abn"]
    header = (
        "# BN family, CPU: training forward+backward, float32\n\n"
        f"Device: {processor_name()} (2-core VM shared with other jobs), {args.threads} "
        f"thread(s), torch {torch.__version__}. `python benchmarks/variants.py --rounds "
        f"{args.rounds} --min-run-time {args.min_run_time}`: {args.rounds} alternating rounds of "
        "`torch.utils.benchmark` medians. Each cell: median ms, and the median [min, max] over "
        "rounds of the ratio to our plain BN on the same input (target <= 1.2). The last column "
        "compares in-place ABN (leaky ReLU) with the block it replaces, BN + leaky ReLU.\n\n"
        "| shape | BN (ms) | renorm | ghost (N/4) | frozen | in-place ABN | ABN / (BN+leaky) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for row in rows:
        cells = [f"{row['BN'][0]:.3f}"]
        for name in names:
            ms, ratio, lo, hi = row[name]
            cells.append(f"{ms:.3f} ({ratio:.2f} [{lo:.2f}, {hi:.2f}])")
        ratio, lo, hi = row["abn_vs_leaky"]
        cells.append(f"{ratio:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + " |\n")
    table = header + "".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
