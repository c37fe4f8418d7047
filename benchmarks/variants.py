"""CPU benchmark of the BN family: training forward+backward of each variant against our plain BN.

    python benchmarks/variants.py [--threads 1] [--min-run-time SECONDS] [--rounds R]

Shapes are benchmarks/cpu.py's. Per shape, our ``batchnorm.BatchNorm*d`` and each variant are
timed in alternation for ``--rounds`` rounds (each a ``torch.utils.benchmark`` median over
``--min-run-time`` seconds). Reported per variant: the fastest round of each (on a shared
machine other jobs only ever add time, so the fastest round is the least disturbed) and their
ratio, and the median [min, max] over rounds of the per-round ratio. Target: ratio <= 1.2.
In-place ABN is also compared with the block it replaces, BN + leaky ReLU (our fused
``activation="leaky_relu"``).

Variants: Batch Renormalization (r_max = 3, d_max = 5 fixed, so r and d clip), Ghost BN with
4 virtual batches (``ghost_batch_size = N // 4``), frozen BN (in training mode: the fixed
affine map, gradient to the input only), in-place ABN (leaky ReLU, slope 0.01).
Writes benchmarks/results/variants-cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from cpu import SHAPES, processor_name, time_train_step

import batchnorm
import batchnorm.variants as variants

RESULTS = Path(__file__).parent / "results"
COMPARISONS = [("renorm", "BN"), ("ghost", "BN"), ("frozen", "BN"), ("inplace_abn", "BN"),
               ("inplace_abn", "BN+leaky")]


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
    for flag, kind, default in (("--threads", int, 1), ("--min-run-time", float, 0.05),
                                ("--rounds", int, 15),
                                ("--out", Path, RESULTS / "variants-cpu.md")):
        parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
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
        shape_name = f"{label} {tuple(shape)}"
        for name, base in COMPARISONS:
            ratios = sorted(t / b for t, b in zip(times[name], times[base], strict=True))
            best, best_base = min(times[name]) * 1e3, min(times[base]) * 1e3
            rows.append(f"| {shape_name} | {name} / {base} | {best_base:.3f} | {best:.3f} | "
                        f"**{best / best_base:.2f}** | {statistics.median(ratios):.2f} "
                        f"[{ratios[0]:.2f}, {ratios[-1]:.2f}] |\n")
            print(rows[-1], end="", flush=True)
    header = (
        "# BN family, CPU: training forward+backward, float32\n\n"
        f"Device: {processor_name()}, {os.cpu_count()} cores shared with other jobs (1-minute "
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), "
        f"{args.threads} thread(s), torch {torch.__version__}. Command: "
        f"`python benchmarks/variants.py --rounds {args.rounds} --min-run-time "
        f"{args.min_run_time}`. {args.rounds} alternating rounds of `torch.utils.benchmark` "
        "medians. *best*: the fastest round (other jobs only add time); *ratio of best*: "
        "variant / baseline; last column: median [min, max] of the per-round ratio. Target: "
        "<= 1.2 against plain BN. Ghost BN uses 4 virtual batches (N/4); renorm r_max = 3, "
        "d_max = 5; in-place ABN is leaky ReLU (0.01), also compared with BN + leaky ReLU.\n\n"
        "| shape | variant / baseline | baseline best (ms) | variant best (ms) | "
        "ratio of best | per-round ratio |\n|---|---|---:|---:|---:|---:|\n")
    table = header + "".join(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
