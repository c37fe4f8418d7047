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
import time
from pathlib import Path

from torch import nn

from batchnorm.models.mlp import sigmoid_mlp
from batchnorm.repro.common import log, prepare_out_dir, seed_everything
from batchnorm.repro.lr_sweep import (
    add_sweep_arguments,
    load_sweep_data,
    outcome,
    paired,
    parse_floats,
    steps_text,
    sweep_config,
    train_run,
    write_sweep,
)

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
    add_sweep_arguments(parser, DEFAULTS | {"out": "results/depth"})
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                        help="learning rate (the same for every network)")
    parser.add_argument("--depths", default=DEFAULTS["depths"],
                        help="comma-separated numbers of hidden layers")
    parser.add_argument("--width", type=int, default=DEFAULTS["width"],
                        help="units per hidden layer")


def run(args) -> int:
    depths = [int(d) for d in parse_floats(args.depths, "--depths")]
    started = time.perf_counter()
    data = load_sweep_data(args, flatten=True)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    in_features = data.train[0].shape[1]
    runs = []
    total = 2 * len(depths)
    for depth in depths:
        for bn in (False, True):
            label = f"{'BN' if bn else 'no BN'} depth {depth} ({len(runs) + 1}/{total})"
            seed_everything(args.seed)
            model = network(in_features, data.num_classes, depth, width=args.width, bn=bn)
            result = train_run(model, data, args, lr=args.lr, label=label)
            runs.append(dict(bn=bn, depth=depth, **result))
            log(f"depth: {label}: {outcome(result)}, final {result['final_accuracy']:.4f}, "
                f"best {result['best_accuracy']:.4f}")
    config = sweep_config(args, data, started, lr=args.lr, depths=depths, width=args.width)
    write_sweep(out, "depth", "depth", config, runs, lambda path: _figure(path, runs, data),
                _summary(runs, config, data))
    return 0


def _figure(path: Path, runs: list[dict], data) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    depths = sorted({r["depth"] for r in runs})
    for bn, style in ((False, "o--"), (True, "s-")):
        sub = sorted((r for r in runs if r["bn"] == bn), key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in sub], [r["final_accuracy"] for r in sub], style,
                label="BN" if bn else "no BN")
    ax.axhline(1.0 / data.num_classes, color="black", lw=0.6, ls=":", label="chance")
    ax.set_xticks(depths)
    ax.set_xlabel("hidden sigmoid layers")
    ax.set_ylabel("final test accuracy")
    ax.set_title("(a) final accuracy vs. depth")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    colors = plt.cm.plasma([i / max(1, len(depths) - 1) * 0.85 for i in range(len(depths))])
    for r in runs:
        color = colors[depths.index(r["depth"])]
        bx.plot([p["step"] for p in r["history"]], [p["test_accuracy"] for p in r["history"]],
                "-" if r["bn"] else "--", color=color, lw=1.3,
                label=f"{'BN' if r['bn'] else 'no BN'}, {r['depth']} layers")
    bx.set_xlabel("training step")
    bx.set_ylabel("test accuracy")
    bx.set_title("(b) test accuracy during training (dashed: no BN)")
    bx.legend(fontsize=7, ncol=2, loc="lower right")
    bx.grid(alpha=0.3)
    fig.suptitle(f"Deep sigmoid networks with and without BN, {data.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        pair = paired(runs, "depth", depth)
        cells = []
        for bn in (False, True):
            r = pair[bn]
            cells += [f"{r['final_accuracy']:.4f}", f"{r['best_accuracy']:.4f}", outcome(r),
                      steps_text(r["steps_to_target"])]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    deepest = max(config["depths"])
    pair = paired(runs, "depth", deepest)
    lines += ["", "## Findings", "",
              f"- At {deepest} hidden layers: without BN final accuracy "
              f"{pair[False]['final_accuracy']:.4f} ({outcome(pair[False])}), with BN "
              f"{pair[True]['final_accuracy']:.4f} ({outcome(pair[True])}).",
              "- Accuracy change from the shallowest to the deepest network: without BN "
              f"{_change(runs, False, config['depths']):+.4f}, with BN "
              f"{_change(runs, True, config['depths']):+.4f}.", "",
              f"Files: `figure.png`, `results.json`, `metrics.csv`. Command: "
              f"`{config['command']}` ({config['seconds']:.0f} s).", ""]
    return "\n".join(lines)


def _change(runs: list[dict], bn: bool, depths: list[int]) -> float:
    final = {r["depth"]: r["final_accuracy"] for r in runs if r["bn"] == bn}
    return final[max(depths)] - final[min(depths)]
