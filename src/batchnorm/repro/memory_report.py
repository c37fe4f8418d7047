"""The outputs of ``batchnorm reproduce memory`` (:mod:`batchnorm.repro.memory`): the memory
table and ratios, accuracy over seeds with the noise verdict, the figure and the summary with
the paper's claim next to ours."""

from __future__ import annotations

from pathlib import Path

from batchnorm.repro import seeds
from batchnorm.repro.common import log, write_csv, write_json
from batchnorm.repro.report import figure, finish, palette, plot_band

PAPER = ("Rota Bulo, Porzi & Kontschieder (CVPR 2018), abstract: \"memory savings of up to 50% "
         "by dropping intermediate results and by recovering required information during the "
         "backward pass through the inversion of stored forward results\"; a residual block "
         "with identity mapping stores 6 buffers with standard BN + activation and 3 with "
         "InPlace-ABN; on ImageNet-1k \"on-par results\" with the standard layers.")
METRICS = ("final_accuracy", "best_accuracy", "train_accuracy")
MIB = 2 ** 20


def write(out: Path, args, rows: list[dict], ratio_rows: list[dict], records: list[dict], *,
          labels: dict[str, str], pair: tuple[str, str], seconds: float) -> None:
    """``results.json``, ``metrics.csv``, ``figure.png``, ``summary.md`` (see the command):
    ``rows`` the memory measurements (one per network and variant), ``ratio_rows`` in-place
    ABN's over the others', ``records`` the seeds' ``results.json``, ``labels`` the variants'
    names in words, ``pair`` the (baseline, candidate) whose accuracies are compared."""
    baseline, candidate = pair
    variants = records[0]["config"]["variants"]
    training = {v: {m: [next(r for r in rec["runs"] if r["variant"] == v)[m] for rec in records]
                    for m in METRICS} for v in variants}
    verdicts = ({m: seeds.compare(training[baseline][m], training[candidate][m]).as_dict()
                 for m in METRICS} if baseline in training and candidate in training else {})
    first = records[0]["config"]
    config = dict({k: v for k, v in first.items() if k not in ("seed", "command", "seconds")},
                  memory_batch_size=args.memory_batch_size, inception_width=args.inception_width,
                  inception_image_size=args.inception_image_size)
    write_json(out / "results.json", dict(
        experiment="memory", claim=PAPER, config=config,
        seeds=[r["config"]["seed"] for r in records], memory=rows, ratios=ratio_rows,
        training={v: {m: seeds.spread(vals).as_dict()
                      for m, vals in by.items()} for v, by in training.items()},
        verdicts=verdicts, rule=seeds.RULE, command=seeds.command(), seconds=round(seconds, 1)))
    write_csv(out / "metrics.csv", [{k: v for k, v in r.items() if k != "input_shape"}
                                    for r in rows])
    _figure(out / "figure.png", rows, records, variants, labels, baseline)
    (out / "summary.md").write_text(_summary(rows, ratio_rows, training, verdicts, config,
                                             records, seconds, labels, pair))
    log(f"memory: wrote {out / 'summary.md'}, figure.png, results.json, metrics.csv "
        f"({seconds:.0f} s)")


def _figure(path: Path, rows: list[dict], records: list[dict], variants: list[str],
            labels: dict[str, str], baseline: str) -> None:
    table = {(r["network"], r["variant"]): r for r in rows}
    networks = list(dict.fromkeys(r["network"] for r in rows))
    colors = dict(zip(labels, palette("viridis", len(labels)), strict=True))
    with figure(path, 1, 3, figsize=(15, 4.4),
                title="In-place activated BN: memory of a training step and accuracy") as (
            _, (ax, bx, cx)):
        width = 0.8 / len(labels)

        def relative(variant, key, base_key):
            return [table[(n, variant)][key] / table[(n, baseline)][base_key] for n in networks]

        for i, variant in enumerate(labels):
            xs = [n + (i - 1) * width for n in range(len(networks))]
            ax.bar(xs, relative(variant, "total_bytes", "total_bytes"), width,
                   color=colors[variant], alpha=0.35)
            ax.bar(xs, relative(variant, "block_bytes", "total_bytes"), width,
                   color=colors[variant], label=labels[variant])
            bx.bar(xs, relative(variant, "peak_bytes", "peak_bytes"), width,
                   color=colors[variant], label=labels[variant])
        for axis in (ax, bx):
            axis.set_xticks(range(len(networks)), networks)
            axis.set_ylim(0, 1.3)  # room for the legend
        finish(ax, "network", f"bytes / {labels[baseline]}'s total",
               "(a) saved for the backward (dark: BN+act blocks, light: all)",
               legend=dict(fontsize=8), fontsize=10)
        finish(bx, "network", f"peak / {labels[baseline]}'s peak",
               "(b) peak memory of a training step", legend=dict(fontsize=8), fontsize=10)
        for variant in variants:
            histories = [next(r for r in rec["runs"] if r["variant"] == variant)["history"]
                         for rec in records]
            plot_band(cx, [p["step"] for p in histories[0]],
                      [[p["test_accuracy"] for p in h] for h in histories],
                      color=colors[variant], label=labels[variant],
                      ls="--" if variant == baseline else "-")
        finish(cx, "training step", "test accuracy",
               f"(c) PreActResNet, {records[0]['config']['dataset']}: mean, min-max of "
               f"{len(records)} seeds",
               legend=dict(fontsize=8, loc="lower right"), fontsize=9)


