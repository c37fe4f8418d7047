"""``batchnorm reproduce mnist``: the paper's Figure 1 (section 4.1).

Protocol (the paper's): 28x28 images (pixels scaled to [0, 1]) -> three fully connected hidden
layers of 100 sigmoid units -> 10 logits, cross-entropy, weights ~ N(0, init_std^2), biases 0;
plain SGD, 50,000 steps of 60 examples. The second network adds BN before every sigmoid and
drops the hidden layers' biases (:func:`batchnorm.models.mlp.sigmoid_mlp`). Both networks start
from the same weights and see the same mini-batches (one permutation of the training set per
epoch, drawn from ``--seed``), with the same learning rate and initial scale.

Every ``--eval-every`` steps both are evaluated on the whole test set, the BN network in eval
mode (population statistics = the moving averages kept during training). During that pass
:class:`batchnorm.monitor.ActivationMonitor` records the 15th/50th/85th percentiles (over the
test images) of the input of every sigmoid of the last hidden layer. The "typical" sigmoid
shown in Figure 1(b, c) is chosen afterwards by a fixed rule, per network: the unit whose
median moves the median amount over training (the middle unit, 51st of 100, when the units
are ordered by the range of their median); statistics over all 100 units are reported too.

At the end the BN network's test accuracy is reported three ways: with the moving averages,
with exact population statistics (:func:`batchnorm.recalibrate` over the training set in
mini-batches of ``--batch-size``; Algorithm 2) and with batch statistics (train-mode forward
of consecutive test batches of ``--batch-size``, running statistics left untouched).

``--sweep`` first chooses the learning rate and initial standard deviation: every pair of
``--sweep-lrs`` x ``--sweep-stds`` trains both networks for ``--sweep-steps`` steps on the
training set minus a held-out validation set (the test set is not used) and the pair with the
best validation accuracy *of the network without BN* is kept (the baseline's best setting, so
that BN's advantage is not an artefact of tuning for it). The defaults are what this found on
Fashion-MNIST (see ``results/mnist-protocol-fashion``).

Writes ``figure1.png``, ``metrics.json``, ``metrics.csv`` and ``summary.md`` to ``--out``
(:mod:`batchnorm.repro.mnist_report`); training is the shared
:class:`~batchnorm.repro.trainer.Trainer` with this protocol's loss, batches and evaluation
(:class:`Figure1Trainer`).
Under ``torchrun --nproc_per_node=N`` it runs data-parallel: each global mini-batch is split
across the processes, the model is wrapped in DistributedDataParallel with synchronized BN, and
only rank 0 writes files and shows progress.
"""


from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.data import MissingDataError, load_idx_dataset
from batchnorm.models.mlp import sigmoid_mlp
from batchnorm.monitor import ActivationMonitor
from batchnorm.repro import interrupt, seeds
from batchnorm.repro.common import (
    ArgumentError,
    add_data_arguments,
    check_arguments,
    is_main_process,
    log,
    moved_names,
    parse_numbers,
    prepare_out_dir,
    seed_everything,
    setup_run,
    shard,
    world_size,
)
from batchnorm.repro.evaluation import accuracy, batch_statistics, three_ways
from batchnorm.repro.mnist_report import (
    MILESTONES,
    NETWORKS,
    PAPER,
    analyse,
    write_outputs,
    write_seeds,
)
from batchnorm.repro.report import format_value
from batchnorm.repro.trainer import Trainer, TrainSpec, synchronized

