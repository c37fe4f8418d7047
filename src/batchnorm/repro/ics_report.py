"""The report of ``batchnorm reproduce ics``: per run the scalar readings (training speed,
input drift, ICS, smoothness), their mean ± std over seeds, the mechanism claims of Ioffe &
Szegedy and of Santurkar et al. checked against them with the seed-noise rule of
:mod:`batchnorm.repro.seeds`, the figures and ``summary.md``; all read back from the seeds'
``metrics.json``."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from batchnorm.repro.common import log, write_csv, write_json
from batchnorm.repro.report import figure, finish, plot_band
from batchnorm.repro.seeds import RULE, command, compare, describe, read_seeds, spread

NETWORKS = {"no_bn": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
COLORS = {"no_bn": "tab:blue", "bn": "tab:red", "noisy_bn": "tab:green"}
TITLES = {"vgg": "VGG-style CNN (ReLU, SGD + momentum)", "mlp": "Figure 1 MLP (sigmoid, SGD)"}
# reading -> (row title, format kind, digits)
READINGS = {
    "train_loss_mean": ("training loss, mean over the run (lower = faster)", "f", 4),
    "steps_to_target": ("steps to the target training accuracy", "d", 0),
    "final_train_loss": ("training loss at the end", "f", 4),
    "final_test_accuracy": ("test accuracy at the end (noisy BN: noise on)", "f", 4),
    "clean_accuracy": ("test accuracy at the end, noise off", "f", 4),
    "drift": ("input drift D, mean over layers", "f", 3),
    "median_drift": ("  of it: median drift", "f", 3),
    "spread_drift": ("  of it: spread drift", "f", 3),
    "ics_l2": ("ICS ||G - G'||, mean over layers and probes after step 0", "g", 3),
    "ics_relative": ("ICS relative, ||G - G'|| / ||G||", "g", 3),
    "ics_cosine": ("ICS cosine(G, G')", "f", 3),
    "loss_variation": ("loss variation along the gradient (mean over probes after step 0)",
                       "g", 3),
    "grad_change": ("gradient change (predictiveness)", "g", 3),
    "beta": ("effective beta-smoothness", "g", 3),
}
# who: [(claim, reading, condition a, condition b, the claimed relation of b to a)]
CLAIMED = {
    "Ioffe & Szegedy": [
        ("BN trains faster", "train_loss_mean", "no_bn", "bn", "lower"),
        ("BN keeps layer inputs' distributions more stable", "drift", "no_bn", "bn", "lower")],
    "Santurkar et al. (1)": [
        ("noisy BN's layer inputs are less stable than BN's", "drift", "bn", "noisy_bn",
         "higher"),
        ("noisy BN's layer inputs are less stable than no BN's", "drift", "no_bn", "noisy_bn",
         "higher"),
        ("noisy BN trains about as fast as BN", "train_loss_mean", "bn", "noisy_bn",
         "similar"),
        ("noisy BN trains faster than no BN", "train_loss_mean", "no_bn", "noisy_bn",
         "lower")],
    "Santurkar et al. (2)": [
        ("BN does not reduce ICS (gradient change, l2)", "ics_l2", "no_bn", "bn", "not lower"),
        ("BN does not align G and G' better (cosine)", "ics_cosine", "no_bn", "bn",
         "not higher")],
    "Santurkar et al. (3)": [
        ("BN: smaller loss variation along the gradient", "loss_variation", "no_bn", "bn",
         "lower"),
        ("BN: more predictive gradients (smaller change)", "grad_change", "no_bn", "bn", "lower"),
        ("BN: smaller effective beta-smoothness", "beta", "no_bn", "bn", "lower")],
}
CLAIMS = [(who, *claim) for who, claims in CLAIMED.items() for claim in claims]
PROBE_READINGS = ("ics_l2", "ics_relative", "ics_cosine", "loss_variation", "grad_change",
                  "beta")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def readings(run: dict, target: float, initial_probe: bool = False) -> dict:
    """The scalar readings of one run (``None`` where there is nothing to read). The ICS and
    smoothness readings are means over the probes after step 0 (during training), or over all
    probes with ``initial_probe`` (at initialization the networks without BN are far rougher
    than later, and that one probe can dominate the mean)."""
    points = run["history"][1:]  # after step 0
    probes = [p for p in run["probes"] if initial_probe or p["step"] > 0]
    ics = [r for probe in probes for r in probe["ics"]]
    smooth = [p["smoothness"] for p in probes]
    drift = run["drift"].values()
    return dict(
        train_loss_mean=_mean(p["train_loss"] for p in points),
        steps_to_target=next((p["step"] for p in points
                              if (p["train_accuracy"] or 0) >= target), None),
        final_train_loss=points[-1]["train_loss"] if points else None,
        final_test_accuracy=run["history"][-1]["test_accuracy"],
        clean_accuracy=run["clean_accuracy"],
        drift=_mean(d["drift"] for d in drift),
        median_drift=_mean(d["median_drift"] for d in drift),
        spread_drift=_mean(d["spread_drift"] for d in drift),
        ics_l2=_mean(r["l2"] for r in ics),
        ics_relative=_mean(r["l2"] / r["grad_norm"] for r in ics if r["grad_norm"] > 0),
        ics_cosine=_mean(r["cosine"] for r in ics),
        loss_variation=_mean(s["loss_variation"] for s in smooth),
        grad_change=_mean(s["max_grad_change"] for s in smooth),
        beta=_mean(s["beta"] for s in smooth),
    )


def aggregate(seed_metrics: list[dict], archs: list[str], target: float,
              initial_probe: bool = False) -> dict:
    """``{arch: {network: {reading: {"values": [per seed], "spread": {...} | None}}}}``."""
    result = {}
    for arch in archs:
        result[arch] = {}
        for network in NETWORKS:
            per_seed = [readings(m["runs"][arch][network], target, initial_probe)
                        for m in seed_metrics]
            result[arch][network] = {}
            for key in READINGS:
                values = [r[key] for r in per_seed]
                complete = all(v is not None for v in values)
                result[arch][network][key] = dict(
                    values=values, spread=spread(values).as_dict() if complete else None)
    return result


def judge(relation: str, a: list, b: list) -> tuple[str, str]:
    """``(noise verdict text, reading)`` of the claim that ``b`` is ``relation`` to ``a``."""
    if any(v is None for v in a + b):
        return "n/a", "not measurable (a run did not reach it)"
    verdict = compare(a, b)
    if verdict.exceeds is None:
        return verdict.text, "no verdict (1 seed)"
    lower = verdict.difference < 0
    if relation == "similar":
        if not verdict.exceeds:
            return verdict.text, "consistent (no difference beyond seed noise)"
        return verdict.text, f"not supported (b {'lower' if lower else 'higher'})"
    wanted_lower = relation in ("lower", "not higher")
    if relation.startswith("not "):
        if not verdict.exceeds:
            return verdict.text, "consistent (no difference beyond seed noise)"
        return verdict.text, "supported" if lower == wanted_lower else "not supported"
    if not verdict.exceeds:
        return verdict.text, "unresolved (within seed noise)"
    return verdict.text, "supported" if lower == wanted_lower else "contradicted"


def claims(result: dict, archs: list[str], with_initial: dict) -> list[dict]:
    """Each claim on each network judged on ``result``; for the probe readings also on
    ``with_initial`` (the same with the step-0 probe in the means)."""
    rows = []
    for arch in archs:
        for who, claim, key, a, b, relation in CLAIMS:
            va, vb = result[arch][a][key]["values"], result[arch][b][key]["values"]
            noise, reading = judge(relation, va, vb)
            alternative = ""
            if key in PROBE_READINGS:
                alternative = judge(relation, with_initial[arch][a][key]["values"],
                                    with_initial[arch][b][key]["values"])[1]
            rows.append(dict(arch=arch, who=who, claim=claim, reading_name=key, a=a, b=b,
                             relation=relation, noise=noise, verdict=reading,
                             verdict_with_initial_probe=alternative))
    return rows


def write_report(out: Path, args, folders: list[Path], archs: list[str], seconds: float,
                 sizes: tuple[int, int]) -> None:
    """``summary.md``, ``results.json``, ``metrics.csv``, ``ics.csv``, ``smoothness.csv`` and
    the figures, from the seeds' ``metrics.json``; ``sizes``: training and test examples."""
    metrics = read_seeds(folders, "metrics.json")
    result = aggregate(metrics, archs, args.target)
    checked = claims(result, archs, aggregate(metrics, archs, args.target, initial_probe=True))
    train_s = sum(run["seconds"] for m in metrics for arch in archs
                  for run in m["runs"][arch].values())
    config = dict(vars_record(args), archs=archs, seeds=[m["seed"] for m in metrics],
                  train_examples=sizes[0], test_examples=sizes[1],
                  command=command(), machine=machine(), torch=torch.__version__,
                  training_seconds=round(train_s), invocation_seconds=round(seconds))
    write_json(out / "results.json", dict(experiment="ics", config=config, readings=result,
                                          claims=checked))
    rows, ics_rows, smooth_rows = [], [], []
    for m in metrics:
        for arch in archs:
            for network, run in m["runs"][arch].items():
                key = dict(seed=m["seed"], arch=arch, network=network)
                rows += [dict(key, **p) for p in run["history"]]
                for probe in run["probes"]:
                    ics_rows += [dict(key, step=probe["step"], **r) for r in probe["ics"]]
                    s = probe["smoothness"]
                    smooth_rows.append(dict(key, step=probe["step"], loss=s["loss"],
                                            grad_norm=s["grad_norm"],
                                            loss_variation=s["loss_variation"],
                                            max_grad_change=s["max_grad_change"],
                                            beta=s["beta"]))
    write_csv(out / "metrics.csv", rows)
    write_csv(out / "ics.csv", ics_rows)
    write_csv(out / "smoothness.csv", smooth_rows)
    _figures(out, metrics, archs, args)
    (out / "summary.md").write_text(_summary(result, checked, config, archs, args))
    log(f"ics: wrote {out / 'summary.md'}, results.json, metrics.csv, ics.csv, "
        f"smoothness.csv, figures ({seconds:.0f} s)")


