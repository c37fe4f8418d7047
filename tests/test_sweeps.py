"""``batchnorm reproduce lr-sweep`` and ``batchnorm reproduce depth`` end to end on tiny data."""

import json
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.cli import main
from batchnorm.repro.common import parse_numbers
from batchnorm.repro.depth import network
from batchnorm.repro.report import at_chance, format_steps
from batchnorm.repro.sweep import outcome

COMMON = ["--dataset", "synthetic", "--train-subset", "0", "--test-subset", "0",
          "--batch-size", "16", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_sweep_end_to_end(tmp_path):
    out = tmp_path / "lr"
    # x1 trains; x1e12 blows up (inf/nan within 10 steps): it must be recorded as diverged.
    assert main(["reproduce", "lr-sweep", *COMMON, "--steps", "80", "--eval-every", "40",
                 "--channels", "8", "--base-lr", "0.05", "--multipliers", "1,1e12",
                 "--target", "0.5", "--out", str(out)]) == 0
    for name in ("figure.png", "summary.md", "results.json", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    runs = {(r["bn"], r["multiplier"]): r for r in results["runs"]}
    assert set(runs) == {(False, 1.0), (True, 1.0), (False, 1e12), (True, 1e12)}
    assert runs[(False, 1e12)]["diverged"]["step"] <= 80
    assert runs[(False, 1e12)]["steps_done"] == runs[(False, 1e12)]["diverged"]["step"]
    assert runs[(False, 1e12)]["lr"] == pytest.approx(5e10)
    assert runs[(True, 1.0)]["diverged"] is None
    assert runs[(True, 1.0)]["best_accuracy"] > 0.5  # it learns (4 classes, chance 0.25)
    assert runs[(True, 1.0)]["steps_to_target"] in (40, 80)
    assert [p["step"] for p in runs[(True, 1.0)]["history"]] == [0, 40, 80]
    summary = (out / "summary.md").read_text()
    assert "| x1 (0.05) |" in summary and "diverged at step" in summary
    assert results["config"]["multipliers"] == [1.0, 1e12]


def test_depth_end_to_end(tmp_path):
    out = tmp_path / "depth"
    assert main(["reproduce", "depth", *COMMON, "--steps", "60", "--eval-every", "30",
                 "--depths", "1,4", "--width", "16", "--lr", "0.1", "--out", str(out)]) == 0
    for name in ("figure.png", "summary.md", "results.json", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["depth"], r["bn"]) for r in results["runs"]) == [
        (1, False), (1, True), (4, False), (4, True)]
    for r in results["runs"]:
        assert r["final_accuracy"] == r["history"][-1]["test_accuracy"]
        assert [p["step"] for p in r["history"]] == [0, 30, 60]
    shallow_bn = next(r for r in results["runs"] if r["depth"] == 1 and r["bn"])
    assert shallow_bn["final_accuracy"] > 0.5
    summary = (out / "summary.md").read_text()
    assert "| 1 |" in summary and "| 4 |" in summary


@pytest.mark.parametrize("bn", [True, False])
def test_depth_network(bn):
    torch.manual_seed(0)
    model = network(784, 10, 5, width=100, bn=bn)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 100)] + [(100, 100)] * 4 \
        + [(100, 10)]
    assert all((m.bias is None) == bn for m in linears[:-1])
    assert sum(isinstance(m, nn.Sigmoid) for m in model) == 5
    assert sum(isinstance(m, batchnorm.BatchNorm1d) for m in model) == (5 if bn else 0)
    assert math.isclose(float(linears[0].weight.detach().std()), 1 / math.sqrt(784), rel_tol=0.05)
    assert model(torch.randn(3, 784)).shape == (3, 10)
    with pytest.raises(ValueError, match="depth"):
        network(784, 10, 0, width=100, bn=bn)


