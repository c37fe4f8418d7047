"""``batchnorm reproduce lr-sweep``: claim 1, BN allows much higher learning rates.

The same small ReLU convolutional network (:class:`~batchnorm.models.convnet.SmallConvNet`),
with BN before every nonlinearity and without (convolutions then keep their bias), is trained
with SGD + momentum 0.9 at learning rates ``base x m`` for the multipliers ``m`` (default 1, 5,
10, 30: the paper's BN-x5 and BN-x30 and one in between). ``base`` is a rate at which the
network without BN trains stably. For every run we record whether it diverged (a non-finite
loss or parameter: the run stops), whether it stayed at chance accuracy, the number of steps to
reach ``--target`` test accuracy, and the best and final test accuracy.

Writes ``figure.png`` (a: test accuracy vs. step per run; b: best accuracy vs. multiplier),
``results.json``, ``metrics.csv`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from batchnorm.models.convnet import SmallConvNet
from batchnorm.repro import sweep
from batchnorm.repro.common import moved_names, parse_numbers
from batchnorm.repro.report import figure, finish, format_steps, plot_runs, plot_versus

DEFAULTS = dict(steps=1000, batch_size=64, base_lr=0.01, momentum=0.9, multipliers="1,5,10,30",
                target=0.80, channels=16, train_subset=20_000, test_subset=2000, eval_every=100)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sweep.add_arguments(parser, DEFAULTS | {"out": "results/lr-sweep"})
    parser.add_argument("--base-lr", type=float, default=DEFAULTS["base_lr"],
                        help="the x1 learning rate (stable without BN)")
    parser.add_argument("--multipliers", default=DEFAULTS["multipliers"],
                        help="comma-separated learning-rate multipliers")
    parser.add_argument("--channels", type=int, default=DEFAULTS["channels"],
                        help="width of the network's first layer")


def run(args) -> int:
    multipliers = parse_numbers(args.multipliers, "--multipliers")
    return sweep.run(
        args, "lr-sweep", "multiplier", multipliers,
        model=lambda data, m, bn: SmallConvNet(data.num_classes, data.in_channels, bn=bn,
                                               channels=args.channels),
        lr=lambda m: args.base_lr * m, name=lambda m: f"x{m:g}",
        settings=dict(base_lr=args.base_lr, multipliers=multipliers, channels=args.channels),
        figure=lambda path, runs, data: _figure(path, runs, data, args), summary=_summary,
        claim=("best_accuracy", "BN allows much higher learning rates (claim 1)"))


def _figure(path: Path, runs: list[dict], data, args) -> None:
    title = f"Learning-rate sweep, {data.name}: the same network with and without BN"
    with figure(path, 1, 2, figsize=(11, 4.3), title=title) as (_, (ax, bx)):
        plot_runs(ax, runs, "multiplier", "viridis",
                  lambda r: f"{'BN' if r['bn'] else 'no BN'} x{r['multiplier']:g}")
        ax.axhline(args.target, color="gray", lw=0.8, ls=":")
        finish(ax, "training step", "test accuracy",
               "(a) test accuracy (dashed: no BN, x: diverged)",
               legend=dict(fontsize=7, ncol=2, loc="lower right"))
        plot_versus(bx, runs, "multiplier", "best_accuracy", 1.0 / data.num_classes)
        multipliers = sorted({r["multiplier"] for r in runs})
        bx.set_xscale("log")
        bx.set_xticks(multipliers, [f"x{m:g}" for m in multipliers])
        finish(bx, f"learning rate (multiples of {args.base_lr:g})", "best test accuracy",
               "(b) best accuracy vs. learning rate (red x: diverged)", legend=dict(fontsize=8))


def _summary(runs: list[dict], config: dict, data) -> str:
    target = config["target"]
    lines = [
        "# Learning-rate sweep (paper claim 1: BN allows much higher learning rates)", "",
        f"Network: small ReLU CNN ({config['channels']}-{2 * config['channels']}-"
        f"{4 * config['channels']} 3x3 convolutions, global average pool, linear), with BN "
        "before every ReLU and without BN (biases kept). SGD, momentum "
        f"{config['momentum']}, constant learning rate, {config['steps']} steps of "
        f"{config['batch_size']}, seed {config['seed']}, {config['device']} "
        f"({config['threads']} thread(s)).", "",
        f"Data: {data.name}, {config['train_examples']} training / {config['test_examples']} "
        "test examples (random subsets, to fit a CPU budget of minutes). "
        f"Base learning rate {config['base_lr']} (x1), at which the network without BN trains "
        "stably.", "",
        f"| LR | no BN: outcome | steps to {target:.0%} | best acc | BN: outcome "
        f"| steps to {target:.0%} | best acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in config["multipliers"]:
        pair = sweep.paired(runs, "multiplier", m)
        cells = []
        for bn in (False, True):
            r = pair[bn]
            cells += [sweep.outcome(r), format_steps(r["steps_to_target"]),
                      f"{r['best_accuracy']:.4f}"]
        lines.append(f"| x{m:g} ({config['base_lr'] * m:.4g}) | " + " | ".join(cells) + " |")
    plain_ok = [r["multiplier"] for r in runs if not r["bn"] and sweep.outcome(r) == "trained"]
    bn_ok = [r["multiplier"] for r in runs if r["bn"] and sweep.outcome(r) == "trained"]
    fastest = {bn: min((r for r in runs if r["bn"] == bn and r["steps_to_target"]),
                       key=lambda r: r["steps_to_target"], default=None) for bn in (False, True)}
    lines += ["", "## Findings", "",
              f"- Without BN the network trained at x{', x'.join(f'{m:g}' for m in plain_ok)}."
              if plain_ok else "- Without BN the network trained at none of the rates.",
              f"- With BN it trained at x{', x'.join(f'{m:g}' for m in bn_ok)}."
              if bn_ok else "- With BN it trained at none of the rates."]
    for bn in (False, True):
        r = fastest[bn]
        name = "with BN" if bn else "without BN"
        lines.append(f"- Fewest steps to {target:.0%} {name}: " + (
            "never reached." if r is None else
            f"{format_steps(r['steps_to_target'])} (at x{r['multiplier']:g})."))
    lines += ["", "The paper's claim is qualitative here (its evidence is Inception on ImageNet: "
              "x5 diverges without BN, BN-x5 and BN-x30 train and train faster); this sweep "
              "checks it on a network and data set a CPU can afford.", "",
              sweep.files_line(config), ""]
    return "\n".join(lines)


# names that moved to the shared modules (older code imports them from here)
__getattr__ = moved_names(__name__, {
    **{name: f"batchnorm.repro.sweep.{name}"
       for name in ("train_run", "paired", "outcome", "files_line")},
    "add_sweep_arguments": "batchnorm.repro.sweep.add_arguments",
    "load_sweep_data": "batchnorm.repro.sweep.load",
    "sweep_config": "batchnorm.repro.sweep.config",
    "write_sweep": "batchnorm.repro.sweep.write",
    "at_chance": "batchnorm.repro.report.at_chance",
    "steps_text": "batchnorm.repro.report.format_steps",
    "parse_floats": "batchnorm.repro.common.parse_numbers",
    "load_for": "batchnorm.repro.image_data.load_for",
    "TrainSpec": "batchnorm.repro.trainer.TrainSpec",
    "train": "batchnorm.repro.trainer.train",
})
