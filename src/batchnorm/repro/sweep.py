"""Sweeps: one setting varied over a list of values, the same network trained without and with
BN at each, one row per run (``lr-sweep``, ``depth``).

:func:`add_arguments` gives a sweep its command line; :func:`run` is the whole command: load
the data, train the grid (:func:`run_pairs`; each run :func:`train_run`, the shared
:class:`~batchnorm.repro.trainer.Trainer` without checkpoints, summarized) and write
``results.json``, ``metrics.csv``, ``figure.png`` and ``summary.md`` (:func:`write`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from batchnorm.repro import interrupt, seeds
from batchnorm.repro.common import (
    add_data_arguments,
    check_arguments,
    log,
    pick_device,
    prepare_out_dir,
    seed_everything,
    steps_to_reach,
    write_csv,
    write_json,
)
from batchnorm.repro.image_data import Data, load_for
from batchnorm.repro.report import at_chance, command_line, figure, finish
from batchnorm.repro.trainer import TrainSpec, train


def add_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Arguments shared by the sweeps (``lr-sweep``, ``depth``); ``defaults`` sets their
    defaults."""
    parser.add_argument("--dataset", default="fashion-mnist",
                        help="fashion-mnist (default), cifar10; in-memory data sets only")
    add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=defaults["steps"],
                        help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--momentum", type=float, default=defaults["momentum"])
    parser.add_argument("--train-subset", type=int, default=defaults["train_subset"],
                        help="train on this many examples (0: all)")
    parser.add_argument("--test-subset", type=int, default=defaults["test_subset"],
                        help="evaluate on this many test examples (0: all)")
    parser.add_argument("--eval-every", type=int, default=defaults["eval_every"])
    parser.add_argument("--target", type=float, default=defaults["target"],
                        help="test accuracy whose first crossing is reported")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); one is fastest for these "
                             "small networks on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    seeds.add_arguments(parser)
    parser.add_argument("--out", default=defaults["out"])
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def load(args, **kwargs) -> Data | None:
    """Check the shared arguments, set ``--threads`` and load the sweep's data (``None`` if its
    files are missing)."""
    check_arguments(args, at_least=dict(steps=1, batch_size=1, eval_every=1, momentum=0,
                                        seeds=1))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return load_for(args, **kwargs)


def run(args, experiment: str, key: str, values: list, *,
        model: Callable[[Data, object, bool], torch.nn.Module], lr: Callable[[object], float],
        name: Callable[[object], str], settings: dict, figure, summary, claim: tuple[str, str],
        **load_options) -> int:
    """The sweep command: :func:`load` the data (``load_options``: e.g. ``flatten``), train
    ``model(data, value, bn)`` at ``lr(value)`` for each of ``values`` (:func:`run_pairs`) and
    write the outputs, ``settings`` recorded in the config; ``figure(path, runs, data)`` draws
    the figure, ``summary(runs, config, data)`` writes ``summary.md``. With ``--seeds N > 1``
    each seed is such a run into ``OUT/seed-<s>/`` and :func:`write_seeds` summarizes them,
    ``claim`` = (the metric BN's advantage is read from, e.g. ``"best_accuracy"``, and the
    sentence of the claim). Returns the exit status."""

    def one(args) -> int:
        begun = time.perf_counter()
        data = load(args, **load_options)
        if data is None:
            return 2
        out = prepare_out_dir(args.out)
        runs = run_pairs(experiment, args, data, key, values, lr=lr, name=name,
                         model=lambda value, bn: model(data, value, bn))
        record = config(args, data, begun, **settings)
        write(out, experiment, key, record, runs, lambda path: figure(path, runs, data),
              summary(runs, record, data))
        return 0

    return seeds.run_command(
        args, one, experiment,
        lambda out, folders, seconds: write_seeds(out, experiment, key, folders, claim=claim,
                                                  name=name, seconds=seconds))