DEFAULTS = dict(steps=50_000, batch_size=60, lr=1.0, init_std=0.1, seed=0, eval_every=250)
SWEEP_DEFAULTS = dict(lrs="0.1,0.3,1,3", stds="0.01,0.03,0.1", steps=3000, validation=10_000)
HIDDEN = (100, 100, 100)
WATCHED = f"sigmoid{len(HIDDEN)}"  # input of the last hidden layer's sigmoids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"],
                        help="mnist (the paper's) or fashion-mnist (same format and protocol)")
    add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                        help="training steps per network (paper: 50,000)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="global mini-batch size (split across processes)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"SGD learning rate, both networks (default {DEFAULTS['lr']})")
    parser.add_argument("--init-std", type=float, default=None,
                        help="standard deviation of the initial weights, both networks "
                             f"(default {DEFAULTS['init_std']})")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="initial weights and mini-batch order (same seed, same numbers)")
    parser.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"],
                        help="evaluate on the test set every this many steps")
    seeds.add_arguments(parser)
    parser.add_argument("--out", default="results/mnist", help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (0: torch's default); one is "
                             "fastest for this small network")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    sweep = parser.add_argument_group("learning-rate / init sweep (--sweep)")
    sweep.add_argument("--sweep", action="store_true",
                       help="choose --lr and --init-std by a short sweep on held-out training "
                            "data first")
    sweep.add_argument("--sweep-lrs", default=SWEEP_DEFAULTS["lrs"],
                       help="comma-separated learning rates to try")
    sweep.add_argument("--sweep-stds", default=SWEEP_DEFAULTS["stds"],
                       help="comma-separated initial standard deviations to try")
    sweep.add_argument("--sweep-steps", type=int, default=SWEEP_DEFAULTS["steps"],
                       help="training steps per network and pair")
    sweep.add_argument("--sweep-validation", type=int, default=SWEEP_DEFAULTS["validation"],
                       help="training images held out to score the sweep")


def check(args) -> None:
    """:class:`~batchnorm.repro.common.ArgumentError` for arguments the protocol cannot run."""
    check_arguments(args, at_least=dict(steps=1, batch_size=2, eval_every=1, sweep_steps=1),
                    positive=("lr", "init_std"))
    if args.sweep and (args.lr is not None or args.init_std is not None):
        raise ArgumentError("--sweep chooses --lr and --init-std; give either --sweep or them")
    if args.sweep:
        parse_numbers(args.sweep_lrs, "--sweep-lrs")
        parse_numbers(args.sweep_stds, "--sweep-stds")
    if args.batch_size < 2 * world_size():
        raise ArgumentError(f"--batch-size {args.batch_size} is too small for {world_size()} "
                            "processes: each needs at least 2 examples")


# --------------------------------------------------------------------------------------------
# the run


def run(args) -> int:
    """The command: one run into ``--out``, or with ``--seeds N > 1`` one per seed into
    ``OUT/seed-<s>/`` and their summary (:func:`batchnorm.repro.mnist_report.write_seeds`)."""
    return seeds.run_command(args, run_one, "mnist", write_seeds)


def run_one(args) -> int:
    """One seed: train both networks and write the outputs to ``--out``."""
    started = time.perf_counter()
    device = setup_run(args)
    check(args)  # after joining the process group: the batch is split across it
    seed_everything(args.seed)
    data = _load_once(args)
    if data is None:
        return 2
    loaded = time.perf_counter()
    out = prepare_out_dir(args.out)
    lr, init_std, source, sweep = choose_hyperparameters(args, data, device)
    swept = time.perf_counter()
    log(f"mnist: {data.name}, {len(data.y_train)} train / {len(data.y_test)} test, "
        f"{args.steps} steps of {args.batch_size}, lr {lr:g}, init std {init_std:g}, "
        f"{device}" + (f" x {world_size()} processes" if world_size() > 1 else ""))
    results, timing = train_both(args, data, device, lr, init_std)
    final = three_ways(results["bn"]["model"], data.x_test.to(device), data.y_test.to(device),
                       data.x_train.to(device), args.batch_size)
    timing.update(load_s=round(loaded - started, 1), sweep_s=round(swept - loaded, 1),
                  total_s=round(time.perf_counter() - started, 1))
    analysis = {key: analyse(results[key], WATCHED) for key in results}
    analysis["bn"]["final"] = final
    config = dict(
        dataset=data.name, train_examples=len(data.y_train), test_examples=len(data.y_test),
        network=f"{data.x_train.shape[1]}-" + "-".join(map(str, HIDDEN)) + "-10, sigmoid",
        steps=args.steps, batch_size=args.batch_size, lr=lr, init_std=init_std,
        hyperparameter_source=source, seed=args.seed, eval_every=args.eval_every,
        device=str(device), processes=world_size(),
        threads=torch.get_num_threads(), torch=torch.__version__,
        command=_command(args, lr, init_std),
    )
    metrics = dict(experiment="mnist (Figure 1)", config=config, timing=timing, paper=PAPER,
                   networks={k: dict(analysis[k], history=results[k]["history"])
                             for k in results},
                   sweep=sweep)
    if is_main_process():
        write_outputs(out, metrics)
    return 0


def choose_hyperparameters(args, data: Data, device) -> tuple[float, float, str, dict | None]:
    """Learning rate, initial standard deviation, where they come from, and the sweep (when
    ``--sweep`` chose them)."""
    if args.sweep:
        sweep = run_sweep(args, data, device)
        return (sweep["chosen"]["lr"], sweep["chosen"]["init_std"],
                f"chosen by the sweep ({sweep['criterion']})", sweep)
    lr = DEFAULTS["lr"] if args.lr is None else args.lr
    init_std = DEFAULTS["init_std"] if args.init_std is None else args.init_std
    source = ("command line" if args.lr is not None or args.init_std is not None
              else "defaults (chosen by the sweep on Fashion-MNIST, see the README)")
    return lr, init_std, source, None


def train_both(args, data: Data, device, lr: float, init_std: float) -> tuple[dict, dict]:
    """Both networks, one after the other; their results and training times."""
    eval_at = eval_schedule(args.steps, args.eval_every)
    results, timing = {}, {}
    for key, bn in (("no_bn", False), ("bn", True)):
        begin = time.perf_counter()
        results[key] = train_network(bn, data, steps=args.steps, batch_size=args.batch_size,
                                     lr=lr, init_std=init_std, seed=args.seed, eval_at=eval_at,
                                     label=NETWORKS[key], device=device,
                                     progress=args.progress)
        timing[f"train_{key}_s"] = round(time.perf_counter() - begin, 1)
        interrupt.stop_if_requested(
            args, f"at step {results[key]['steps_done']} of {NETWORKS[key]}",
            partial=dict(experiment="mnist", lr=lr, init_std=init_std,
                         histories={k: r["history"] for k, r in results.items()}))
    return results, timing


def run_sweep(args, data: Data, device) -> dict:
    """Both networks for every (lr, init_std) pair, scored on held-out training images."""
    lrs = parse_numbers(args.sweep_lrs, "--sweep-lrs")
    stds = parse_numbers(args.sweep_stds, "--sweep-stds")
    split = holdout(data, args.sweep_validation, args.seed)
    rows = []
    for k, (init_std, lr) in enumerate((s, r) for s in stds for r in lrs):
        row = dict(lr=lr, init_std=init_std)
        for key, bn in (("no_bn", False), ("bn", True)):
            result = train_network(bn, split, steps=args.sweep_steps,
                                   batch_size=args.batch_size, lr=lr, init_std=init_std,
                                   seed=args.seed, eval_at=[args.sweep_steps], device=device,
                                   label=f"sweep {k + 1}/{len(lrs) * len(stds)} lr={lr:g} "
                                         f"std={init_std:g} {NETWORKS[key]}",
                                   progress=args.progress, watch=False)
            last = result["history"][-1]
            finite = last["train_loss"] is not None and math.isfinite(last["train_loss"])
            row[f"{key}_validation_accuracy"] = last["test_accuracy"] if finite else None
        rows.append(row)
        interrupt.stop_if_requested(args, f"during the --sweep, at lr={lr:g} "
                                    f"init_std={init_std:g}", partial=dict(sweep_rows=rows))
        log(f"sweep lr={lr:g} init_std={init_std:g}: validation accuracy without BN "
            f"{format_value(row['no_bn_validation_accuracy'])}, with BN "
            f"{format_value(row['bn_validation_accuracy'])}")
    scored = [r for r in rows if r["no_bn_validation_accuracy"] is not None]
    if not scored:
        raise RuntimeError("sweep: the network without BN diverged at every setting; try "
                           "smaller --sweep-lrs")
    best = max(scored, key=lambda r: (r["no_bn_validation_accuracy"],
                                      r["bn_validation_accuracy"] or 0.0))
    return dict(steps=args.sweep_steps, validation_examples=args.sweep_validation,
                criterion="highest validation accuracy of the network without BN", rows=rows,
                chosen=dict(lr=best["lr"], init_std=best["init_std"]))


def _command(args, lr: float, init_std: float) -> str:
    """The command that reproduces this run (every setting spelled out)."""
    parts = ["batchnorm reproduce mnist", f"--dataset {args.dataset}"]
    if args.data_dir:
        parts.append(f"--data-dir {args.data_dir}")
    parts += [f"--steps {args.steps}", f"--batch-size {args.batch_size}"]
    if args.sweep:
        parts += ["--sweep", f"--sweep-lrs {args.sweep_lrs}", f"--sweep-stds {args.sweep_stds}",
                  f"--sweep-steps {args.sweep_steps}",
                  f"--sweep-validation {args.sweep_validation}"]
    else:
        parts += [f"--lr {lr:g}", f"--init-std {init_std:g}"]
    parts += [f"--seed {args.seed}", f"--eval-every {args.eval_every}", f"--out {args.out}"]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Data:
    name: str
    x_train: torch.Tensor  # float32 (N, 784) in [0, 1]
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(dataset: str, data_dir: str | None, *, download: bool = True,
              progress: bool = True) -> Data:
    """Training and test split of ``dataset`` as flat float tensors in [0, 1]."""
    def flat(split):
        images, labels = load_idx_dataset(dataset, split, data_dir, download=download,
                                          progress=progress)
        return images.reshape(len(images), -1).float().div_(255.0), labels

    x_train, y_train = flat("train")
    x_test, y_test = flat("test")
    return Data(dataset, x_train, y_train, x_test, y_test)


def holdout(data: Data, n_validation: int, seed: int) -> Data:
    """Training set minus ``n_validation`` random examples, which become the "test" set."""
    if not 0 < n_validation < len(data.y_train):
        raise ArgumentError(f"--sweep-validation must be in 1..{len(data.y_train) - 1}, got "
                            f"{n_validation}")
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    keep, held = order[n_validation:], order[:n_validation]
    return Data(data.name, data.x_train[keep], data.y_train[keep], data.x_train[held],
                data.y_train[held])


def _load_once(args) -> Data | None:
    """Rank 0 loads (and downloads) first; the other processes then read the verified files.
    ``None`` (after saying what is missing) without the files."""
    dist = torch.distributed
    waiting = world_size() > 1 and not is_main_process()
    try:
        if waiting:
            dist.barrier()
        data = load_data(args.dataset, args.data_dir, download=args.download and not waiting,
                         progress=args.progress and is_main_process())
        if world_size() > 1 and is_main_process():
            dist.barrier()
    except MissingDataError as error:
        if is_main_process():
            hint = ("\nNo MNIST training files? Fashion-MNIST has MNIST's format and sizes: "
                    "run the identical protocol with --dataset fashion-mnist (on Debian/Ubuntu: "
                    "apt-get install dataset-fashion-mnist, which is found without --data-dir)."
                    if args.dataset == "mnist" else "")
            print(f"batchnorm reproduce mnist: {error}{hint}", file=sys.stderr)
        return None
    return data


# --------------------------------------------------------------------------------------------
# training


def eval_schedule(steps: int, every: int) -> list[int]:
    """Step 0, every ``every`` steps, the milestones within the run, and the last step."""
    points = set(range(0, steps + 1, every)) | {m for m in MILESTONES if m <= steps} | {steps}
    return sorted(points)


class Figure1Trainer(Trainer):
    """The protocol's training: plain SGD on the cross-entropy of the global mini-batch, the
    mini-batches of one seeded permutation of the training set per epoch, evaluation on the
    whole test set with the watched sigmoid inputs recorded (``monitor``)."""

    def __init__(self, net: nn.Module, spec: TrainSpec, data: Data, device,
                 order: torch.Generator, monitor: ActivationMonitor | None):
        super().__init__(net, spec, device=device)
        self.x, self.y = data.x_train.to(device), data.y_train.to(device)
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.order = order
        self.monitor = monitor
        # the summed loss, scaled so that DDP's average over processes is the global batch mean
        self.scale = world_size() / spec.batch_size

    def loss(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y, reduction="sum") * self.scale

    def batches(self, start: int):
        n, size = len(self.y), self.spec.batch_size
        per_epoch = n // size
        for _ in range(start // per_epoch):  # the permutations of the epochs before start
            torch.randperm(n, generator=self.order)
        permutation = None
        for step in itertools.count(start):
            i = step % per_epoch
            if i == 0 or permutation is None:
                permutation = torch.randperm(n, generator=self.order).to(self.device)
            index = shard(permutation[i * size:(i + 1) * size])
            yield self.x[index], self.y[index]

    def evaluate(self) -> float:
        model = self.model
        model.eval()
        acc = accuracy(model, self.x_test, self.y_test)
        if self.monitor is not None:
            # the sigmoid inputs the current weights produce on the test images: BN normalizes
            # with these images' own statistics, not with the lagging moving averages
            with batch_statistics(model), self.monitor.record(self.state.step):
                model(self.x_test)
        model.train()
        return acc


def train_network(bn: bool, data: Data, *, steps: int, batch_size: int, lr: float,
                  init_std: float, seed: int, eval_at: list[int], label: str, device,
                  progress: bool = True, watch: bool = True) -> dict:
    """Train one network, evaluated at the steps ``eval_at`` (and the last); returns its
    history (one point per evaluation), the trained model (unwrapped), the monitor (if
    ``watch``) and the step at which the loss stopped being finite, if it did (training
    stops at the first evaluation that sees it)."""
    init = torch.Generator().manual_seed(seed + 1)  # same weights for both networks
    order = torch.Generator().manual_seed(seed)  # same mini-batches for both networks
    net = sigmoid_mlp(data.x_train.shape[1], 10, HIDDEN, bn=bn, init_std=init_std,
                      generator=init).to(device)
    if world_size() > 1:  # statistics over the global mini-batch, as on one process
        net = synchronized(net)
    monitor = ActivationMonitor(net, [WATCHED]) if watch else None
    spec = TrainSpec(steps=steps, batch_size=batch_size, lr=lr, momentum=0.0, seed=seed,
                     eval_every=steps, eval_steps=tuple(eval_at), check_every=steps,
                     flush_denormals=False, progress=progress, log_evaluations=False,
                     label=label)
    result = Figure1Trainer(net, spec, data, device, order, monitor).run()
    history = [dict(step=p["step"], test_accuracy=p["test_accuracy"], train_loss=p["train_loss"])
               for p in result["history"]]
    diverged = result["diverged"]
    return dict(history=history, model=net, monitor=monitor, steps_done=result["steps_done"],
                diverged_at=None if diverged is None else diverged["step"])


# names that moved to the shared modules (older code imports them from here)
__getattr__ = moved_names(__name__, {
    "batch_statistics_accuracy": "batchnorm.repro.evaluation.batch_statistics_accuracy",
    "THRESHOLDS": "batchnorm.repro.mnist_report.THRESHOLDS",
    "drift_statistics": "batchnorm.repro.mnist_report.drift_statistics",
})
