"""The report of ``batchnorm reproduce inception``: the Figure 2 analogue (test accuracy against
step, every variant), the Figure 3 analogue table (steps to plain Inception's maximum, against
the paper's) and ``summary.md``, all read back from the variants' ``history.json`` files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from batchnorm.repro.common import log, steps_to_reach, world_size, write_csv, write_json
from batchnorm.repro.image_data import Data
from batchnorm.repro.report import (
    at_chance,
    command_line,
    figure,
    finish,
    format_steps,
    plot_band,
)
from batchnorm.repro.seeds import RULE, command, describe, noise_text, read_seeds

PAPER_RANKING = ("bn-x30 > bn-x5 > bn-baseline > inception > bn-x5-sigmoid (inception-x5 "
                 "diverged, inception-sigmoid at chance)")


def analyse(records: dict[str, dict], num_classes: int, test_size: int) -> dict:
    """Per variant: max accuracy (and its step), steps to reach plain Inception's max, speed-up
    over Inception, divergence, and whether it stayed at chance level."""
    chance = 1.0 / num_classes
    target = None
    if "inception" in records and records["inception"]["history"]:
        target = max(p["test_accuracy"] for p in records["inception"]["history"])
    table = levels(records, target)
    at_max = table[-1] if table else None  # the last level is plain Inception's maximum itself
    rows = {}
    for name, record in records.items():
        history = record["history"]
        best = max(history, key=lambda p: p["test_accuracy"])
        rows[name] = dict(
            max_accuracy=best["test_accuracy"], max_accuracy_step=best["step"],
            final_accuracy=history[-1]["test_accuracy"],
            steps_to_inception_max=at_max["steps"][name] if at_max else None,
            speedup_vs_inception=at_max["speedup"][name] if at_max else None,
            diverged=record["diverged"], steps_done=record["steps_done"],
            # the paper's "stayed at chance": no evaluation after the start was better
            at_chance=all(at_chance(p["test_accuracy"], num_classes, test_size)
                          for p in history[1:]),
            final_at_chance=at_chance(history[-1]["test_accuracy"], num_classes, test_size),
            lr=record["spec"]["lr"],
        )
    level = (plateau(records["inception"]["history"], test_size)
             if "inception" in records and records["inception"]["history"] else None)
    return dict(inception_max_accuracy=target, chance=chance, variants=rows,
                inception_plateau=level, levels=table)


# fractions of plain Inception's maximum at which the speed-ups are read: the maximum itself
# (last; the Figure 3 table's column) and lower levels, which show whether a speed-up depends on
# one maximum of many noisy evaluations
LEVELS = (0.9, 0.95, 0.97, 0.99, 1.0)


def levels(records: dict[str, dict], target: float | None) -> list[dict]:
    """Per level (a fraction of plain Inception's maximum ``target``): its accuracy, and per
    variant the steps to reach it and the speed-up over plain Inception (None: not reached)."""
    if target is None:
        return []
    out = []
    for fraction in LEVELS:
        accuracy = fraction * target
        steps = {name: steps_to_reach(r["history"], accuracy) for name, r in records.items()}
        base = steps.get("inception")
        out.append(dict(fraction=fraction, accuracy=accuracy, steps=steps,
                        speedup={n: (base / s if base and s else None)
                                 for n, s in steps.items()}))
    return out


def plateau(history: list[dict], test_size: int) -> dict | None:
    """Whether plain Inception's accuracy has levelled off, so that its maximum is the plateau
    the paper's Figure 3 measures: the best evaluation in the last quarter of the run against
    the best before it. Levelled off when the last quarter gains no more than two binomial
    standard errors of one evaluation (``sqrt(p (1 - p) / test_size)`` at the earlier best);
    None with fewer than 8 evaluations."""
    points = [p for p in history if p["test_accuracy"] is not None]
    if len(points) < 8:
        return None
    cut = points[-1]["step"] * 3 / 4
    before = max(p["test_accuracy"] for p in points if p["step"] <= cut)
    last = max(p["test_accuracy"] for p in points if p["step"] > cut)
    se = math.sqrt(before * (1 - before) / test_size)
    return dict(from_step=int(cut), best_before=before, best_last_quarter=last,
                gain=last - before, standard_error=se, levelled=last - before <= 2 * se)


def write_report(out: Path, args, data: Data, device, *, names: list[str], args_record: dict,
                 decay_every: int) -> None:
    """``results.json``, ``metrics.csv``, ``figure2.png`` and ``summary.md`` from the records
    ``out/<name>/history.json`` of the variants ``names`` that have one. ``args_record``: the
    arguments to record; ``decay_every``: the x1 schedule's steps between decays."""
    records = {}
    for name in names:
        path = out / name / "history.json"
        if path.exists():
            records[name] = json.loads(path.read_text())
    if not records:
        return
    n_train, n_test = data.sizes()
    analysis = analyse(records, data.num_classes, n_test)
    write_json(out / "results.json", dict(
        experiment="inception", dataset=data.name, train_examples=n_train, test_examples=n_test,
        device=str(device), threads=torch.get_num_threads(), world_size=world_size(),
        args=args_record, command=getattr(args, "seed_command", None) or command_line(),
        analysis=analysis,
        variants={k: dict(spec=v["spec"], diverged=v["diverged"], steps_done=v["steps_done"],
                          seconds=v["seconds"], history=v["history"]) for k, v in records.items()},
    ))
    write_csv(out / "metrics.csv", [dict(variant=k, **p) for k, v in records.items()
                                    for p in v["history"]])
    _figure2(out / "figure2.png", records, analysis, data)
    (out / "summary.md").write_text(_summary(records, analysis, args, data, device,
                                             decay_every))
    log(f"inception: wrote {out / 'summary.md'}, figure2.png, results.json, metrics.csv")


def _figure2(path: Path, records, analysis, data: Data) -> None:
    with figure(path, figsize=(7.5, 4.8)) as (_, ax):
        for record in records.values():
            steps = [p["step"] for p in record["history"]]
            acc = [p["test_accuracy"] for p in record["history"]]
            style = "-" if record["variant"]["bn"] else "--"
            (line,) = ax.plot(steps, acc, style, label=record["variant"]["name"], lw=1.6)
            if record["diverged"]:
                ax.plot([record["diverged"]["step"]], [acc[-1]], "x", color=line.get_color(),
                        ms=10, mew=2)
        if analysis["inception_max_accuracy"] is not None:
            ax.axhline(analysis["inception_max_accuracy"], color="gray", lw=0.8, ls=":",
                       label="Inception's max")
        ax.axhline(analysis["chance"], color="black", lw=0.6, ls=":", label="chance")
        finish(ax, "training step", "test accuracy (top-1)",
               f"Figure 2 analogue: {data.name}, single crop (x = diverged)",
               legend=dict(fontsize=8, loc="lower right"))


def _level_lines(table: list[dict], rows: dict) -> list[str]:
    if not table:
        return []
    lines = ["", "Steps to lower levels (fractions of plain Inception's maximum), speed-up over "
             "plain Inception in brackets:", "",
             "| network | " + " | ".join(f"{100 * t['fraction']:.0f}% ({t['accuracy']:.4f})"
                                        for t in table) + " |",
             "|---|" + "---|" * len(table)]
    for name in rows:
        cells = []
        for t in table:
            steps, speed = t["steps"][name], t["speedup"][name]
            cells.append("never" if steps is None else f"{steps:,}"
                         + ("" if speed is None else f" ({speed:.1f}x)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _plateau_lines(level: dict | None) -> list[str]:
    if level is None:
        return []
    verdict = ("levelled off by this rule, so its maximum stands for the plateau the paper's "
               "72.2% is" if level["levelled"] else
               "was still rising by this rule: its maximum is not yet a plateau, so the "
               "speed-ups below measure reaching a level plain Inception passes on its way up, "
               "not Figure 3's")
    return [f"Plateau rule: plain Inception's best test accuracy in the last quarter of its run "
            f"gains at most 2 binomial standard errors of one evaluation on its best before. "
            f"Here: {level['best_last_quarter']:.4f} after step {level['from_step']:,} vs "
            f"{level['best_before']:.4f} up to it, a gain of {level['gain']:+.4f} against "
            f"{2 * level['standard_error']:.4f}: {verdict}.", ""]


def _summary(records, analysis, args, data: Data, device, decay_every: int) -> str:
    n_train, n_test = data.sizes()
    rows = analysis["variants"]
    target = analysis["inception_max_accuracy"]
    lines = ["# Inception variants (paper section 4.2, Figures 2 and 3)", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [
        f"Data: **{data.name}**, {n_train} training / {n_test} test examples; "
        f"{args.steps} steps of {args.batch_size} per variant; width x{args.width}; "
        f"device {device}"
        + (f" ({torch.get_num_threads()} thread(s))" if device.type == "cpu" else "")
        + (f" x {world_size()} processes" if world_size() > 1 else "") + ". "
        f"Base (x1) learning rate {args.base_lr}, momentum {args.momentum}, weight decay "
        f"{args.base_weight_decay} (accelerated: /5), x0.96 learning-rate decay every "
        f"{decay_every} steps (accelerated: 6x as often). "
        f"Seed {args.seed}.",
        "",
        "## Figure 3 analogue",
        "",
        f"Target = plain Inception's maximum test accuracy here "
        f"({'n/a' if target is None else f'{target:.4f}'}); the paper's is 72.2% (ImageNet).",
        "",
    ] + _plateau_lines(analysis["inception_plateau"]) + [
        "| network | LR (ours) | steps to Inception's max | speed-up | max accuracy (step) "
        "| paper LR | paper steps to 72.2% | paper max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        v = records[name]["variant"]
        if row["diverged"]:
            reach = f"diverged at step {row['diverged']['step']}"
        elif row["steps_to_inception_max"] is None and not records[name].get("complete", True):
            reach = f"not in its first {row['steps_done']:,} (stopped there)"
        else:
            reach = format_steps(row["steps_to_inception_max"])
        speed = f"{row['speedup_vs_inception']:.1f}x" if row["speedup_vs_inception"] else "-"
        paper_max = ("-" if v["paper_max_accuracy"] is None
                     else f"{100 * v['paper_max_accuracy']:.1f}%")
        paper_steps = (format_steps(v["paper_steps"]) if v["paper_max_accuracy"]
                       else v["paper_note"])
        ran = ("" if records[name].get("complete", True) or row["diverged"]
               else f", stopped at {row['steps_done']:,}")
        lines.append(
            f"| {name} | {row['lr']:.4g} | {reach} | {speed} | {100 * row['max_accuracy']:.2f}% "
            f"({row['max_accuracy_step']}{ran}) | {v['paper_lr']} | {paper_steps} | {paper_max} |")
    lines += _level_lines(analysis["levels"], rows)
    lines += ["", "## The paper's failure cases and other observations", ""]
    for name, row in rows.items():
        if row["diverged"]:
            d = row["diverged"]
            lines.append(
                f"- **{name} diverged** at step {d['step']}: {d['reason']}; "
                f"{d['nonfinite_parameters']} of {d['total_parameters']} parameters non-finite "
                f"({d['infinite_parameters']} infinite).")
        elif row["at_chance"]:
            lines.append(f"- **{name} stayed at chance level** ({100 * analysis['chance']:.0f}%): "
                         f"max {100 * row['max_accuracy']:.2f}%.")
    for name, expectation in (("inception-x5", "diverges"),
                              ("inception-sigmoid", "stays at chance")):
        row = rows.get(name)
        if row is None or row["diverged"] or (name == "inception-sigmoid" and row["at_chance"]):
            continue
        did = "its loss and parameters stayed finite" if name == "inception-x5" else (
            "it rose above chance")
        end = " (at chance at the end)" if row["final_at_chance"] else ""
        lines.append(f"- {name}: the paper says it {expectation}; here {did}: max accuracy "
                     f"{100 * row['max_accuracy']:.2f}%, final "
                     f"{100 * row['final_accuracy']:.2f}%{end}.")
    order = sorted((n for n in rows if not rows[n]["diverged"]),
                   key=lambda n: -rows[n]["max_accuracy"])
    lines += ["", "Ranking by maximum accuracy here: " + " > ".join(order) + ". The paper's: "
              f"{PAPER_RANKING}.", "",
              f"Training time: {sum(r['seconds'] for r in records.values()):.0f} s over "
              f"{len(records)} variants ("
              + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in records.items()) + ").", "",
              "Figure 2 analogue: `figure2.png` (test accuracy vs. training step, all variants). "
              "Per-variant curves: `*/history.json`, `metrics.csv`; everything: `results.json`.",
              ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# several seeds

# (variant a, variant b): the differences the paper's Figure 3 ranking rests on
COMPARISONS = (("inception", "bn-baseline"), ("inception", "bn-x5"), ("inception", "bn-x30"),
               ("bn-baseline", "bn-x5"), ("bn-x5", "bn-x30"), ("bn-x5-sigmoid", "inception"))


def write_seeds(out: Path, folders: list[Path], seconds: float) -> None:
    """The summary of ``--seeds N``: per variant, the maximum and final accuracy as mean ± std
    over the seeds and how many seeds diverged or stayed at chance; whether the differences of
    maximum accuracy that the paper's ranking rests on exceed seed noise; ``figure2.png`` with
    each variant's mean curve and min-max band; ``results.json`` and ``metrics.csv``."""
    records = read_seeds(folders, "results.json")
    n = len(records)
    names = list(records[0]["analysis"]["variants"])
    rows = {name: [r["analysis"]["variants"][name] for r in records] for name in names}
    lines = [f"# Inception variants over {n} seeds (paper section 4.2, Figures 2 and 3)", "",
             f"Seeds {', '.join(str(r['args']['seed']) for r in records)}: each is a complete "
             "one-seed run in `seed-<s>/` (its own summary, figure and files). Data: "
             f"{records[0]['dataset']}, {records[0]['args']['steps']} steps of "
             f"{records[0]['args']['batch_size']} per variant, width x{records[0]['args']['width']}"
             ".", "", f"**Noise rule.** {RULE}", "",
             "| network | max accuracy | final accuracy | steps to Inception's max (per seed) "
             "| diverged | stayed at chance |", "|---|---|---|---|---|---|"]
    for name, per_seed in rows.items():
        lines.append(
            f"| {name} | {describe([r['max_accuracy'] for r in per_seed])} | "
            f"{describe([r['final_accuracy'] for r in per_seed])} | "
            f"{describe([r['steps_to_inception_max'] for r in per_seed], kind='d')} | "
            f"{sum(bool(r['diverged']) for r in per_seed)}/{n} | "
            f"{sum(bool(r['at_chance']) for r in per_seed)}/{n} |")
    lines += ["", "Differences of maximum accuracy (b - a):", "",
              "| a | b | b - a | beyond seed noise? |", "|---|---|---|---|"]
    for a, b in COMPARISONS:
        if a in rows and b in rows:
            va = [r["max_accuracy"] for r in rows[a]]
            vb = [r["max_accuracy"] for r in rows[b]]
            lines.append(f"| {a} | {b} | {(sum(vb) - sum(va)) / n:+.4f} | {noise_text(va, vb)} |")
    lines += ["", f"The paper's ranking: {PAPER_RANKING}.", "",
              "![Figure 2 over the seeds](figure2.png)", "",
              f"Files: `figure2.png`, `results.json`, `metrics.csv`, `seed-<s>/`. Command: "
              f"`{command()}` (run time "
              f"{sum(v['seconds'] for r in records for v in r['variants'].values()):.0f} s of "
              "training summed over the seeds).", ""]
    (out / "summary.md").write_text("\n".join(lines))
    write_json(out / "results.json", dict(
        experiment="inception over seeds", seeds=[r["args"]["seed"] for r in records],
        command=command(), seconds=round(seconds, 1), rule=RULE, variants=rows))
    write_csv(out / "metrics.csv", [dict(seed=r["args"]["seed"], variant=name, **p)
                                    for r in records for name in names
                                    for p in r["variants"][name]["history"]])
    with figure(out / "figure2.png", figsize=(7.5, 4.8)) as (_, ax):
        for i, name in enumerate(names):
            histories = [r["variants"][name]["history"] for r in records]
            length = min(len(h) for h in histories)  # diverged runs stop early
            plot_band(ax, [p["step"] for p in histories[0][:length]],
                      [[p["test_accuracy"] for p in h[:length]] for h in histories],
                      color=f"C{i}", label=name, ls="-" if name.startswith("bn") else "--")
        ax.axhline(records[0]["analysis"]["chance"], color="black", lw=0.6, ls=":",
                   label="chance")
        finish(ax, "training step", "test accuracy (top-1)",
               f"Figure 2 analogue over {n} seeds (mean, band: min-max)",
               legend=dict(fontsize=8, loc="lower right"))
    log(f"inception: wrote {out / 'summary.md'}, figure2.png, results.json, metrics.csv over "
        f"{n} seeds")