def train_run(model, data: Data, args, *, lr: float, label: str, order=None,
              **spec) -> dict:
    """One run of a sweep: :func:`~batchnorm.repro.trainer.train` without checkpoints,
    summarized (best/final accuracy, steps to ``args.target``, divergence, chance level).
    ``spec``: :class:`~batchnorm.repro.trainer.TrainSpec` fields that replace the arguments'
    (e.g. a run's own ``steps`` and ``batch_size``); ``order``: the trainer's batch order."""
    device = pick_device(args.device)
    for name in ("steps", "batch_size", "eval_every"):
        if name not in spec:
            spec[name] = getattr(args, name)
    spec = TrainSpec(**spec, lr=lr, momentum=args.momentum, seed=args.seed,
                     progress=args.progress, label=label)
    result = train(model, data.train, data.test, spec, device, order)
    history = result["history"]
    accuracies = [p["test_accuracy"] for p in history]
    return dict(
        lr=lr, diverged=result["diverged"], steps_done=result["steps_done"],
        steps_to_target=steps_to_reach(history, args.target),
        best_accuracy=max(accuracies), final_accuracy=accuracies[-1],
        at_chance=at_chance(accuracies[-1], data.num_classes, data.sizes()[1]),
        seconds=result["seconds"], history=history,
    )


def run_pairs(experiment: str, args, data: Data, key: str, values: list, *,
              model: Callable[[object, bool], torch.nn.Module], lr: Callable[[object], float],
              name: Callable[[object], str]) -> list[dict]:
    """For each of ``values`` of the setting ``key``: ``model(value, bn)`` trained at
    ``lr(value)``, without and with BN, from the same seed (so the same initial weights
    wherever the two networks have the same shapes). One row per run, ``name(value)`` in its
    label: ``{"bn", key, **train_run(...)}``."""
    runs = []
    total = 2 * len(values)
    for value in values:
        for bn in (False, True):
            label = f"{'BN' if bn else 'no BN'} {name(value)} ({len(runs) + 1}/{total})"
            seed_everything(args.seed)
            result = train_run(model(value, bn), data, args, lr=lr(value), label=label)
            runs.append(dict(bn=bn, **{key: value}, **result))
            interrupt.stop_if_requested(args, f"at step {result['steps_done']} of {label}",
                                        partial=dict(experiment=experiment, runs=runs))
            log(f"{experiment}: {label}: lr {result['lr']:.4g}: {outcome(result)}, final "
                f"{result['final_accuracy']:.4f}, best {result['best_accuracy']:.4f}, steps to "
                f"{args.target}: {result['steps_to_target']}")
    return runs


def config(args, data: Data, started: float, **settings) -> dict:
    """What a sweep's outputs record about its run: data, training settings, machine, command."""
    n_train, n_test = data.sizes()
    return dict(dataset=data.name, train_examples=n_train, test_examples=n_test,
                steps=args.steps, batch_size=args.batch_size, momentum=args.momentum,
                target=args.target, **settings, seed=args.seed, device=args.device,
                threads=torch.get_num_threads(),
                command=getattr(args, "seed_command", None) or command_line(),
                seconds=round(time.perf_counter() - started, 1))


def write(out: Path, experiment: str, key: str, config: dict, runs: list[dict],
          figure, summary: str, *, columns: tuple[str, ...] = ("bn",)) -> None:
    """``results.json``, ``metrics.csv`` (one row per evaluation, by the run's ``columns`` and
    ``key``), ``figure.png`` (drawn by ``figure(path)``) and ``summary.md``."""
    write_json(out / "results.json", dict(experiment=experiment, config=config, runs=runs))
    write_csv(out / "metrics.csv", [{c: r[c] for c in (*columns, key)} | p
                                    for r in runs for p in r["history"]])
    figure(out / "figure.png")
    (out / "summary.md").write_text(summary)
    log(f"{experiment}: wrote {out / 'summary.md'}, figure.png, results.json, metrics.csv "
        f"({config['seconds']:.0f} s)")


def paired(runs: list[dict], key: str, value) -> dict[bool, dict]:
    """The runs without (False) and with (True) BN at ``key == value``."""
    return {r["bn"]: r for r in runs if r[key] == value}


def outcome(run: dict) -> str:
    if run["diverged"]:
        return f"diverged at step {run['diverged']['step']}"
    if run["at_chance"]:
        return "ended at chance"
    return "trained"


def files_line(config: dict) -> str:
    """The last line of a sweep's summary: its files and the command that wrote them."""
    return (f"Files: `figure.png`, `results.json`, `metrics.csv`. Command: "
            f"`{config['command']}` ({config['seconds']:.0f} s).")


# --------------------------------------------------------------------------------------------
# several seeds


