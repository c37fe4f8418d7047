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
import sys
import time
from pathlib import Path

import torch

from batchnorm.repro.common import (
    add_data_arguments,
    log,
    pick_device,
    prepare_out_dir,
    seed_everything,
    steps_to_reach,
    write_csv,
    write_json,
)
from batchnorm.repro.inception import (
    TrainSpec,
    at_chance,
    load_for,
    train,
)

DEFAULTS = dict(steps=1000, batch_size=64, base_lr=0.01, momentum=0.9, multipliers="1,5,10,30",
                target=0.80, channels=16, train_subset=20_000, test_subset=2000, eval_every=100)


def add_sweep_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
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
    parser.add_argument("--out", default=defaults["out"])
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sweep_arguments(parser, DEFAULTS | {"out": "results/lr-sweep"})
    parser.add_argument("--base-lr", type=float, default=DEFAULTS["base_lr"],
                        help="the x1 learning rate (stable without BN)")
    parser.add_argument("--multipliers", default=DEFAULTS["multipliers"],
                        help="comma-separated learning-rate multipliers")
    parser.add_argument("--channels", type=int, default=DEFAULTS["channels"],
                        help="width of the network's first layer")


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{name} must be positive numbers, got {text!r}")
    return values


def load_sweep_data(args, **kwargs):
    """Set ``--threads`` and load the sweep's data (``None`` if its files are missing)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return load_for(args, **kwargs)


def train_run(model, data, args, *, lr: float, label: str) -> dict:
    """One run of a sweep: :func:`~batchnorm.repro.inception.train` without checkpoints,
    summarized (best/final accuracy, steps to ``args.target``, divergence, chance level)."""
    device = pick_device(args.device)
    spec = TrainSpec(steps=args.steps, batch_size=args.batch_size, lr=lr,
                     momentum=args.momentum, eval_every=args.eval_every, seed=args.seed,
                     progress=args.progress, label=label)
    result = train(model, data.train, data.test, spec, device)
    history = result["history"]
    accuracies = [p["test_accuracy"] for p in history]
    return dict(
        lr=lr, diverged=result["diverged"], steps_done=result["steps_done"],
        steps_to_target=steps_to_reach(history, args.target),
        best_accuracy=max(accuracies), final_accuracy=accuracies[-1],
        at_chance=at_chance(accuracies[-1], data.num_classes, data.sizes()[1]),
        seconds=result["seconds"], history=history,
    )


def sweep_config(args, data, started: float, **settings) -> dict:
    """What a sweep's outputs record about its run: data, training settings, machine, command."""
    n_train, n_test = data.sizes()
    return dict(dataset=data.name, train_examples=n_train, test_examples=n_test,
                steps=args.steps, batch_size=args.batch_size, momentum=args.momentum,
                target=args.target, **settings, seed=args.seed, device=args.device,
                threads=torch.get_num_threads(),
                command=" ".join(["batchnorm"] + sys.argv[1:]),
                seconds=round(time.perf_counter() - started, 1))


def write_sweep(out: Path, experiment: str, key: str, config: dict, runs: list[dict],
                figure, summary: str) -> None:
    """``results.json``, ``metrics.csv`` (one row per evaluation, by ``bn`` and ``key``),
    ``figure.png`` (drawn by ``figure(path)``) and ``summary.md``."""
    write_json(out / "results.json", dict(experiment=experiment, config=config, runs=runs))
    write_csv(out / "metrics.csv", [dict(bn=r["bn"], **{key: r[key]}, **p)
                                    for r in runs for p in r["history"]])
    figure(out / "figure.png")
    (out / "summary.md").write_text(summary)
    log(f"{experiment}: wrote {out / 'summary.md'}, figure.png, results.json, metrics.csv "
        f"({config['seconds']:.0f} s)")


def paired(runs: list[dict], key: str, value) -> dict[bool, dict]:
    """The runs without (False) and with (True) BN at ``key == value``."""
    return {r["bn"]: r for r in runs if r[key] == value}


def steps_text(reach: int | None) -> str:
    return "never" if reach is None else str(reach)


def outcome(run: dict) -> str:
    if run["diverged"]:
        return f"diverged at step {run['diverged']['step']}"
    if run["at_chance"]:
        return "ended at chance"
    return "trained"


