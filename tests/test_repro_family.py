"""``batchnorm reproduce small-batch`` and ``batchnorm reproduce ghost`` end to end on tiny
data, the non-i.i.d. batch order, and the grid's building blocks."""

import csv
import json
import math

import pytest
import torch
from test_repro_ics import without_times

import batchnorm
from batchnorm.cli import main
from batchnorm.repro.common import ArgumentError
from batchnorm.repro.image_data import ClassBatches
from batchnorm.repro.norm_grid import Condition, norm_layer, scaled_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--dataset", "synthetic", "--train-subset", "0", "--test-subset", "0",
          "--no-progress", "--evals", "2"]
SMALL = ["reproduce", "small-batch", *COMMON, "--batch-sizes", "2,8", "--epochs", "0.5",
         "--non-iid-batch", "16", "--classes-per-batch", "2", "--channels", "4"]
GHOST = ["reproduce", "ghost", *COMMON, "--small-batch", "8", "--large-batch", "128",
         "--ghost-batch", "8", "--epochs", "2", "--channels", "4"]
FILES = ("figure.png", "summary.md", "results.json", "metrics.csv")


def _same_but_times(a, b):
    """Two one-seed outputs agree except in wall-clock times and the command."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r["config"].pop("command")
    assert without_times(ra) == without_times(rb)
    ca, cb = ([{k: v for k, v in row.items() if k != "seconds"}
               for row in csv.DictReader((d / "metrics.csv").open())] for d in (a, b))
    assert ca == cb and len(ca) > 0


def test_small_batch_over_seeds_resume_and_same_seed(tmp_path, capsys):
    out = tmp_path / "sb"
    assert main([*SMALL, "--seeds", "2", "--out", str(out)]) == 0
    for name in (*FILES, *(f"seed-{s}/{f}" for s in (0, 1) for f in FILES)):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["experiment"] == "small-batch"
    rows = {r["key"]: r for r in results["results"]}
    assert len(rows) == 9  # (B=2, B=8, non-i.i.d. B=16) x (BN, Renorm, Ghost BN)
    assert all(len(r["final_accuracy"]) == 2 and len(r["outcomes"]) == 2 for r in rows.values())
    # Ghost BN with g=4 >= B=2 is BN: reused, not trained again
    ghost2 = rows["i.i.d., B=2, Ghost BN (g=4)"]
    assert ghost2["same_as"] == "i.i.d., B=2, BN"
    assert ghost2["final_accuracy"] == rows["i.i.d., B=2, BN"]["final_accuracy"]
    assert rows["i.i.d., B=8, Ghost BN (g=4)"]["same_as"] is None
    # linear learning-rate scaling and equal epochs: steps = epochs x examples / B
    b8 = rows["i.i.d., B=8, BN"]
    assert b8["lr"] == pytest.approx(0.05 * 8 / 64) and b8["steps"] == round(0.5 * 512 / 8)
    assert rows["non-i.i.d., B=16, BN"]["classes_per_batch"] == 2
    labels = [t["label"] for t in results["comparisons"]]
    assert "i.i.d., B=2, Batch Renorm - BN" in labels and "BN: B=2 - B=8 (i.i.d.)" in labels
    assert "non-i.i.d., B=16, Batch Renorm - BN" in labels
    assert "i.i.d., B=2, Ghost BN (g=4) - BN" not in labels  # the same run: nothing to test
    assert len(labels) == len(set(labels)) == 7
    for t in results["comparisons"]:
        assert t["text"].startswith(("yes (p", "no (p"))
        a, b = rows[t["a"]]["final_accuracy"], rows[t["b"]]["final_accuracy"]
        assert t["difference"] == pytest.approx(sum(b) / 2 - sum(a) / 2)
    summary = (out / "summary.md").read_text()
    assert "Batch Renorm keeps most of BN's accuracy" in summary and "(n=2)" in summary
    assert "Welch" in summary and "| i.i.d., B=2, Batch Renorm - BN |" in summary
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("seed,group,batch_size,norm,ghost_batch_size,step")
    one = json.loads((out / "seed-1" / "results.json").read_text())
    assert one["config"]["seed"] == 1 and len(one["runs"]) == 9
    assert "n/a (1 seed)" in (out / "seed-1" / "summary.md").read_text()

    # --resume keeps the finished seeds: the same summary numbers
    capsys.readouterr()
    assert main([*SMALL, "--seeds", "2", "--resume", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already finished") == 2
    again = json.loads((out / "results.json").read_text())
    assert without_times(again["results"]) == without_times(results["results"])

    # a seed's folder is what the one-seed command writes: same seed, same result
    alone = tmp_path / "alone"
    assert main([*SMALL, "--seeds", "1", "--seed", "1", "--out", str(alone)]) == 0
    assert one["config"]["command"].endswith(f"--seeds 1 --seed 1 --out {out / 'seed-1'}")
    _same_but_times(out / "seed-1", alone)


def test_ghost_end_to_end(tmp_path):
    out = tmp_path / "ghost"
    assert main([*GHOST, "--seeds", "1", "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    small, large, ghost = results["runs"]
    assert (small["group"], small["batch_size"], small["norm"]) == ("small", 8, "bn")
    assert (large["batch_size"], large["norm"]) == (128, "bn")
    assert (ghost["batch_size"], ghost["norm"], ghost["ghost_batch_size"]) == (128, "ghost", 8)
    # the paper's square-root rule, the same epochs for all
    assert large["lr"] == pytest.approx(0.05 * math.sqrt(128 / 8)) == ghost["lr"]
    assert small["steps"] == 2 * 512 // 8 and large["steps"] == 2 * 512 // 128
    assert [t["label"] for t in results["comparisons"]] == [
        "large BN - small BN (the gap)", "large Ghost BN - small BN (the gap with ghost batches)",
        "large Ghost BN - large BN (what ghost batches recover)"]
    assert all(t["text"] == "n/a (1 seed)" for t in results["comparisons"])
    summary = (out / "summary.md").read_text()
    assert "Ghost BN narrows the generalization gap" in summary and "Hoffer" in summary
    assert "run with `--seeds 3`" in summary


def test_class_batches_hold_few_classes_and_depend_on_the_step_alone():
    labels = torch.arange(10).repeat_interleave(30)
    order = iter(ClassBatches(labels, 32, 2, seed=3))
    batches = [next(order) for _ in range(50)]
    for batch in batches:
        assert len(batch) == 32 and len(set(batch)) == 32  # distinct examples
        classes = labels[batch]
        assert len(set(classes.tolist())) <= 2
        assert sorted(torch.bincount(classes).tolist())[-2:] == [16, 16]
    assert len({tuple(sorted(set(labels[b].tolist()))) for b in batches}) > 5  # classes vary
    assert batches[0] != sorted(batches[0])  # shuffled: a virtual batch is not one class
    resumed = iter(ClassBatches(labels, 32, 2, seed=3, start=7))
    assert next(resumed) == batches[7]
    assert next(iter(ClassBatches(labels, 32, 2, seed=4))) != batches[0]
    uneven = next(iter(ClassBatches(labels, 7, 3, seed=0)))
    assert sorted(torch.bincount(labels[uneven]).tolist())[-3:] == [2, 2, 3]
    for args, message in [((labels, 32, 11, 0), "--classes-per-batch must be between 1"),
                          ((labels, 1, 2, 0), "cannot hold 2 classes"),
                          ((labels, 128, 2, 0), "use a larger --train-subset")]:
        with pytest.raises(ArgumentError, match=message):
            ClassBatches(*args)


def test_norm_layers_and_the_scaled_schedule():
    common = dict(group="i.i.d.", batch_size=8, steps=1600, lr=0.1)
    renorm = norm_layer(Condition(norm="renorm", **common))(6, "relu")
    assert isinstance(renorm, batchnorm.BatchRenorm2d) and renorm.momentum == 0.01
    # BN first, for max(1600 / 16, 3 / 0.01) = 300 steps; r_max = 3 at 800, d_max = 5 at
    # 300 + 500 x 20/35
    assert renorm.bounds(0) == (1.0, 0.0) and renorm.bounds(300) == (1.0, 0.0)
    assert renorm.bounds(586)[1] == 5.0 and renorm.bounds(585)[1] < 5.0
    assert renorm.bounds(800)[0] == 3.0 and 1 < renorm.bounds(500)[0] < 3
    long = scaled_schedule(32_000)  # long runs: the paper's proportions
    assert long["r_max"](2000) == 1.0 and long["r_max"](2001) > 1.0
    assert long["d_max"](10_572) == 5.0 and long["r_max"](16_000) == 3.0
    ghost = norm_layer(Condition(norm="ghost", ghost_batch_size=4, **common))(6, "relu")
    assert isinstance(ghost, batchnorm.GhostBatchNorm2d) and ghost.ghost_batch_size == 4
    faster = norm_layer(Condition(norm="renorm", **common), 0.1)(6, "relu")
    assert faster.momentum == 0.1 and faster.bounds(100) == (1.0, 0.0)  # warm-up 3/0.1 = 30
    assert faster.bounds(101)[0] > 1.0
    bn = norm_layer(Condition(norm="bn", **common))(6, "relu")
    assert type(bn) is batchnorm.BatchNorm2d and bn.activation == "relu"
    for steps in (1, 2, 3, 50):  # short runs still give a valid ramp
        tiny = scaled_schedule(steps)
        assert tiny["r_max"](steps) == 3.0 and tiny["d_max"](0) == 0.0


@pytest.mark.parametrize("argv, message", [
    (["small-batch", "--batch-sizes", "1,4"], "--batch-sizes must all be >= 2"),
    (["small-batch", "--batch-sizes", "4,x"], "--batch-sizes must be comma-separated positive"),
    (["small-batch", "--classes-per-batch", "5"], "--classes-per-batch must be between 1 and"),
    (["small-batch", "--epochs", "0"], "--epochs must be positive, got 0"),
    (["small-batch", "--renorm-momentum", "0"], "--renorm-momentum must be in (0, 1], got 0"),
    (["small-batch", "--batch-sizes", "4096"], "batch size 4096 is larger than the training"),
    (["ghost", "--small-batch", "64", "--large-batch", "32"], "need 2 <= --small-batch < "),
    (["ghost", "--ghost-batch", "1"], "--ghost-batch must be >= 2"),
    (["ghost", "--evals", "0"], "--evals must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    assert main(["reproduce", *argv, "--dataset", "synthetic", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"batchnorm reproduce {argv[0]}: {message}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
