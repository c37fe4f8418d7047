"""Compiled training step on the CPU: our BN against torch.nn's, both under torch.compile.

    python benchmarks/compile.py [--threads N] [--rounds R] [--steps S] [--eager]

Two networks, each built once with ``torch.nn.BatchNorm*d`` and once converted to ours
(``batchnorm.convert``, the same weights): a small CNN (three conv-BN-ReLU blocks and a linear
layer, batch 32 of 3x32x32) and a ResNet-18-sized network (torchvision's layout: a 7x7 stem,
BasicBlocks [2, 2, 2, 2] of widths 64-512, batch 8 of 3x64x64). One training step is
``zero_grad``, forward, cross-entropy, backward and an SGD step, with the model compiled by
``torch.compile`` (Inductor, default mode). Inside a compiled graph our layers are plain ATen
operations (:mod:`batchnorm.backends.composite`) that Inductor fuses like its own BN
decomposition; ``--eager`` adds the uncompiled steps (ours: the fused C++ kernels) for context.

Shared machines drift: after warm-up (compilation included) the two are timed in alternation
for ``--rounds`` rounds of ``--steps`` steps; the table gives each one's median step time and
the median per-round ratio ours / torch with its range (target <= 1.0). Writes
``benchmarks/results/compile-cpu.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from cpu import processor_name
from torch import nn

import batchnorm

RESULTS = Path(__file__).parent / "results"


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BN and a shortcut (1x1 conv + BN when it reshapes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(),
                                  *conv_bn(cout, cout))
        self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers, cin = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(*conv_bn(3, 32), nn.ReLU(), *conv_bn(32, 64, 3, 2), nn.ReLU(),
                         *conv_bn(64, 64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, classes))


NETWORKS = {"small CNN": (small_cnn, (32, 3, 32, 32)), "ResNet-18": (resnet18, (8, 3, 64, 64))}


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, compiled: bool):
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), target).backward()
        optimizer.step()

    return step


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def compare(build, shape, compiled: bool, rounds: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    theirs = build().train()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x = torch.randn(shape)
    target = torch.randint(0, 10, (shape[0],))
    pair = {"torch": make_step(theirs, x, target, compiled),
            "ours": make_step(ours, x, target, compiled)}
    for name, step in pair.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        print(f"  {name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    times = {"torch": [], "ours": []}
    for r in range(rounds):
        for name in (("torch", "ours") if r % 2 == 0 else ("ours", "torch")):
            times[name].append(seconds_per_step(pair[name], steps))
    ratios = sorted(o / t for t, o in zip(times["torch"], times["ours"], strict=True))
    return dict(torch_ms=statistics.median(times["torch"]) * 1e3,
                ours_ms=statistics.median(times["ours"]) * 1e3,
                ratio=statistics.median(ratios), ratio_min=ratios[0], ratio_max=ratios[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, compile included")
    parser.add_argument("--eager", action="store_true", help="also time the uncompiled steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, (build, shape) in NETWORKS.items():
        for compiled in (True, False) if args.eager else (True,):
            mode = "torch.compile" if compiled else "eager"
            print(f"{label}, {mode}", flush=True)
            row = compare(build, shape, compiled, args.rounds, args.steps, args.warmup)
            rows.append(dict(network=f"{label} {tuple(shape)}", mode=mode, **row))
    device = processor_name()
    table = (
        "# Compiled training step on the CPU: our BN against torch.nn's\n\n"
        f"Device: {device}, {args.threads} threads, torch {torch.__version__}. Step: zero_grad, "
        "forward, cross-entropy, backward, SGD; float32; the model under `torch.compile` "
        f"(Inductor). {args.rounds} alternating rounds of {args.steps} steps after "
        f"{args.warmup} warm-up steps; ratio = ours / torch, median over rounds [min, max] "
        "(target <= 1.0).\n\n"
        "| network (input) | mode | torch.nn (ms/step) | ours (ms/step) | ratio [min, max] |\n"
        "|---|---|---:|---:|---:|\n"
    ) + "".join(
        f"| {r['network']} | {r['mode']} | {r['torch_ms']:.1f} | {r['ours_ms']:.1f} | "
        f"{r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] |\n" for r in rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile-cpu.md").write_text(table)
    (args.out / "compile-cpu.json").write_text(json.dumps(
        dict(device=device, threads=args.threads, torch=torch.__version__, rows=rows), indent=2))
    print(f"wrote {args.out / 'compile-cpu'}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
