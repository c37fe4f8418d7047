"""``batchnorm reproduce memory``: in-place activated BN (Rota Bulo, Porzi & Kontschieder 2018)
halves the memory of the BN + activation blocks, and training accuracy is unchanged.

Three ways to build every BN + activation layer of a network (:data:`VARIANTS`, passed as the
models' ``norm`` factory, :data:`batchnorm.models.blocks.NormAct`): ``bn-relu``
(``batchnorm.BatchNorm2d(c, activation="relu")``, the usual baseline), ``bn-leaky-relu``
(``activation="leaky_relu"``, slope 0.01) and ``inplace-abn``
(:class:`batchnorm.variants.InPlaceABN2d` with leaky ReLU 0.01, ``inplace=False``: the
residual network's shortcut reads the layer's input). Our BatchNorm2d applies its activation
after the normalization with the same ATen call ``nn.ReLU`` / ``nn.LeakyReLU`` make, so
autograd saves what BN followed by a separate activation layer saves: BN its input ``x``, ReLU
its output ``z``, leaky ReLU its input ``y``; in-place ABN saves only ``z`` (and per-channel
numbers). Like is compared with like: leaky ReLU 0.01 with and without in-place ABN (ReLU is
not invertible, so in-place ABN cannot use it).

Part 1, memory (:func:`measure`), for BN-Inception (:class:`~batchnorm.models.inception.
InceptionBN`, the paper's stem and 224x224 inputs by default) and the ResNet-style network of
part 2 (:class:`~batchnorm.models.resnet.PreActResNet`) on random inputs (the bytes do not
depend on the values): one training step (forward, cross-entropy, backward, SGD + momentum
step), measured after a warm-up step so the optimizer's buffers and the gradients' exist.

- saved bytes (:class:`~batchnorm.repro.saved_memory.SavedTensors`): distinct storages saved
  for the backward, parameters apart; ``block`` = those saved inside the BN + activation
  layers (every ``nn.BatchNorm2d``, which our BN and in-place ABN both are); ``shared`` = the
  block's storages that another layer saves too (ReLU's and in-place ABN's output ``z`` is the
  next convolution's saved input), so ``block - shared`` is what only the blocks keep;
- peak memory (:func:`~batchnorm.repro.saved_memory.peak_memory`) of the step (from the
  gradients' release on), above what was allocated before it.

Part 2, accuracy: the ResNet-style network trained on Fashion-MNIST (the shared
:class:`~batchnorm.repro.trainer.Trainer`: SGD + momentum, constant learning rate, test
accuracy with population statistics) with each variant of ``--variants`` from the same seed
(the same initial weights: the variants have the same parameters), for every seed of
``--seeds``, each seed a run into ``OUT/seed-<s>/`` (``--resume`` keeps finished ones); after
training, the training accuracy is measured the same way on ``--train-eval`` training
examples. The summary says, by Welch's t-test over seeds (:mod:`batchnorm.repro.seeds`),
whether in-place ABN's accuracy differs from BN + leaky ReLU's by more than seed noise.

Time: with the defaults, 1 thread, on this project's 2-core CPU shared with other jobs (load
average about 6.5), part 1 takes about 1 minute (BN-Inception at 224x224, batch 16: 16 s per
variant) and part 2 about 7 minutes per seed (0.2 s per training step, 2.5 s per evaluation on
2000 test examples): about 22 minutes for the default 3 seeds. Measured on a 100-step run of
the command (2 minutes) and extrapolated.

Writes ``figure.png``, ``results.json``, ``metrics.csv`` (one row per network and variant:
the memory numbers) and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

from batchnorm.models.inception import InceptionBN
from batchnorm.models.resnet import PreActResNet
from batchnorm.modules import BatchNorm2d
from batchnorm.repro import interrupt, memory_report, seeds, sweep
from batchnorm.repro.common import (
    ArgumentError,
    check_arguments,
    log,
    pick_device,
    prepare_out_dir,
    seed_everything,
    write_csv,
    write_json,
)
from batchnorm.repro.saved_memory import SavedTensors, peak_memory
from batchnorm.repro.trainer import TrainSpec, evaluate
from batchnorm.variants import InPlaceABN2d

#: name -> (label, factory (channels, the model's activation) -> BN + activation layer; each
#: variant fixes its own activation)
VARIANTS = {
    "bn-relu": ("BN + ReLU", lambda c, _: BatchNorm2d(c, activation="relu")),
    "bn-leaky-relu": ("BN + LeakyReLU(0.01)",
                      lambda c, _: BatchNorm2d(c, activation="leaky_relu")),
    "inplace-abn": ("InPlaceABN (leaky ReLU 0.01)",
                    lambda c, _: InPlaceABN2d(c, activation="leaky_relu", negative_slope=0.01)),
}
BASELINE, CANDIDATE = "bn-leaky-relu", "inplace-abn"
NETWORKS = ("BN-Inception", "PreActResNet")

DEFAULTS = dict(steps=900, batch_size=64, lr=0.05, momentum=0.9, width=16, blocks=2,
                train_subset=0, test_subset=2000, train_eval=5000, eval_every=100, target=0.85,
                seeds=3, variants=f"{BASELINE},{CANDIDATE}", memory_batch_size=16,
                inception_width=1.0, inception_image_size=224)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sweep.add_arguments(parser, DEFAULTS | {"out": "results/memory"})
    parser.set_defaults(seeds=DEFAULTS["seeds"])
    for option, kind, text in (
            ("lr", float, "learning rate"),
            ("width", int, "PreActResNet: channels of the first stage"),
            ("blocks", int, "PreActResNet: residual blocks per stage (3 stages)"),
            ("variants", str, f"comma-separated variants to train, of {list(VARIANTS)} (memory "
                              "is measured for all)"),
            ("train_eval", int, "training examples the final training accuracy is measured on"),
            ("memory_batch_size", int, "batch size of the memory measurements"),
            ("inception_width", float, "BN-Inception's filter multiplier (1: the paper's)"),
            ("inception_image_size", int, "BN-Inception's input size (>= 64: the paper's "
                                          "ImageNet stem; smaller: the small-image stem)")):
        parser.add_argument(f"--{option.replace('_', '-')}", type=kind, default=DEFAULTS[option],
                            help=text)


def check(args) -> list[str]:
    """The arguments' errors as :class:`ArgumentError`; returns the variants to train."""
    check_arguments(args, at_least=dict(width=1, blocks=1, train_eval=1, memory_batch_size=2,
                                        inception_image_size=8),
                    positive=("lr", "inception_width"))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise ArgumentError(f"--variants must be comma-separated names of {list(VARIANTS)}, "
                            f"got {args.variants!r}")
    return list(dict.fromkeys(names))


