"""``batchnorm reproduce depth``: claims 4 and 5, BN makes deep sigmoid networks trainable.

Fully connected networks ``input -> [Linear(width) -> sigmoid] x depth -> Linear(classes)``
(the paper's MNIST network, :func:`batchnorm.models.mlp.sigmoid_mlp`, is depth 3, width 100)
for several depths, each with BN before every sigmoid (hidden layers then have no bias) and
without BN. Both use the same initial weights (Gaussian, standard deviation ``1/sqrt(fan_in)``),
the same SGD + momentum and learning rate, and the same number of steps; we report the final
and best test accuracy against depth.

Writes ``figure.png`` (a: final test accuracy vs. depth; b: test accuracy vs. step per run),
``results.json``, ``metrics.csv`` and ``summary.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from batchnorm.models.mlp import sigmoid_mlp
from batchnorm.repro import sweep
from batchnorm.repro.common import parse_numbers
from batchnorm.repro.report import figure, finish, format_steps, plot_runs, plot_versus

DEFAULTS = dict(steps=3000, batch_size=60, lr=0.05, momentum=0.9, depths="3,5,10,20", width=100,
                target=0.80, train_subset=0, test_subset=0, eval_every=100)


def network(in_features: int, num_classes: int, depth: int, *, width: int, bn: bool
            ) -> nn.Sequential:
    """``depth`` hidden sigmoid layers of ``width`` units (the paper's MNIST network, made
    deeper: :func:`batchnorm.models.mlp.sigmoid_mlp`, weights ~ N(0, 1/fan_in))."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth: the number of hidden layers must be a positive int, got "
                         f"{depth!r}")
    return sigmoid_mlp(in_features, num_classes, (width,) * depth, bn=bn)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sweep.add_arguments(parser, DEFAULTS | {"out": "results/depth"})
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                        help="learning rate (the same for every network)")
    parser.add_argument("--depths", default=DEFAULTS["depths"],
                        help="comma-separated numbers of hidden layers")
    parser.add_argument("--width", type=int, default=DEFAULTS["width"],
                        help="units per hidden layer")


def run(args) -> int:
    depths = parse_numbers(args.depths, "--depths", kind=int)
    return sweep.run(
        args, "depth", "depth", depths, flatten=True,
        model=lambda data, depth, bn: network(data.train[0].shape[1], data.num_classes, depth,
                                              width=args.width, bn=bn),
        lr=lambda depth: args.lr, name=lambda depth: f"depth {depth}",
        settings=dict(lr=args.lr, depths=depths, width=args.width), figure=_figure,
        summary=_summary,
        claim=("final_accuracy", "BN makes deep sigmoid networks trainable (claims 4-5)"))


def _figure(path: Path, runs: list[dict], data) -> None:
    title = f"Deep sigmoid networks with and without BN, {data.name}"
    with figure(path, 1, 2, figsize=(11, 4.3), title=title) as (_, (ax, bx)):
        plot_versus(ax, runs, "depth", "final_accuracy", 1.0 / data.num_classes)
        ax.set_xticks(sorted({r["depth"] for r in runs}))
        ax.set_ylim(0, 1)
        finish(ax, "hidden sigmoid layers", "final test accuracy",
               "(a) final accuracy vs. depth", legend=dict(fontsize=8))
        plot_runs(bx, runs, "depth", "plasma",
                  lambda r: f"{'BN' if r['bn'] else 'no BN'}, {r['depth']} layers")
        finish(bx, "training step", "test accuracy",
               "(b) test accuracy during training (dashed: no BN)",
               legend=dict(fontsize=7, ncol=2, loc="lower right"))


def _summary(runs: list[dict], config: dict, data) -> str:
    lines = [
        "# Depth sweep (paper claims 4-5: BN makes deep sigmoid networks trainable)", "",
        f"Networks: {data.train[0].shape[1] if isinstance(data.train, tuple) else '?'} -> "
        f"[{config['width']} sigmoid units] x depth -> {data.num_classes}, depth in "
        f"{config['depths']}, with BN before every sigmoid and without. Weights "
        "N(0, 1/fan_in), biases 0; SGD, momentum "
        f"{config['momentum']}, learning rate {config['lr']} for all, {config['steps']} steps of "
        f"{config['batch_size']}, seed {config['seed']}, {config['device']} "
        f"({config['threads']} thread(s)).", "",
        f"Data: {data.name}, {config['train_examples']} training / {config['test_examples']} "
        "test examples.", "",
        f"| hidden layers | no BN: final acc | best acc | outcome | steps to "
        f"{config['target']:.0%} | BN: final acc | best acc | outcome | steps to "
        f"{config['target']:.0%} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for depth in config["depths"]:
        pair = sweep.paired(runs, "depth", depth)
        cells = []
        for bn in (False, True):
            r = pair[bn]
            cells += [f"{r['final_accuracy']:.4f}", f"{r['best_accuracy']:.4f}", sweep.outcome(r),
                      format_steps(r["steps_to_target"])]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    deepest = max(config["depths"])
    pair = sweep.paired(runs, "depth", deepest)
    lines += ["", "## Findings", "",
              f"- At {deepest} hidden layers: without BN final accuracy "
              f"{pair[False]['final_accuracy']:.4f} ({sweep.outcome(pair[False])}), with BN "
              f"{pair[True]['final_accuracy']:.4f} ({sweep.outcome(pair[True])}).",
              "- Accuracy change from the shallowest to the deepest network: without BN "
              f"{_change(runs, False, config['depths']):+.4f}, with BN "
              f"{_change(runs, True, config['depths']):+.4f}.", "", sweep.files_line(config), ""]
    return "\n".join(lines)


def _change(runs: list[dict], bn: bool, depths: list[int]) -> float:
    final = {r["depth"]: r["final_accuracy"] for r in runs if r["bn"] == bn}
    return final[max(depths)] - final[min(depths)]