def write_seeds(out: Path, experiment: str, key: str, folders: list[Path], *,
                claim: tuple[str, str], name: Callable[[object], str], seconds: float) -> None:
    """The summary of a sweep over several seeds (each a one-seed run in ``folders``):
    ``results.json`` (per value and network: every metric per seed and its spread),
    ``metrics.csv`` (every evaluation, with its seed), ``figure.png`` (the claim's metric
    against the setting, mean ± std) and ``summary.md`` (mean ± std, outcomes per seed, and
    whether BN's difference in the claim's metric exceeds seed noise)."""
    records = seeds.read_seeds(folders, "results.json")
    metric, sentence = claim
    values = list(dict.fromkeys(r[key] for r in records[0]["runs"]))
    table = {}
    for value in values:
        for bn in (False, True):
            runs = [paired(rec["runs"], key, value)[bn] for rec in records]
            table[(value, bn)] = dict(
                {m: [r[m] for r in runs] for m in ("best_accuracy", "final_accuracy",
                                                   "steps_to_target")},
                outcomes=[outcome(r) for r in runs])
    first = records[0]["config"]
    n = len(records)
    write_json(out / "results.json", dict(
        experiment=experiment, seeds=[r["config"]["seed"] for r in records],
        config={k: v for k, v in first.items() if k not in ("seed", "command", "seconds")},
        command=seeds.command(), seconds=round(seconds, 1), rule=seeds.RULE,
        results=[dict(bn=bn, **{key: value}, **entry) for (value, bn), entry in table.items()]))
    write_csv(out / "metrics.csv", [dict(seed=rec["config"]["seed"], bn=r["bn"], **{key: r[key]},
                                         **p) for rec in records for r in rec["runs"]
                                    for p in r["history"]])
    with figure(out / "figure.png", figsize=(6.5, 4.3),
                title=f"{experiment}, {first['dataset']}: {metric.replace('_', ' ')}, mean ± std "
                      f"over {n} seeds") as (_, ax):
        for bn, style in ((False, "o--"), (True, "s-")):
            ys = [table[(v, bn)][metric] for v in values]
            ax.errorbar(range(len(values)), [sum(y) / n for y in ys],
                        yerr=[seeds.spread(y).std for y in ys], fmt=style, capsize=3,
                        label="BN" if bn else "no BN")
        ax.set_xticks(range(len(values)), [name(v) for v in values])
        finish(ax, key, metric.replace("_", " "), sentence, legend=dict(fontsize=8),
               fontsize=9)
    target = first["target"]
    lines = [f"# {experiment} over {n} seeds: {sentence}", "",
             f"Seeds {', '.join(str(r['config']['seed']) for r in records)}: each is a complete "
             "one-seed run in `seed-<s>/` (its own summary, figure and files; the seed sets the "
             "initial weights, the mini-batch order and the data subsets). Settings as there: "
             f"{first['dataset']}, {first['steps']} steps of {first['batch_size']}.", "",
             f"**Noise rule.** {seeds.RULE}", "",
             f"| {key} | network | best accuracy | final accuracy | steps to {target:.0%} | "
             f"outcomes | BN - no BN ({metric.replace('_', ' ')}) | beyond seed noise? |",
             "|---|---|---|---|---|---|---|---|"]
    for value in values:
        for bn in (False, True):
            entry = table[(value, bn)]
            counts = ", ".join(f"{o} {entry['outcomes'].count(o)}/{n}"
                               for o in dict.fromkeys(entry["outcomes"]))
            if bn:
                a, b = table[(value, False)][metric], entry[metric]
                difference = f"{sum(b) / n - sum(a) / n:+.4f}"
                verdict = seeds.noise_text(a, b)
            else:
                difference = verdict = ""
            lines.append(f"| {name(value)} | {'BN' if bn else 'no BN'} | "
                         f"{seeds.describe(entry['best_accuracy'])} | "
                         f"{seeds.describe(entry['final_accuracy'])} | "
                         f"{seeds.describe(entry['steps_to_target'], kind='d')} | {counts} | "
                         f"{difference} | {verdict} |")
    lines += ["", f"Files: `figure.png`, `results.json`, `metrics.csv`, `seed-<s>/`. Command: "
              f"`{seeds.command()}` (run time "
              f"{sum(r['config']['seconds'] for r in records):.0f} s summed over the seeds).",
              ""]
    (out / "summary.md").write_text("\n".join(lines))
    log(f"{experiment}: wrote {out / 'summary.md'} over {n} seeds")