def network(name: str, variant: str, args, in_channels: int, num_classes: int = 10
            ) -> nn.Module:
    """``BN-Inception`` or ``PreActResNet`` with every BN + activation layer of ``variant``."""
    norm = VARIANTS[variant][1]
    if name == "BN-Inception":
        stem = "imagenet" if args.inception_image_size >= 64 else "small"
        return InceptionBN(num_classes, 3, stem=stem, width=args.inception_width, norm=norm)
    return PreActResNet(num_classes, in_channels, width=args.width, blocks=args.blocks,
                        norm=norm)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> dict:
    """Saved bytes and peak memory of one SGD + momentum step of ``model`` on ``(x, y)`` (see
    the module docstring), after a warm-up step."""
    model = model.to(device).train()
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(counter=None):
        with counter or contextlib.nullcontext():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    counter = SavedTensors(model, lambda m: isinstance(m, nn.BatchNorm2d))
    step(counter)
    optimizer.zero_grad(set_to_none=True)
    peak = peak_memory(step, device)
    return dict(counter.as_dict(), peak_bytes=peak)


def measure_all(args, in_channels: int, image_size: int) -> list[dict]:
    """:func:`measure` for every network and variant (inputs drawn from ``args.seed``)."""
    device = pick_device(args.device)
    rows = []
    for name in NETWORKS:
        if name == "BN-Inception":
            shape = (3, args.inception_image_size, args.inception_image_size)
        else:
            shape = (in_channels, image_size, image_size)
        for variant in VARIANTS:
            generator = seed_everything(args.seed)
            x = torch.randn(args.memory_batch_size, *shape, generator=generator)
            y = torch.randint(0, 10, (args.memory_batch_size,), generator=generator)
            began = time.perf_counter()
            row = dict(network=name, variant=variant, batch_size=args.memory_batch_size,
                       input_shape=list(shape),
                       **measure(network(name, variant, args, in_channels), x, y, device))
            rows.append(row)
            interrupt.stop_if_requested(args, f"while measuring {name}",
                                        partial=dict(experiment="memory", memory=rows))
            log(f"memory: {name}, {VARIANTS[variant][0]}: saved {row['total_bytes'] / 2**20:.1f} "
                f"MiB, of which BN+act blocks {row['block_bytes'] / 2**20:.1f} MiB; peak "
                f"{row['peak_bytes'] / 2**20:.1f} MiB ({time.perf_counter() - began:.1f} s)")
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per network, in-place ABN's numbers over each plain variant's."""
    table = {(r["network"], r["variant"]): r for r in rows}
    out = []
    for name in NETWORKS:
        abn = table[(name, CANDIDATE)]
        for base in (BASELINE, "bn-relu"):
            b = table[(name, base)]
            out.append(dict(network=name, baseline=base, **{
                f"{k}_ratio": abn[k] / b[k] if b[k] else None
                for k in ("block_bytes", "total_bytes", "peak_bytes")}))
    return out


def train_seed(args, variants: list[str]) -> int:
    """One seed of part 2: each variant trained from this seed into ``args.out``."""
    data = sweep.load(args)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    began = time.perf_counter()
    device = pick_device(args.device)
    n_train = min(args.train_eval, data.sizes()[0])
    train_part = (data.train[0][:n_train], data.train[1][:n_train])
    runs = []
    for i, variant in enumerate(variants):
        label = f"{VARIANTS[variant][0]} ({i + 1}/{len(variants)}, seed {args.seed})"
        seed_everything(args.seed)
        model = network("PreActResNet", variant, args, data.in_channels, data.num_classes)
        result = sweep.train_run(model, data, args, lr=args.lr, label=label)
        spec = TrainSpec(steps=1, seed=args.seed, progress=False)
        result["train_accuracy"] = evaluate(model, train_part, device, spec)
        runs.append(dict(variant=variant, **result))
        interrupt.stop_if_requested(args, f"after {label}",
                                    partial=dict(experiment="memory", runs=runs))
        log(f"memory: {label}: final test accuracy {result['final_accuracy']:.4f}, training "
            f"accuracy {result['train_accuracy']:.4f} ({result['seconds']:.0f} s)")
    record = sweep.config(args, data, began, lr=args.lr, width=args.width, blocks=args.blocks,
                          variants=variants, train_eval=n_train)
    write_json(out / "results.json", dict(experiment="memory", config=record, runs=runs))
    write_csv(out / "metrics.csv", [dict(variant=r["variant"], **p)
                                    for r in runs for p in r["history"]])
    return 0


def run(args) -> int:
    variants = check(args)
    data = sweep.load(args)  # checks the shared arguments, sets --threads; the input shapes
    # (and missing data fails before the measurements)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    began = time.perf_counter()
    rows = measure_all(args, data.in_channels, data.image_size)
    memory_seconds = time.perf_counter() - began
    return seeds.run_command(
        args, lambda one: train_seed(one, variants), "memory",
        lambda out_, folders, seconds: memory_report.write(
            out, args, rows, ratios(rows), seeds.read_seeds(folders, "results.json"),
            labels={name: label for name, (label, _) in VARIANTS.items()},
            pair=(BASELINE, CANDIDATE), seconds=memory_seconds + seconds),
        folders_for_one=True)
