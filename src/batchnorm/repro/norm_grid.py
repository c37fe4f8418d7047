"""Grids of runs that compare normalizations: the same small CNN
(:class:`~batchnorm.models.convnet.SmallConvNet`) with BN, Batch Renorm or Ghost BN in every
convolution unit, under several batch sizes and batch orders (``small-batch``, ``ghost``).

A :class:`Condition` is one run: its group (``i.i.d.``, ``non-i.i.d.``, ``small``, ``large``),
batch size, normalization, number of steps and learning rate. :func:`run` is a whole command:
load the data, train every condition of ``plan(args, data)`` from the same seed (so the same
initial weights: the normalization layers have the same shapes), test accuracy with population
statistics (eval mode: the moving averages), and write ``results.json``, ``metrics.csv``,
``figure.png`` and ``summary.md``. With ``--seeds N`` each seed is such a run in
``OUT/seed-<s>/`` and :func:`write_seeds` summarizes them; both summaries list every
comparison of the experiment (``b - a`` of the final test accuracy) with the seed-noise verdict
of :func:`batchnorm.repro.seeds.compare` (``n/a`` with one seed).

The layers (:func:`norm_layer`): BN is :class:`batchnorm.BatchNorm2d` (momentum 0.1);
Batch Renorm is :class:`batchnorm.BatchRenorm2d` with the paper's moving-average rate
``alpha = 0.01`` and its r_max/d_max schedule fitted to the run (:func:`scaled_schedule`);
Ghost BN is :class:`batchnorm.GhostBatchNorm2d` (momentum 0.1 per virtual batch).
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from batchnorm.models.convnet import SmallConvNet
from batchnorm.modules import BatchNorm2d
from batchnorm.repro import interrupt, seeds, sweep
from batchnorm.repro.common import (
    ArgumentError,
    add_data_arguments,
    check_arguments,
    log,
    prepare_out_dir,
    seed_everything,
    write_csv,
    write_json,
)
from batchnorm.repro.image_data import ClassBatches, Data, load_for
from batchnorm.variants import BatchRenorm2d, GhostBatchNorm2d, renorm_schedule
from batchnorm.variants.renorm import RENORM_MOMENTUM

NORM_NAMES = {"bn": "BN", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
#: every run's learning rate drops by DECAY_FACTOR for its last (1 - DECAY_AT) of the steps: the
#: final accuracy is then read after a quieter phase, not at the noisy end of constant-rate SGD
#: (with non-i.i.d. batches a constant rate leaves the classifier biased to the last batches'
#: classes, which is SGD's problem, not the normalization's)
DECAY_AT, DECAY_FACTOR = 0.75, 0.1


@dataclass(frozen=True)
class Condition:
    """One run of a grid. ``classes_per_batch`` > 0: non-i.i.d. batches
    (:class:`~batchnorm.repro.image_data.ClassBatches`). ``same_as``: the key of a condition
    that computes exactly this one (e.g. Ghost BN whose virtual batch is the whole batch is
    BN); it is not trained again, its result is reused."""

    group: str
    batch_size: int
    norm: str
    steps: int
    lr: float
    ghost_batch_size: int | None = None
    classes_per_batch: int = 0
    same_as: str | None = None

    @property
    def key(self) -> str:
        name = NORM_NAMES[self.norm]
        if self.norm == "ghost":
            name += f" (g={self.ghost_batch_size})"
        return f"{self.group}, B={self.batch_size}, {name}"


def scaled_schedule(steps: int, alpha: float = RENORM_MOMENTUM) -> dict:
    """Batch Renorm's r_max/d_max schedule for a run of ``steps`` steps. The paper (Ioffe 2017,
    section 4): plain BN (r_max = 1, d_max = 0) for 5k steps, then relaxed linearly to
    d_max = 5 at 25k and r_max = 3 at 40k steps, with moving averages at rate
    ``alpha = 0.01``, in runs of more than 100k steps. Its warm-up is 50 averaging times
    (``1/alpha``): the moving averages have settled before r and d act. Ours: BN for
    ``max(steps/16, 3/alpha)`` steps (the paper's 5 : 40 proportion, but never fewer than 3
    averaging times, so that at most 5% of the averages' initial values remain; at most half
    the run), r_max = 3 at ``steps/2`` and d_max = 5 after 20/35 of r_max's ramp (the paper's
    ramps: 20k and 35k steps)."""
    reach = max(1, steps // 2)
    warmup = min(max(steps // 16, math.ceil(3 / alpha)), reach - 1) if reach > 1 else 0
    d_step = warmup + max(1, round((reach - warmup) * 20 / 35))
    return renorm_schedule(3.0, 5.0, warmup=warmup, d_max_step=d_step,
                           r_max_step=max(warmup + 1, reach))


def norm_layer(condition: Condition, renorm_momentum: float = RENORM_MOMENTUM
               ) -> Callable[[int, str], nn.Module]:
    """``(channels, activation) -> layer`` for the condition's normalization (Batch Renorm's
    moving averages at rate ``renorm_momentum``, the paper's 0.01 by default)."""
    if condition.norm == "bn":
        return lambda c, activation: BatchNorm2d(c, activation=activation)
    if condition.norm == "renorm":
        schedule = scaled_schedule(condition.steps, renorm_momentum)
        return lambda c, activation: BatchRenorm2d(c, momentum=renorm_momentum,
                                                   activation=activation, **schedule)
    if condition.norm == "ghost":
        return lambda c, activation: GhostBatchNorm2d(
            c, activation=activation, ghost_batch_size=condition.ghost_batch_size)
    raise ValueError(f"norm must be one of {list(NORM_NAMES)}, got {condition.norm!r}")


