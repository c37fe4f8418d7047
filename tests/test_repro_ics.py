"""``batchnorm reproduce ics`` end to end on tiny synthetic data: files, finite numbers, the
claims table, determinism, and that the probes do not change the training."""

import json
import math

import pytest

from batchnorm.cli import main
from batchnorm.repro.ics_report import CLAIMS, READINGS, judge

TINY = ["--dataset", "synthetic", "--vgg-steps", "6", "--mlp-steps", "6", "--width", "4",
        "--evals", "2", "--probes", "2", "--monitor-examples", "32", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def without_times(value):
    """``value`` without its wall-clock fields (they differ between identical runs)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def finite(value) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_ics_end_to_end(tmp_path):
    out = tmp_path / "ics"
    assert main(["reproduce", "ics", *TINY, "--seeds", "2", "--seed", "3",
                 "--out", str(out)]) == 0
    for name in ("summary.md", "results.json", "metrics.csv", "ics.csv", "smoothness.csv",
                 "training.png", "drift.png", "ics.png", "smoothness.png",
                 "seed-3/metrics.json", "seed-4/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    seed = json.loads((out / "seed-3" / "metrics.json").read_text())
    assert seed["command"].endswith(f"--seed 3 --out {out / 'seed-3'}")
    for arch in ("vgg", "mlp"):
        for network in ("no_bn", "bn", "noisy_bn"):
            run = seed["runs"][arch][network]
            assert [p["step"] for p in run["history"]] == [0, 3, 6]
            assert [p["step"] for p in run["probes"]] == [0, 3]
            layers = [r["layer"] for r in run["probes"][0]["ics"]]
            assert layers == ([f"features.block{b}.conv{k}" for b in (1, 2, 3) for k in (1, 2)]
                              + ["classifier.fc", "classifier.out"] if arch == "vgg"
                              else ["fc1", "fc2", "fc3", "out"])
            assert run["probes"][0]["ics"][0]["l2"] == 0.0  # nothing precedes the first layer
            assert len(run["drift"]) == (7 if arch == "vgg" else 3)
            assert finite(run) and run["diverged"] is None
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == [3, 4]
    for arch in ("vgg", "mlp"):
        for network in ("no_bn", "bn", "noisy_bn"):
            entry = results["readings"][arch][network]
            assert set(entry) == set(READINGS)
            assert entry["drift"]["spread"]["n"] == 2 and len(entry["drift"]["values"]) == 2
    assert len(results["claims"]) == 2 * len(CLAIMS)
    summary = (out / "summary.md").read_text()
    assert "## The mechanism claims against our numbers" in summary
    assert "(n=2)" in summary and "Welch" in summary


def test_same_seed_same_numbers_and_probes_leave_training_alone(tmp_path):
    def run(name, *extra):
        assert main(["reproduce", "ics", *TINY, "--archs", "vgg", "--seed", "5",
                     "--out", str(tmp_path / name), *extra]) == 0
        return without_times(json.loads((tmp_path / name / "seed-5" / "metrics.json")
                                        .read_text())["runs"])

    first, again = run("a"), run("b")
    assert first == again
    fewer = run("c", "--probes", "1")
    for arch in first:
        for network in first[arch]:
            assert fewer[arch][network]["history"] == first[arch][network]["history"]
            assert len(fewer[arch][network]["probes"]) == 1


@pytest.mark.parametrize("relation, a, b, verdict", [
    ("lower", [1.0, 1.1, 0.9], [0.5, 0.6, 0.4], "supported"),
    ("lower", [0.5, 0.6, 0.4], [1.0, 1.1, 0.9], "contradicted"),
    ("lower", [1.0, 0.5, 0.7], [0.8, 0.6, 0.9], "unresolved (within seed noise)"),
    ("not lower", [1.0, 1.1, 0.9], [0.5, 0.6, 0.4], "not supported"),
    ("not lower", [1.0, 0.5, 0.7], [0.8, 0.6, 0.9], "consistent (no difference beyond seed "
                                                    "noise)"),
    ("similar", [1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "not supported (b higher)"),
    ("lower", [1.0], [0.5], "no verdict (1 seed)"),
    ("lower", [None, 1.0], [0.5, 0.5], "not measurable (a run did not reach it)"),
])
def test_claim_verdicts(relation, a, b, verdict):
    assert judge(relation, a, b)[1] == verdict


def test_bad_arguments(tmp_path, capsys):
    assert main(["reproduce", "ics", "--archs", "resnet", "--out", str(tmp_path)]) == 2
    assert "--archs must name some of" in capsys.readouterr().err
    assert main(["reproduce", "ics", "--noise-std", "2,1", "--out", str(tmp_path)]) == 2
    assert "--noise-std" in capsys.readouterr().err