def vars_record(args) -> dict:
    keep = ("dataset", "vgg_steps", "vgg_lr", "mlp_steps", "mlp_lr", "width", "probes", "evals",
            "test_subset", "monitor_examples", "noise_mean", "noise_std", "step_sizes",
            "target")
    return {k: getattr(args, k) for k in keep}


def machine() -> str:
    """The CPU model and count (Linux), else the platform."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------------------------
# figures


def _curves(metrics, arch, network, field, source="history"):
    """Steps and a (seeds, points) array of ``field`` (history) or of a probe reading."""
    runs = [m["runs"][arch][network] for m in metrics]
    if source == "history":
        steps = [p["step"] for p in runs[0]["history"][1:]]
        values = [[p[field] for p in r["history"][1:]] for r in runs]
    elif source == "ics":
        steps = [p["step"] for p in runs[0]["probes"]]
        values = [[_mean(x[field] for x in p["ics"]) for p in r["probes"]] for r in runs]
    else:
        steps = [p["step"] for p in runs[0]["probes"]]
        values = [[p["smoothness"][field] for p in r["probes"]] for r in runs]
    return steps, np.array(values, dtype=float)


def _band(ax, metrics, arch, field, source="history"):
    for network, label in NETWORKS.items():
        steps, values = _curves(metrics, arch, network, field, source)
        plot_band(ax, steps, values, color=COLORS[network], label=label,
                  ls="--" if network == "no_bn" else "-")


def _figures(out: Path, metrics, archs, args) -> None:
    n = len(metrics)
    band = f"mean over {n} seed(s), band: min-max" if n > 1 else "1 seed"
    panels = {
        "training.png": [("train_loss", "history", "training loss (mini-batches)", True),
                         ("train_accuracy", "history", "training accuracy (mini-batches)", False),
                         ("test_accuracy", "history", "test accuracy (eval mode)", False)],
        "ics.png": [("l2", "ics", "ICS ||G - G'|| (mean over layers)", True),
                    ("cosine", "ics", "ICS cosine(G, G') (mean over layers)", False)],
        "smoothness.png": [("loss_variation", "smooth", "loss variation along the gradient",
                            True),
                           ("max_grad_change", "smooth", "gradient change (predictiveness)",
                            True),
                           ("beta", "smooth", "effective beta-smoothness", True)],
    }
    for name, columns in panels.items():
        extra = 1 if name == "ics.png" else 0
        with figure(out / name, len(archs), len(columns) + extra,
                    figsize=(4.6 * (len(columns) + extra), 3.6 * len(archs)),
                    title=f"{name[:-4]}: no BN / BN / noisy BN ({band})") as (_, axes):
            axes = np.asarray(axes).reshape(len(archs), -1)
            for row, arch in zip(axes, archs, strict=True):
                for ax, (field, source, title, log_y) in zip(row, columns, strict=False):
                    _band(ax, metrics, arch, field, source)
                    if log_y:
                        ax.set_yscale("log")
                    finish(ax, "training step", None, f"{arch}: {title}",
                           legend=dict(fontsize=7), fontsize=9)
                if extra:
                    _per_layer(row[-1], metrics, arch)
    _drift_figure(out / "drift.png", metrics, archs)


def _per_layer(ax, metrics, arch) -> None:
    """ICS l2 per weight layer, mean over probes; bars: mean ± std over seeds."""
    layers = [r["layer"] for r in metrics[0]["runs"][arch]["bn"]["probes"][0]["ics"]]
    x = np.arange(len(layers))
    for i, (network, label) in enumerate(NETWORKS.items()):
        per_seed = [[_mean(r["l2"] for p in m["runs"][arch][network]["probes"] for r in p["ics"]
                           if r["layer"] == layer) for layer in layers] for m in metrics]
        values = np.array(per_seed, dtype=float)
        ax.bar(x + (i - 1) * 0.27, values.mean(0), 0.27, yerr=values.std(0), label=label,
               color=COLORS[network], alpha=0.8)
    ax.set_xticks(x, [layer.split(".", 1)[-1] for layer in layers], rotation=60, fontsize=6)
    ax.set_yscale("log")
    finish(ax, "weight layer", None, f"{arch}: ICS per layer (mean over probes)",
           legend=dict(fontsize=7), fontsize=9)


def _drift_figure(path: Path, metrics, archs) -> None:
    with figure(path, len(archs), 4, figsize=(18, 3.8 * len(archs)),
                title="Distributional stability: drift per layer and one unit's input "
                      "percentiles (first seed)") as (_, axes):
        axes = np.asarray(axes).reshape(len(archs), -1)
        for row, arch in zip(axes, archs, strict=True):
            ax = row[0]
            layers = list(metrics[0]["runs"][arch]["bn"]["drift"])
            x = np.arange(len(layers))
            for i, (network, label) in enumerate(NETWORKS.items()):
                values = np.array([[m["runs"][arch][network]["drift"][layer]["drift"]
                                    for layer in layers] for m in metrics], dtype=float)
                ax.bar(x + (i - 1) * 0.27, values.mean(0), 0.27, yerr=values.std(0),
                       label=label, color=COLORS[network], alpha=0.8)
            ax.set_xticks(x, [layer.split(".", 1)[-1] for layer in layers], rotation=60,
                          fontsize=6)
            finish(ax, "input of", "drift D", f"{arch}: drift per layer",
                   legend=dict(fontsize=7), fontsize=9)
            for ax, (network, label) in zip(row[1:], NETWORKS.items(), strict=True):
                unit = metrics[0]["runs"][arch][network]["watched_unit"]
                steps = [r["step"] for r in unit["rows"]]
                for q, style in (("p85", ":"), ("p50", "-"), ("p15", ":")):
                    ax.plot(steps, [r[q] for r in unit["rows"]], style, color=COLORS[network],
                            label=f"{q[1:]}th percentile")
                finish(ax, "training step", None,
                       f"{arch} {label}: input of {unit['module']}, unit {unit['unit']}",
                       legend=dict(fontsize=7), fontsize=9)
            lows, highs = zip(*(ax.get_ylim() for ax in row[1:]), strict=True)
            for ax in row[1:]:
                ax.set_ylim(min(lows), max(highs))


# --------------------------------------------------------------------------------------------
# summary


def _summary(result, checked, config, archs, args) -> str:
    n = len(config["seeds"])
    lines = [
        "# How does BN help? Stability, ICS and smoothness side by side", "",
        "Ioffe & Szegedy attribute BN's speed-up to reducing internal covariate shift (ICS: the "
        "change of a layer's input distribution during training). Santurkar et al. (NeurIPS "
        "2018) argue (1) that injecting noise after BN destroys that stability without losing "
        "the speed, (2) that BN does not reduce ICS measured as gradient change, and (3) that "
        "BN smooths the loss landscape. This run measures all of it on the same networks.", "",
        "## Setup", "",
        f"- Data: {config['dataset']}, {config['train_examples']:,} training images; test "
        f"accuracy on {config['test_examples']:,} test images (the same for every seed), "
        f"percentiles over the first {args.monitor_examples} of them.",
    ]
    if "vgg" in archs:
        lines.append(
            f"- VGG-style CNN: 3 blocks of 2 3x3 convolutions ({args.width}-"
            f"{2 * args.width}-{4 * args.width} channels) + ReLU, max pool, FC 128, FC 10; "
            f"SGD momentum 0.9, learning rate {args.vgg_lr}, {args.vgg_steps} steps of 64.")
    if "mlp" in archs:
        lines.append(
            f"- Figure 1 MLP: three hidden layers of 100 sigmoid units, weights N(0, 0.1^2), "
            "biases 0, plain SGD, "
            f"learning rate {args.mlp_lr}, {args.mlp_steps} steps of 60; inputs standardized.")
    lines += [
        "- Networks: no BN; BN before every nonlinearity; noisy BN = BN followed by noise "
        f"N(mu, sigma^2) per element with mu ~ U(-{args.noise_mean}, {args.noise_mean}) and "
        f"sigma ~ U({args.noise_std.replace(',', ', ')}) redrawn per channel at every step. "
        "These ranges are ours: Santurkar et al. specify theirs in an appendix we could not "
        "consult; what matters is that the noise has non-zero mean and non-unit variance and "
        "changes every step.",
        "- Same initial weights, mini-batches and learning rate for the three networks of a "
        f"seed; seeds {', '.join(map(str, config['seeds']))} (n={n}).",
        f"- Probes at {args.probes} evenly spaced steps from step 0: ICS = Santurkar's "
        "Definition 2.1 with the optimizer's exact next step, over the weight layers "
        "(convolutions, linear layers); smoothness along the gradient at "
        f"{args.step_sizes} x the learning rate. Drift D = range of the median + range of the "
        "15-85 spread of each unit's input to its nonlinearity over the evaluations, in units "
        f"of its mean spread (`batchnorm.probes.layer_drift`), {args.evals} evaluations. The "
        "tables average the probes after step 0 (during training); the step-0 probe (at "
        "initialization, where the networks without BN are far rougher) is in the figures and "
        "in the last column of the claims table.",
        f"- Speed: steps to {args.target:.0%} training accuracy (mini-batches since the last "
        "evaluation) and the training loss averaged over the evaluations (area under the "
        "curve: lower = faster).",
        f"- Machine: {config['machine']}, torch {config['torch']}, 1 thread. Run time: "
        f"{config['training_seconds']} s of training (probes and evaluations included) "
        f"summed over the {len(archs) * 3 * n} runs, one after the other.",
        f"- Command: `{config['command']}`", "",
        f"**Noise rule.** {RULE}", "",
    ]
    for arch in archs:
        lines += [f"## {TITLES[arch]}", "",
                  "| reading | " + " | ".join(NETWORKS.values()) + " |", "|---|---|---|---|"]
        for key, (title, kind, digits) in READINGS.items():
            cells = [describe(result[arch][net][key]["values"], digits, kind)
                     for net in NETWORKS]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The mechanism claims against our numbers", "",
              "| network | source | claim | reading: a -> b | beyond seed noise? | verdict | "
              "verdict with the step-0 probe |", "|---|---|---|---|---|---|---|"]
    for row in checked:
        a, b = row["a"], row["b"]
        lines.append(f"| {row['arch']} | {row['who']} | {row['claim']} | {row['reading_name']}:"
                     f" {NETWORKS[a]} -> {NETWORKS[b]} | {row['noise']} | {row['verdict']} | "
                     f"{row['verdict_with_initial_probe'] or '-'} |")
    lines += ["", "Verdicts: *supported* / *contradicted* = the difference goes the claimed way "
              "/ the other way and exceeds seed noise; *unresolved* = within seed noise. For "
              "the \"does not\" and \"about as\" claims a difference within the noise is "
              "*consistent* with the claim (not proof of it).", "",
              *_plainly(checked), "", *_caveats(config, archs, args), "",
              "![training](training.png)", "", "![drift](drift.png)", "", "![ics](ics.png)", "",
              "![smoothness](smoothness.png)", "",
              "Files: `results.json` (all readings per seed, the claims), `metrics.csv` "
              "(training curves), `ics.csv` (per layer and probe), `smoothness.csv`, "
              "`seed-<s>/metrics.json` (everything of one seed).", ""]
    return "\n".join(lines)


def _plainly(checked: list[dict]) -> list[str]:
    """The claims table in words: which claims the numbers support on both networks, on one,
    or on none."""
    by_claim: dict[tuple[str, str], list[str]] = {}
    for row in checked:
        by_claim.setdefault((row["who"], row["claim"]), []).append(
            f"{row['arch']} {row['verdict'].split(' (')[0]}")
    lines = ["In words (per claim, network by network):", ""]
    for (who, claim), verdicts in by_claim.items():
        lines.append(f"- {who}: {claim}: {'; '.join(verdicts)}.")
    return lines


def _caveats(config: dict, archs: list[str], args) -> list[str]:
    epochs = {arch: getattr(args, f"{arch}_steps") * (64 if arch == "vgg" else 60)
              / config["train_examples"] for arch in archs}
    return [
        "## Caveats", "",
        "- The noise ranges are ours (Setup). At every BN layer the noise here is about as "
        "large as the signal (BN's output has variance 1; the noise adds "
        f"{float(args.noise_std.split(',')[0]) ** 2:.3g} to "
        f"{float(args.noise_std.split(',')[-1]) ** 2:.3g} and a mean shift up to "
        f"{args.noise_mean}). Whether noisy BN keeps BN's speed depends on that size; other "
        "sizes: `--noise-mean`, `--noise-std`.",
        "- Short runs (" + ", ".join(f"{arch} {epochs[arch]:.1f} epochs" for arch in archs)
        + ") at one learning rate per architecture, at which the network without BN trains; "
        "BN's larger advantage at higher rates is `reproduce lr-sweep`'s subject.",
        "- The raw ICS l2, gradient change, loss variation and beta are not scale-free: with BN "
        "a layer's gradient shrinks as its weights grow (scale invariance). The relative ICS "
        "and the cosine are scale-free.",
        "- Noisy BN's test accuracy is measured with its noise on (its later BN layers' moving "
        "averages were collected under noise); the row \"noise off\" shows what removing it "
        "at test time does."]