def steps_for(epochs: float, examples: int, batch_size: int) -> int:
    """Steps that make ``epochs`` passes over ``examples`` with batches of ``batch_size``."""
    if batch_size > examples:
        raise ArgumentError(f"batch size {batch_size} is larger than the training set "
                            f"({examples} examples): use a larger --train-subset")
    return max(1, round(epochs * examples / batch_size))


# --------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser, defaults: dict,
                  options: tuple[tuple, ...] = ()) -> None:
    """Arguments shared by the grids, ``defaults`` setting their defaults, and the
    experiment's own ``options``: ``(option, type, default, help)`` each."""
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default), mnist, cifar10; in-memory data only")
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=float, default=defaults["epochs"],
                        help="passes over the training subset, the same for every run")
    parser.add_argument("--lr", type=float, default=defaults["lr"],
                        help=defaults["lr_help"])
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--channels", type=int, default=defaults["channels"],
                        help="width of the network's first layer")
    parser.add_argument("--train-subset", type=int, default=defaults["train_subset"],
                        help="train on this many examples (0: all)")
    parser.add_argument("--test-subset", type=int, default=defaults["test_subset"],
                        help="evaluate on this many test examples (0: all)")
    parser.add_argument("--evals", type=int, default=defaults["evals"],
                        help="test evaluations per run (besides step 0)")
    parser.add_argument("--target", type=float, default=defaults["target"],
                        help="test accuracy whose first crossing is reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    seeds.add_arguments(parser, default=defaults["seeds"])
    parser.add_argument("--out", default=defaults["out"])
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    for option, kind, default, text in options:
        parser.add_argument(option, type=kind, default=default, help=text)


def run(args, experiment: str, plan: Callable[[argparse.Namespace, Data], list[Condition]], *,
        comparisons: Callable[[list[Condition]], list[tuple[str, str, str]]],
        figure: Callable[[Path, dict, list[Condition], dict], None],
        report: Callable[[dict, list[Condition], dict, list[dict]], tuple[str, list[str]]]
        ) -> int:
    """The command: train ``plan(args, data)`` per seed and write the outputs.
    ``comparisons(conditions)``: ``(label, key a, key b)`` of the differences ``b - a`` to test;
    ``figure(path, table, conditions, config)`` draws ``figure.png``;
    ``report(table, conditions, config, tests)`` gives the summary's title and its lines of
    findings (``table``: condition key -> its runs, one per seed; ``tests``: the comparisons
    with their verdicts, as in ``results.json``)."""

    def one(args) -> int:
        begun = time.perf_counter()
        check_arguments(args, at_least=dict(evals=1, momentum=0, channels=1, train_subset=0,
                                            test_subset=0, seeds=1),
                        positive=("epochs", "lr"))
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        data = load_for(args)
        if data is None:
            return 2
        conditions = plan(args, data)
        out = prepare_out_dir(args.out)
        runs = train_grid(experiment, args, data, conditions)
        n_train, n_test = data.sizes()
        config = dict(dataset=data.name, train_examples=n_train, test_examples=n_test,
                      **{k: getattr(args, k) for k in ("epochs", "lr", "momentum", "channels",
                                                       "evals", "target", "seed", "device")},
                      threads=torch.get_num_threads(),
                      command=getattr(args, "seed_command", None) or seeds.command(),
                      seconds=round(time.perf_counter() - begun, 1))
        record = dict(experiment=experiment, config=config, runs=runs)
        write_outputs(out, [record], comparisons, figure, report)
        return 0

    return seeds.run_command(
        args, one, experiment,
        lambda out, folders, seconds: write_outputs(
            out, seeds.read_seeds(folders, "results.json"), comparisons, figure, report,
            seconds=seconds))


def train_grid(experiment: str, args, data: Data, conditions: list[Condition]) -> list[dict]:
    """Every condition trained from ``args.seed``; one row per condition:
    ``{key, **condition, **sweep.train_run(...)}``."""
    runs: dict[str, dict] = {}
    for i, condition in enumerate(conditions):
        label = f"{condition.key} ({i + 1}/{len(conditions)})"
        if condition.same_as is not None:
            runs[condition.key] = dict(runs[condition.same_as], key=condition.key,
                                       **asdict(condition))
            log(f"{experiment}: {label}: the same computation as {condition.same_as}, reused")
            continue
        seed_everything(args.seed)
        model = SmallConvNet(data.num_classes, data.in_channels, channels=args.channels,
                             norm=norm_layer(condition, getattr(args, "renorm_momentum",
                                                                RENORM_MOMENTUM)))
        order = None
        if condition.classes_per_batch:
            order = functools.partial(_class_batches, data.train[1], condition, args.seed)
        result = sweep.train_run(model, data, args, lr=condition.lr, label=label, order=order,
                                 steps=condition.steps, batch_size=condition.batch_size,
                                 eval_every=max(1, condition.steps // args.evals),
                                 decay_every=max(1, math.ceil(DECAY_AT * condition.steps)),
                                 decay_factor=DECAY_FACTOR)
        runs[condition.key] = dict(key=condition.key, **asdict(condition) | result)
        interrupt.stop_if_requested(args, f"at step {result['steps_done']} of {label}",
                                    partial=dict(experiment=experiment,
                                                 runs=list(runs.values())))
        log(f"{experiment}: {label}: lr {condition.lr:.4g}, {condition.steps} steps: "
            f"{sweep.outcome(result)}, final test accuracy {result['final_accuracy']:.4f}")
    return list(runs.values())


def _class_batches(labels, condition: Condition, seed: int, start: int) -> ClassBatches:
    return ClassBatches(labels, condition.batch_size, condition.classes_per_batch, seed, start)


# --------------------------------------------------------------------------------------------
# outputs (one seed or several: the same tables, with n = the number of seeds)


def write_outputs(out: Path, records: list[dict], comparisons, figure, report, *,
                  seconds: float | None = None) -> None:
    """``results.json``, ``metrics.csv``, ``figure.png`` and ``summary.md`` of one seed's
    record (``seconds`` None) or of several seeds' (their folders hold their own)."""
    fields = Condition.__dataclass_fields__
    conditions = [Condition(**{k: r[k] for k in fields}) for r in records[0]["runs"]]
    table = {c.key: [next(r for r in rec["runs"] if r["key"] == c.key) for rec in records]
             for c in conditions}
    tests = [dict(label=label, a=a, b=b, **seeds.compare(
        [r["final_accuracy"] for r in table[a]],
        [r["final_accuracy"] for r in table[b]]).as_dict())
        for label, a, b in comparisons(conditions)]
    config = records[0]["config"]
    several = seconds is not None
    seed_list = [rec["config"]["seed"] for rec in records]
    if several:
        results = [dict(key=c.key, **asdict(c), **{
            m: [r[m] for r in table[c.key]] for m in ("final_accuracy", "best_accuracy",
                                                      "steps_to_target")},
            outcomes=[sweep.outcome(r) for r in table[c.key]]) for c in conditions]
        write_json(out / "results.json", dict(
            experiment=records[0]["experiment"], seeds=seed_list,
            config={k: v for k, v in config.items() if k not in ("seed", "command", "seconds")},
            command=seeds.command(), seconds=round(seconds, 1), rule=seeds.RULE,
            results=results, comparisons=tests))
    else:
        write_json(out / "results.json", dict(records[0], comparisons=tests))
    write_csv(out / "metrics.csv", [
        dict(seed=rec["config"]["seed"], group=r["group"], batch_size=r["batch_size"],
             norm=r["norm"], ghost_batch_size=r["ghost_batch_size"]) | point
        for rec in records for r in rec["runs"] for point in r["history"]])
    figure(out / "figure.png", table, conditions, config)
    title, findings = report(table, conditions, config, tests)
    total = sum(rec["config"]["seconds"] for rec in records)
    command = seeds.command() if several else config["command"]
    lines = [f"# {title}", "",
             f"Data: {config['dataset']}, {config['train_examples']} training / "
             f"{config['test_examples']} test examples. Network: small ReLU CNN "
             f"({config['channels']}-{2 * config['channels']}-{4 * config['channels']} 3x3 "
             "convolutions, each followed by the normalization with ReLU, global average "
             f"pool, linear). SGD, momentum {config['momentum']}, {config['epochs']:g} epoch(s) "
             f"in every run; the learning rate (column lr) drops x{DECAY_FACTOR:g} for the last "
             f"{1 - DECAY_AT:.0%} of the steps. Test accuracy in eval mode (population "
             f"statistics). Seeds: {', '.join(map(str, seed_list))}; {config['device']} "
             f"({config['threads']} thread(s)).", "",
             "| condition | lr | steps | final test accuracy | best test accuracy | outcomes |",
             "|---|---|---|---|---|---|"]
    for c in conditions:
        runs = table[c.key]
        outcomes = [sweep.outcome(r) for r in runs]
        counts = ", ".join(f"{o} {outcomes.count(o)}/{len(runs)}" for o in dict.fromkeys(outcomes))
        lines.append(f"| {c.key}{' (= ' + c.same_as + ')' if c.same_as else ''} | {c.lr:.4g} | "
                     f"{c.steps:,} | {seeds.describe([r['final_accuracy'] for r in runs])} | "
                     f"{seeds.describe([r['best_accuracy'] for r in runs])} | {counts} |")
    lines += ["", "| comparison (final test accuracy) | b - a | beyond seed noise? |",
              "|---|---|---|"]
    lines += [f"| {t['label']} | {t['difference']:+.4f} | {t['text']} |" for t in tests]
    lines += ["", f"**Noise rule.** {seeds.RULE}", "", "## Findings", "", *findings, "",
              "Files: `figure.png`, `results.json`, `metrics.csv`"
              + (", `seed-<s>/` (each seed's own run)" if several else "")
              + f". Command: `{command}` ({total:.0f} s of training"
              + (" summed over the seeds)." if several else ")."), ""]
    (out / "summary.md").write_text("\n".join(lines))
    log(f"{records[0]['experiment']}: wrote {out / 'summary.md'}, figure.png, results.json, "
        f"metrics.csv" + (f" over {len(records)} seeds" if several else ""))


def mean_final(table: dict, key: str) -> float:
    """The mean final test accuracy of condition ``key`` over the seeds."""
    runs = table[key]
    return sum(r["final_accuracy"] for r in runs) / len(runs)


def errorbar(ax, xs: list, table: dict, keys: list[str], **style) -> None:
    """Mean ± std over seeds of the final test accuracy of ``keys`` at ``xs``."""
    values = [[r["final_accuracy"] for r in table[k]] for k in keys]
    ax.errorbar(xs, [seeds.spread(v).mean for v in values],
                yerr=[seeds.spread(v).std for v in values], capsize=3, **style)


def verdict(tests: list[dict], label: str) -> str:
    """The seed-noise verdict of the comparison ``label``."""
    return next(t["text"] for t in tests if t["label"] == label)