def _summary(rows, ratio_rows, training, verdicts, config, records, seconds, labels,
             pair) -> str:
    n, (baseline, candidate) = len(records), pair
    lines = [
        "# In-place activated BN: memory and accuracy (Rota Bulo et al. 2018)", "",
        f"**Paper's claim.** {PAPER}", "",
        "**Ours.** Every BN + activation layer built three ways: BN + ReLU (the usual "
        "baseline), BN + LeakyReLU(0.01) and InPlaceABN with leaky ReLU 0.01 (the like-for-like "
        "pair: in-place ABN needs an invertible activation). Saved bytes: distinct storages "
        "autograd saves for the backward in one training step (forward, cross-entropy, "
        "backward, SGD step), each counted once, parameters apart; *blocks* = storages saved "
        "inside the BN + activation layers, *shared* = those of them another layer saves too "
        "(the activation's output is the next convolution's input). Peak: the most memory "
        f"allocated during the step above the start ({config['device']}; CPU: torch's "
        "profiler's allocation events, CUDA: max_memory_allocated). Batch "
        f"{config['memory_batch_size']}, random inputs; BN-Inception at width "
        f"{config['inception_width']:g}, {config['inception_image_size']}x"
        f"{config['inception_image_size']} inputs; PreActResNet width {config['width']}, "
        f"{config['blocks']} blocks per stage, {config['dataset']}-shaped inputs.", "",
        "| network | layers | saved: all (MiB) | BN+act blocks (MiB) | of which shared (MiB) "
        "| parameters saved (MiB) | peak (MiB) |",
        "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['network']} | {labels[r['variant']]} | "
                     f"{r['total_bytes'] / MIB:.2f} | {r['block_bytes'] / MIB:.2f} | "
                     f"{r['shared_bytes'] / MIB:.2f} | {r['parameter_bytes'] / MIB:.2f} | "
                     f"{r['peak_bytes'] / MIB:.2f} |")
    lines += ["", "| network | InPlaceABN / | BN+act blocks | whole step (saved) | peak |",
              "|---|---|---|---|---|"]
    for r in ratio_rows:
        lines.append(f"| {r['network']} | {labels[r['baseline']]} | "
                     f"{r['block_bytes_ratio']:.3f} | {r['total_bytes_ratio']:.3f} | "
                     f"{r['peak_bytes_ratio']:.3f} |")
    lines += ["", f"## Accuracy over {n} seeds", "",
              f"PreActResNet on {config['dataset']} ({config['train_examples']} training / "
              f"{config['test_examples']} test examples), {config['steps']} steps of "
              f"{config['batch_size']}, SGD momentum {config['momentum']}, learning rate "
              f"{config['lr']}; training accuracy on {config['train_eval']} training examples, "
              "both with population statistics.", "",
              f"**Noise rule.** {seeds.RULE}", "",
              "| layers | final test accuracy | best test accuracy | training accuracy |",
              "|---|---|---|---|"]
    for variant, by in training.items():
        lines.append(f"| {labels[variant]} | "
                     + " | ".join(seeds.describe(by[m]) for m in METRICS) + " |")
    lines += ["", "## Findings", ""]
    for r in ratio_rows:
        if r["baseline"] == baseline:
            lines.append(f"- {r['network']}: with {labels[candidate]} the BN + activation "
                         f"blocks save {r['block_bytes_ratio']:.3f}x the bytes they save with "
                         f"{labels[baseline]} (the claim: 0.5); the whole step "
                         f"{r['total_bytes_ratio']:.3f}x, the peak {r['peak_bytes_ratio']:.3f}x.")
    for metric, verdict in verdicts.items():
        beyond = {True: "exceeds", False: "does not exceed", None: "cannot be compared with"}
        lines.append(f"- {metric.replace('_', ' ')}: {labels[candidate]} - {labels[baseline]} = "
                     f"{verdict['difference']:+.4f}, which {beyond[verdict['exceeds']]} seed "
                     f"noise ({verdict['text']}).")
    lines += ["", "Files: `figure.png`, `results.json`, `metrics.csv` (memory), `seed-<s>/` "
              f"(training). Command: `{seeds.command()}` ({seconds:.0f} s).", ""]
    return "\n".join(lines)
