"""``batchnorm demo``: Algorithm 2 end to end on a small network, in seconds on a CPU.

Train a BN MLP on a synthetic classification task, then
1. evaluate with the moving averages kept during training,
2. ``recalibrate``: replace them by exact population statistics (Algorithm 2, step 10),
3. ``fold``: merge every BN into the preceding Linear (Algorithm 2, step 11)
and check that the folded network computes the same function.

Ctrl-C stops it after the current step (it has no checkpoints: the losses printed so far are
its history) with exit status 130.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import batchnorm
from batchnorm.repro import interrupt
from batchnorm.repro.common import check_arguments, seed_everything

CONFIG = dict(steps=300, batch_size=64, lr=0.5, width=64, features=20, classes=4, seed=0)


def make_task(n: int, centers: torch.Tensor, generator: torch.Generator):
    """Gaussian clusters with an offset and uneven scales: BN has something to normalize."""
    classes, features = centers.shape
    labels = torch.randint(classes, (n,), generator=generator)
    scales = torch.logspace(-1, 1, features)
    x = (centers[labels] + 2 * torch.randn(n, features, generator=generator)) * scales + 5
    return x, labels


def make_model(features: int, width: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, width, bias=False), batchnorm.BatchNorm1d(width), nn.Sigmoid(),
        nn.Linear(width, width, bias=False), batchnorm.BatchNorm1d(width), nn.Sigmoid(),
        nn.Linear(width, classes),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def add_arguments(parser) -> None:
    for key, value in CONFIG.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)


def run(args) -> int:
    check_arguments(args, at_least=dict(steps=1, batch_size=2, width=1, features=1, classes=2),
                    positive=("lr",))
    start = time.perf_counter()
    generator = seed_everything(args.seed)
    centers = torch.randn(args.classes, args.features, generator=generator)
    x_train, y_train = make_task(20_000, centers, generator)
    x_test, y_test = make_task(5_000, centers, generator)
    model = make_model(args.features, args.width, args.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        index = torch.randint(len(x_train), (args.batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        interrupt.pause_point(step)
        if step % 100 == 0 or step == args.steps or interrupt.requested():
            print(f"step {step:5d}  training loss {loss.item():.4f}", flush=True)
        interrupt.stop_if_requested(args, f"at step {step} of {args.steps}")
    model.eval()
    acc_moving = accuracy(model, x_test, y_test)
    batches = [x_train[i : i + args.batch_size] for i in range(0, 10_000, args.batch_size)]
    batchnorm.recalibrate(model, batches, progress=False)
    acc_population = accuracy(model, x_test, y_test)
    folded, report = batchnorm.fold(model, report=True)
    with torch.no_grad():
        reference_out, folded_out = model(x_test), folded(x_test)
    difference = float((folded_out - reference_out).norm() / reference_out.norm())
    print(f"test accuracy, moving-average statistics : {acc_moving:.4f}")
    print(f"test accuracy, population statistics     : {acc_population:.4f} "
          f"({len(batches)} batches of {args.batch_size}, recalibrate)")
    print(f"folded {len(report.folded)} BN layers into {[a for a, _ in report.folded]}; "
          f"unfolded: {report.unfolded or 'none'}")
    print(f"folded vs unfolded outputs: relative difference {difference:.2e} "
          f"({'agree' if difference < 1e-5 else 'DISAGREE'})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if difference < 1e-5 else 1