def test_helpers():
    assert parse_numbers("1, 5,10,30", "--multipliers") == [1, 5, 10, 30]
    assert parse_numbers("3,5", "--depths", kind=int) == [3, 5]
    for bad in ("", "1,x", "1,-2"):
        with pytest.raises(ValueError, match="--multipliers"):
            parse_numbers(bad, "--multipliers")
    with pytest.raises(ValueError, match="--depths must be comma-separated positive whole"):
        parse_numbers("3,2.5", "--depths", kind=int)
    assert [format_steps(s) for s in (None, 250, 4500, 2.7e6)] == ["never", "250", "4,500",
                                                                      "2.7e+06"]
    assert at_chance(0.1, 10, 10_000) and not at_chance(0.2, 10, 10_000)
    assert at_chance(0.25, 4, 100) and not at_chance(0.5, 4, 100)
    assert outcome(dict(diverged=dict(step=7), at_chance=True)) == "diverged at step 7"
    assert outcome(dict(diverged=None, at_chance=True)) == "ended at chance"
    assert outcome(dict(diverged=None, at_chance=False)) == "trained"


@pytest.mark.parametrize("argv, message", [
    (["lr-sweep", "--multipliers", "1,x"], "--multipliers must be comma-separated positive"),
    (["depth", "--depths", "3,0"], "--depths must be comma-separated positive whole numbers"),
    (["depth", "--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_not_a_traceback(tmp_path, capsys, argv, message):
    assert main(["reproduce", *argv, "--out", str(tmp_path / "out"), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert f"batchnorm reproduce {argv[0]}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()



def _same_but_times(a, b):
    """The outputs of two runs agree except where they record wall-clock time or the
    command (which names the output folder)."""
    from test_repro_ics import without_times

    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r["config"].pop("command")
    assert without_times(ra) == without_times(rb)
    assert (a / "metrics.csv").read_text().count("\n") == (b / "metrics.csv").read_text().count(
        "\n")


def test_depth_over_seeds(tmp_path):
    args = [*COMMON, "--steps", "20", "--eval-every", "10", "--depths", "1,3", "--width", "8",
            "--lr", "0.1"]
    out = tmp_path / "seeds"
    assert main(["reproduce", "depth", *args, "--seeds", "2", "--seed", "1",
                 "--out", str(out)]) == 0
    for name in ("figure.png", "summary.md", "results.json", "metrics.csv",
                 "seed-1/summary.md", "seed-2/results.json"):
        assert (out / name).stat().st_size > 0, name
    one = json.loads((out / "seed-2" / "results.json").read_text())
    assert one["config"]["seed"] == 2
    assert one["config"]["command"].endswith(f"--seed 2 --out {out / 'seed-2'}")
    # a seed's folder is what the one-seed command writes
    assert main(["reproduce", "depth", *args, "--seed", "2", "--out", str(tmp_path / "two")]) == 0
    _same_but_times(out / "seed-2", tmp_path / "two")
    summary = (out / "summary.md").read_text()
    assert "# depth over 2 seeds" in summary and "(n=2)" in summary and "Welch" in summary
    assert "| depth 3 | BN |" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1, 2] and len(results["results"]) == 4
    bn3 = next(r for r in results["results"] if r["depth"] == 3 and r["bn"])
    assert len(bn3["final_accuracy"]) == 2 and len(bn3["outcomes"]) == 2
    # --seeds 1 (the default) writes what a run without the option writes, in OUT itself
    assert main(["reproduce", "depth", *args, "--seeds", "1", "--seed", "2", "--out",
                 str(tmp_path / "default")]) == 0
    assert not list((tmp_path / "default").glob("seed-*"))
    _same_but_times(tmp_path / "default", tmp_path / "two")
    assert main(["reproduce", "lr-sweep", *COMMON, "--steps", "20", "--eval-every", "10",
                 "--channels", "4", "--multipliers", "1", "--seeds", "2",
                 "--out", str(tmp_path / "lr")]) == 0
    assert "| x1 | BN |" in (tmp_path / "lr" / "summary.md").read_text()
