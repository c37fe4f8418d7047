"""``batchnorm reproduce mnist``: the network, the analysis helpers, the command end to end on
real data (Fashion-MNIST; MNIST's missing training images), and seed reproducibility.

Data: BATCHNORM_TEST_FASHION_DIR (default /usr/share/datasets/fashion-mnist) and
BATCHNORM_TEST_MNIST_DIR (default <repo>/../shared/data/mnist); skipped when absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import FASHION_DIR, IDX_NAMES, MNIST_DIR, require_files

import batchnorm
from batchnorm.cli import main
from batchnorm.models.mlp import sigmoid_mlp
from batchnorm.repro.common import steps_to_reach
from batchnorm.repro.evaluation import batch_statistics_accuracy
from batchnorm.repro.mnist import Data, Figure1Trainer, eval_schedule, holdout
from batchnorm.repro.mnist_report import drift_statistics
from batchnorm.repro.trainer import TrainSpec


def fashion_dir():
    return require_files(FASHION_DIR, "Fashion-MNIST", "BATCHNORM_TEST_FASHION_DIR (or apt-get "
                         "install dataset-fashion-mnist)", IDX_NAMES)


# ------------------------------------------------------------------------------- the network


def test_sigmoid_mlp_with_and_without_bn():
    nets = {bn: sigmoid_mlp(bn=bn, init_std=0.05, generator=torch.Generator().manual_seed(3))
            for bn in (False, True)}
    plain, with_bn = nets[False], nets[True]
    assert [n for n, _ in plain.named_children()] == [
        "fc1", "sigmoid1", "fc2", "sigmoid2", "fc3", "sigmoid3", "out"]
    assert [n for n, _ in with_bn.named_children()] == [
        "fc1", "bn1", "sigmoid1", "fc2", "bn2", "sigmoid2", "fc3", "bn3", "sigmoid3", "out"]
    for i in (1, 2, 3):
        assert plain.get_submodule(f"fc{i}").bias is not None
        assert with_bn.get_submodule(f"fc{i}").bias is None  # beta replaces it
        assert isinstance(with_bn.get_submodule(f"bn{i}"), batchnorm.BatchNorm1d)
        # same generator state -> the same initial weights in both networks
        assert torch.equal(plain.get_submodule(f"fc{i}").weight,
                           with_bn.get_submodule(f"fc{i}").weight)
    assert abs(float(plain.fc1.weight.detach().std()) - 0.05) < 0.002
    assert float(plain.out.bias.detach().abs().max()) == 0.0
    assert plain(torch.rand(4, 784)).shape == (4, 10)
    with pytest.raises(ValueError, match="hidden"):
        sigmoid_mlp(hidden=(100, 0))
    with pytest.raises(ValueError, match="init_std"):
        sigmoid_mlp(init_std=-1.0)


def test_batch_statistics_accuracy_restores_running_stats(rng):
    net = sigmoid_mlp(20, 3, (8, 8), bn=True, init_std=0.5, generator=rng)
    x, y = torch.randn(50, 20, generator=rng), torch.randint(3, (50,), generator=rng)
    net.train()
    net(torch.randn(64, 20, generator=rng) + 2)  # running stats away from their initial values
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    acc = batch_statistics_accuracy(net, x, y, batch_size=12)
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the same as normalizing each batch of 12 with its own statistics by hand
    manual = 0
    with torch.no_grad():
        for i in range(0, 50, 12):
            copy = sigmoid_mlp(20, 3, (8, 8), bn=True)
            copy.load_state_dict(before)
            manual += int((copy.train()(x[i:i + 12]).argmax(1) == y[i:i + 12]).sum())
    assert acc == manual / 50


# -------------------------------------------------------------------------------- analysis


def test_eval_schedule_and_steps_to():
    assert eval_schedule(12_000, 5000) == [0, 5000, 10_000, 12_000]
    assert eval_schedule(6000, 4000) == [0, 4000, 5000, 6000]  # milestones always evaluated
    history = [dict(step=s, test_accuracy=a) for s, a in [(0, 0.1), (100, 0.84), (200, 0.86),
                                                          (300, 0.85)]]
    assert steps_to_reach(history, 0.85) == 200
    assert steps_to_reach(history, 0.80) == 100
    assert steps_to_reach(history, 0.95) is None


def test_drift_statistics_and_typical_unit():
    rng = np.random.default_rng(0)
    units = 9
    ranges = rng.permutation(np.arange(units, dtype=float))  # unit u's median moves ranges[u]
    median = np.stack([np.zeros(units), ranges, ranges / 2, np.zeros(units)])
    spread = np.array([1.0, 1.0, 2.0, 3.0])[:, None] * np.ones(units)
    series = np.stack([median - spread / 2, median, median + spread / 2], axis=1)
    stats = drift_statistics(series)
    np.testing.assert_allclose(stats["median_range"], ranges)
    np.testing.assert_allclose(stats["spread_change"], np.full(units, 2.0))
    np.testing.assert_allclose(stats["spread_last"], np.full(units, 3.0))
    assert stats["median_range"][stats["typical"]] == 4.0  # the median of 0..8


def test_holdout_is_a_disjoint_split():
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    data = Data("toy", x, torch.arange(100), x[:5], torch.arange(5))
    split = holdout(data, 30, seed=1)
    train, held = set(split.y_train.tolist()), set(split.y_test.tolist())
    assert len(held) == 30 and len(train) == 70 and not train & held
    assert torch.equal(split.x_test.squeeze(1).long(), split.y_test)
    with pytest.raises(ValueError, match="sweep-validation"):
        holdout(data, 100, seed=1)


def test_batches_resume_mid_run():
    """The protocol's batch order (one permutation per epoch from one generator) started at any
    step is the tail of the order started at 0: what a resumed run needs."""
    x = torch.arange(50, dtype=torch.float32).unsqueeze(1)
    data = Data("toy", x, torch.arange(50), x[:5], torch.arange(5))
    spec = TrainSpec(steps=20, batch_size=8, lr=0.1, momentum=0.0, progress=False)

    def labels(start, count):
        trainer = Figure1Trainer(torch.nn.Linear(1, 2), spec, data, "cpu",
                                 torch.Generator().manual_seed(3), None)
        stream = trainer.batches(start)
        return [next(stream)[1].tolist() for _ in range(count)]

    first = labels(0, 20)
    assert labels(6, 14) == first[6:] and labels(13, 7) == first[13:]
    epoch = sum(first[:6], [])  # 6 batches of 8 out of 50 per epoch, each example once
    assert len(set(epoch)) == 48 and first[:6] != first[6:12]


# ------------------------------------------------------------------------------ the command


def run_command(tmp_path, *extra, name="run", data_dir=None) -> tuple[int, Path]:
    out = tmp_path / name
    code = main(["reproduce", "mnist", "--dataset", "fashion-mnist", "--data-dir",
                 str(data_dir or fashion_dir()), "--no-download", "--no-progress",
                 "--out", str(out), *extra])
    return code, out


def test_end_to_end_on_fashion_mnist(tmp_path):
    code, out = run_command(tmp_path, "--steps", "300", "--eval-every", "100", "--sweep",
                            "--sweep-lrs", "0.3,1", "--sweep-stds", "0.1", "--sweep-steps",
                            "30", "--sweep-validation", "2000")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["figure1.png", "metrics.csv",
                                                     "metrics.json", "summary.md"]
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["dataset"] == "fashion-mnist" and config["steps"] == 300
    assert config["network"] == "784-100-100-100-10, sigmoid"
    assert (config["train_examples"], config["test_examples"]) == (60_000, 10_000)
    assert config["command"].startswith("batchnorm reproduce mnist --dataset fashion-mnist")
    assert "--steps 300 --batch-size 60 --sweep --sweep-lrs 0.3,1 --sweep-stds 0.1" in (
        config["command"])
    sweep = metrics["sweep"]
    assert [(r["lr"], r["init_std"]) for r in sweep["rows"]] == [(0.3, 0.1), (1.0, 0.1)]
    best = max(sweep["rows"], key=lambda r: r["no_bn_validation_accuracy"])
    assert sweep["chosen"] == dict(lr=best["lr"], init_std=best["init_std"])
    assert (config["lr"], config["init_std"]) == (best["lr"], best["init_std"])
    for key in ("no_bn", "bn"):
        net = metrics["networks"][key]
        history = net["history"]
        assert [p["step"] for p in history] == [0, 100, 200, 300]
        assert history[0]["train_loss"] is None
        for point in history:
            assert 0.0 <= point["test_accuracy"] <= 1.0
            assert point["p15"] <= point["p50"] <= point["p85"]
        assert all(p["train_loss"] > 0 for p in history[1:])
        assert 0 <= net["unit"]["index"] < 100 and net["all_units"]["units"] == 100
        assert net["final_accuracy"] == history[-1]["test_accuracy"]
        assert set(net["steps_to"]) == {"0.80", "0.85", "0.95", "0.97"}
    final = metrics["networks"]["bn"]["final"]
    assert final["moving_average"] == metrics["networks"]["bn"]["final_accuracy"]
    assert 0 <= final["recalibrated"] <= 1 and 0 <= final["batch_statistics"] <= 1
    assert final["recalibration_batches"] == 1000
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and rows[0].keys() == {"network", "step", "test_accuracy",
                                                 "train_loss", "p15", "p50", "p85"}
    assert [float(r["test_accuracy"]) for r in rows[4:]] == [
        p["test_accuracy"] for p in metrics["networks"]["bn"]["history"]]
    summary = (out / "summary.md").read_text()
    assert "Fashion-MNIST, not MNIST" in summary
    assert "| accuracy at the end (step 300) |" in summary
    assert "| steps to reach 85% |" in summary
    assert "exact population statistics (`batchnorm.recalibrate`" in summary
    assert "## Choice of learning rate and initial scale (sweep)" in summary
    assert f"{final['recalibrated']:.4f}" in summary


def test_same_seed_same_numbers(tmp_path):
    args = ("--steps", "60", "--eval-every", "30", "--lr", "0.5", "--init-std", "0.1")
    runs = [run_command(tmp_path, *args, "--seed", seed, name=f"run{i}")
            for i, seed in enumerate(("4", "4", "5"))]
    assert all(code == 0 for code, _ in runs)
    metrics = [json.loads((out / "metrics.json").read_text()) for _, out in runs]
    assert metrics[0]["networks"] == metrics[1]["networks"]
    assert metrics[0]["networks"] != metrics[2]["networks"]


def test_missing_mnist_training_images_fail_clearly(tmp_path, capsys):
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not found in {MNIST_DIR}; set BATCHNORM_TEST_MNIST_DIR")
    if (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST's training images are present: nothing is missing")
    code = main(["reproduce", "mnist", "--data-dir", str(MNIST_DIR), "--no-download",
                 "--no-progress", "--steps", "10", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "MNIST: 1 required file(s) missing" in err
    assert "train-images-idx3-ubyte.gz (60,000 train images)" in err
    assert str(MNIST_DIR) in err and "BATCHNORM_DATA" in err
    assert "--dataset fashion-mnist" in err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("extra, message", [
    (("--sweep", "--lr", "0.1"), "give either --sweep or them"),
    (("--batch-size", "1"), "--batch-size must be >= 2"),
    (("--lr", "-1"), "--lr must be positive"),
])
def test_bad_arguments(tmp_path, capsys, extra, message):
    code = main(["reproduce", "mnist", "--out", str(tmp_path), "--no-download", *extra])
    assert code == 2
    assert message in capsys.readouterr().err



def test_over_seeds(tmp_path):
    args = ("--steps", "60", "--eval-every", "30", "--lr", "0.5", "--init-std", "0.1")
    code, out = run_command(tmp_path, *args, "--seeds", "2", "--seed", "4", name="seeds")
    assert code == 0
    for name in ("figure1.png", "summary.md", "results.json", "metrics.csv",
                 "seed-4/metrics.json", "seed-5/summary.md"):
        assert (out / name).stat().st_size > 0, name
    # seed 4's folder holds what the one-seed command writes
    code, single = run_command(tmp_path, *args, "--seed", "4", name="single")
    assert code == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out / "seed-4", single))
    assert a["networks"] == b["networks"]
    assert a["config"]["command"].endswith(f"--seed 4 --eval-every 30 --out {out / 'seed-4'}")
    summary = (out / "summary.md").read_text()
    assert "over 2 seeds" in summary and "| accuracy at the end |" in summary
    assert "(n=2)" in summary and "beyond seed noise?" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [4, 5]
    end = next(r for r in results["rows"] if r["reading"] == "accuracy at the end")
    assert end["bn"][0] == a["networks"]["bn"]["final_accuracy"] and len(end["no_bn"]) == 2
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("seed,network,step") and len(rows) == 1 + 2 * 2 * 3