def run(args) -> int:
    multipliers = parse_floats(args.multipliers, "--multipliers")
    started = time.perf_counter()
    data = load_sweep_data(args)
    if data is None:
        return 2
    out = prepare_out_dir(args.out)
    from batchnorm.models.convnet import SmallConvNet

    runs = []
    total = 2 * len(multipliers)
    for m in multipliers:
        for bn in (False, True):
            label = f"{'BN' if bn else 'no BN'} x{m:g} ({len(runs) + 1}/{total})"
            seed_everything(args.seed)  # the same initial weights at every learning rate
            model = SmallConvNet(data.num_classes, data.in_channels, bn=bn,
                                 channels=args.channels)
            result = train_run(model, data, args, lr=args.base_lr * m, label=label)
            runs.append(dict(bn=bn, multiplier=m, **result))
            log(f"lr-sweep: {label}: lr {args.base_lr * m:.4g}: {outcome(result)}, best "
                f"{result['best_accuracy']:.4f}, steps to {args.target}: "
                f"{result['steps_to_target']}")
    config = sweep_config(args, data, started, base_lr=args.base_lr, multipliers=multipliers,
                          channels=args.channels)
    write_sweep(out, "lr-sweep", "multiplier", config, runs,
                lambda path: _figure(path, runs, data, args), _summary(runs, config, data))
    return 0


def _figure(path: Path, runs: list[dict], data, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = plt.cm.viridis([i / max(1, len(runs) // 2 - 1) * 0.9 for i in range(len(runs) // 2)])
    multipliers = sorted({r["multiplier"] for r in runs})
    for r in runs:
        color = colors[multipliers.index(r["multiplier"])]
        steps = [p["step"] for p in r["history"]]
        acc = [p["test_accuracy"] for p in r["history"]]
        ax.plot(steps, acc, "-" if r["bn"] else "--", color=color, lw=1.4,
                label=f"{'BN' if r['bn'] else 'no BN'} x{r['multiplier']:g}")
        if r["diverged"]:
            ax.plot([steps[-1]], [acc[-1]], "x", color=color, ms=9, mew=2)
    ax.axhline(args.target, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy (dashed: no BN, x: diverged)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    for bn, style in ((False, "o--"), (True, "s-")):
        sub = [r for r in runs if r["bn"] == bn]
        bx.plot([r["multiplier"] for r in sub], [r["best_accuracy"] for r in sub], style,
                label="BN" if bn else "no BN")
        for r in sub:
            if r["diverged"]:
                bx.plot([r["multiplier"]], [r["best_accuracy"]], "x", color="red", ms=11, mew=2)
    bx.axhline(1.0 / data.num_classes, color="black", lw=0.6, ls=":", label="chance")
    bx.set_xscale("log")
    bx.set_xticks(multipliers, [f"x{m:g}" for m in multipliers])
    bx.set_xlabel(f"learning rate (multiples of {args.base_lr:g})")
    bx.set_ylabel("best test accuracy")
    bx.set_title("(b) best accuracy vs. learning rate (red x: diverged)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.suptitle(f"Learning-rate sweep, {data.name}: the same network with and without BN")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        pair = paired(runs, "multiplier", m)
        cells = []
        for bn in (False, True):
            r = pair[bn]
            cells += [outcome(r), steps_text(r["steps_to_target"]), f"{r['best_accuracy']:.4f}"]
        lines.append(f"| x{m:g} ({config['base_lr'] * m:.4g}) | " + " | ".join(cells) + " |")
    plain_ok = [r["multiplier"] for r in runs if not r["bn"] and outcome(r) == "trained"]
    bn_ok = [r["multiplier"] for r in runs if r["bn"] and outcome(r) == "trained"]
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
            f"{r['steps_to_target']} (at x{r['multiplier']:g})."))
    lines += ["", "The paper's claim is qualitative here (its evidence is Inception on ImageNet: "
              "x5 diverges without BN, BN-x5 and BN-x30 train and train faster); this sweep "
              "checks it on a network and data set a CPU can afford.", "",
              f"Files: `figure.png`, `results.json`, `metrics.csv`. Command: "
              f"`{config['command']}` ({config['seconds']:.0f} s).", ""]
    return "\n".join(lines)
