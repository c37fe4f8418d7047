"""``batchnorm reproduce inception``: variant configurations, the report, end to end on tiny
data (single process, image folders, ``torchrun``), and the names that moved elsewhere."""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_data import make_image_folder
from torch import nn

from batchnorm.cli import main
from batchnorm.repro import inception as exp
from batchnorm.repro.common import steps_to_reach
from batchnorm.repro.image_data import load_data
from batchnorm.repro.inception import VARIANTS, build_model, variant_spec
from batchnorm.repro.inception_report import _summary, analyse, plateau

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--dataset", "synthetic", "--width", "0.05", "--batch-size", "8", "--no-progress"]


def parse(*argv):
    parser = argparse.ArgumentParser()
    exp.add_arguments(parser)
    return parser.parse_args(list(argv))


# ---------------------------------------------------------------------------- the variants


def test_variant_table_follows_the_paper():
    """Figure 3's networks: learning rates in the paper's ratios, and the section 4.2.1 changes
    (dropout removed, weight decay / 5, decay 6x faster, no LRN) exactly for the accelerated
    BN networks."""
    assert set(VARIANTS) == {"inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid",
                             "inception-x5", "inception-sigmoid"}
    for v in VARIANTS.values():
        assert math.isclose(v.paper_lr / exp.PAPER_BASE_LR, v.lr_multiplier)
        assert v.activation == ("sigmoid" if "sigmoid" in v.name else "relu")
        assert v.bn == v.name.startswith("bn")
        assert v.accelerated == (v.name in ("bn-x5", "bn-x30", "bn-x5-sigmoid"))
        assert v.dropout == (0.0 if v.accelerated else 0.4)
        assert v.lrn == (not v.accelerated)
        assert v.weight_decay(2e-4) == pytest.approx(4e-5 if v.accelerated else 2e-4)
        assert v.decay_every(600) == (100 if v.accelerated else 600)
    assert [VARIANTS[n].lr_multiplier for n in ("bn-x5", "bn-x30", "inception-x5")] == [5, 30, 5]
    assert VARIANTS["bn-x30"].paper_max_accuracy == 0.748
    assert VARIANTS["inception"].paper_steps == 31.0e6


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_builds_its_network_and_schedule(name):
    v = VARIANTS[name]
    data = load_data("synthetic")
    model = build_model(v, data, width=0.05)
    assert model.config["bn"] == v.bn and model.config["activation"] == v.activation
    assert model.dropout.p == v.dropout
    assert any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) == v.lrn
    assert model.config["stem"] == "small"
    args = parse("--base-lr", "0.02", "--steps", "120", "--base-weight-decay", "1e-4")
    spec = variant_spec(v, args, torch.device("cpu"))
    assert spec.lr == pytest.approx(0.02 * v.lr_multiplier)
    assert spec.weight_decay == pytest.approx(1e-4 / (5 if v.accelerated else 1))
    assert spec.decay_every == (2 if v.accelerated else 10)  # steps // 12, then round(/ 6)
    assert spec.momentum == 0.9 and spec.batch_size == 32
    assert not spec.amp and not spec.channels_last  # CPU: float32, contiguous


# ---------------------------------------------------------------------------- the report


def fake_record(accuracies, every=10, lr=0.1, diverged=None):
    history = [dict(step=i * every, test_accuracy=a) for i, a in enumerate(accuracies)]
    return dict(history=history, diverged=diverged, steps_done=history[-1]["step"],
                spec=dict(lr=lr))


def test_analyse_steps_to_inception_max_and_chance():
    records = {
        "inception": fake_record([0.1, 0.5, 0.7, 0.8, 0.78]),
        "bn-x5": fake_record([0.1, 0.85, 0.9, 0.9, 0.9]),
        "inception-x5": fake_record([0.1, 0.3], diverged=dict(step=15)),
        "inception-sigmoid": fake_record([0.1, 0.11, 0.1, 0.115, 0.1]),
    }
    result = analyse(records, num_classes=10, test_size=1000)
    rows = result["variants"]
    assert result["inception_max_accuracy"] == 0.8
    assert rows["inception"]["steps_to_inception_max"] == 30
    assert rows["bn-x5"]["steps_to_inception_max"] == 10
    assert rows["bn-x5"]["speedup_vs_inception"] == 3.0
    assert rows["inception-x5"]["steps_to_inception_max"] is None
    assert rows["inception-sigmoid"]["at_chance"] and not rows["bn-x5"]["at_chance"]
    assert steps_to_reach(records["bn-x5"]["history"], 0.95) is None
    assert result["inception_plateau"] is None  # 5 evaluations: too few to judge
    at_95 = result["levels"][1]  # 0.95 x 0.8 = 0.76: inception at step 30, bn-x5 at 10
    assert at_95["fraction"] == 0.95 and math.isclose(at_95["accuracy"], 0.76)
    assert at_95["steps"]["inception"] == 30 and at_95["steps"]["bn-x5"] == 10
    assert at_95["speedup"]["bn-x5"] == 3.0 and at_95["steps"]["inception-x5"] is None
    at_90 = result["levels"][0]  # 0.72: inception at step 30 (0.7 < 0.72), bn-x5 at 10
    assert at_90["steps"]["inception"] == 30


@pytest.mark.parametrize("last, levelled", [(0.81, True), (0.83, False)])
def test_plateau_compares_the_last_quarter_with_two_standard_errors(last, levelled):
    # steps 0..90; the last quarter is after step 67.5: steps 70, 80, 90
    accuracies = [0.1, 0.4, 0.6, 0.7, 0.75, 0.78, 0.8, 0.79, last, 0.8]
    level = plateau(fake_record(accuracies)["history"], test_size=1000)
    se = math.sqrt(0.8 * 0.2 / 1000)  # at the best before the last quarter, 0.8 (step 60)
    assert level["from_step"] == 67 and level["best_before"] == 0.8
    assert level["best_last_quarter"] == last
    assert math.isclose(level["gain"], last - 0.8) and math.isclose(level["standard_error"], se)
    assert level["levelled"] is levelled  # 2 se = 0.0253: +0.01 is within, +0.03 is not


def test_summary_states_the_plateau_and_variants_stopped_early():
    rising = [0.1, 0.3, 0.45, 0.55, 0.62, 0.68, 0.72, 0.75, 0.8, 0.85]
    records = {"inception": fake_record(rising),
               "bn-x5": fake_record([0.1, 0.6, 0.7]),  # stopped at step 20, below 0.85
               "bn-x30": fake_record([0.1, 0.7, 0.86])}
    records["bn-x5"]["complete"] = False
    for name, record in records.items():
        record.update(variant=asdict(VARIANTS[name]), seconds=1.0)
    analysis = analyse(records, num_classes=10, test_size=1000)
    args = argparse.Namespace(note=None, steps=90, batch_size=32, width=0.125, base_lr=0.01,
                              momentum=0.9, base_weight_decay=2e-4, seed=0)
    data = argparse.Namespace(name="fake", sizes=lambda: (100, 1000))
    text = _summary(records, analysis, args, data, torch.device("meta"), decay_every=7)
    assert "was still rising by this rule: its maximum is not yet a plateau" in text
    assert "a gain of +0.1300" in text  # 0.85 after step 67 vs 0.72 (step 60) up to it
    stopped = ("| bn-x5 | 0.1 | not in its first 20 (stopped there) | - "
               "| 70.00% (20, stopped at 20) |")
    assert stopped in text
    assert "| bn-x30 | 0.1 | 20 | 4.5x |" in text  # inception reached 0.85 at step 90
    # levels 90%, 95%, ... of 0.85: 0.765 reached by inception at step 80, 0.8075 at 90; bn-x30
    # reaches both at step 20
    assert "| bn-x30 | 20 (4.0x) | 20 (4.5x) |" in text
    assert "| bn-x5 | never | never |" in text


# ---------------------------------------------------------------------------- end to end


def test_all_variants_end_to_end(tmp_path):
    out = tmp_path / "all"
    assert main(["reproduce", "inception", "--all", *TINY, "--steps", "4", "--eval-every", "2",
                 "--ckpt-every", "2", "--out", str(out)]) == 0
    for name in ("figure2.png", "summary.md", "results.json", "metrics.csv"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == set(VARIANTS)
    summary = (out / "summary.md").read_text()
    for name, v in VARIANTS.items():
        assert f"| {name} |" in summary and str(v.paper_lr) in summary
    for name in VARIANTS:
        record = json.loads((out / name / "history.json").read_text())
        assert record["complete"] and [p["step"] for p in record["history"]] == [0, 2, 4]
    # --resume skips finished variants and rewrites the same report
    assert main(["reproduce", "inception", "--all", *TINY, "--steps", "4", "--eval-every", "2",
                 "--ckpt-every", "2", "--out", str(out), "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["analysis"] == results["analysis"]


def test_over_seeds_and_resume(tmp_path):
    out = tmp_path / "seeds"
    argv = ["reproduce", "inception", "--variant", "bn-x5", *TINY, "--steps", "4",
            "--eval-every", "2", "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    for name in ("figure2.png", "summary.md", "results.json", "metrics.csv",
                 "seed-0/bn-x5/history.json", "seed-1/summary.md",
                 "seed-1/checkpoints/bn-x5.pt"):
        assert (out / name).exists(), name
    summary = (out / "summary.md").read_text()
    assert "over 2 seeds" in summary and "| bn-x5 |" in summary and "(n=2)" in summary
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and len(results["variants"]["bn-x5"]) == 2
    first = (out / "seed-0" / "bn-x5" / "history.json").read_text()
    assert main([*argv, "--resume"]) == 0  # finished seeds are kept
    assert (out / "seed-0" / "bn-x5" / "history.json").read_text() == first
    # --stop-at stops the first seed, not marked finished; --resume then completes both
    stopped = tmp_path / "stopped"
    assert main([*argv[:-1], str(stopped), "--ckpt-every", "2", "--stop-at", "2"]) == 0
    assert not (stopped / "seed-0" / "seed-done.json").exists()
    assert not (stopped / "seed-1").exists()


def test_single_variant_reports_divergence(tmp_path):
    out = tmp_path / "x5"
    assert main(["reproduce", "inception", "--variant", "inception-x5", *TINY, "--steps", "30",
                 "--eval-every", "30", "--base-lr", "1e5", "--out", str(out)]) == 0
    record = json.loads((out / "inception-x5" / "history.json").read_text())
    assert record["diverged"] and record["steps_done"] < 30
    assert "**inception-x5 diverged**" in (out / "summary.md").read_text()


def test_imagefolder_dataset_end_to_end(tmp_path, rng):
    """The streaming path: a Dataset read through a DataLoader with our batch sampler."""
    make_image_folder(tmp_path / "data" / "train", rng, counts=(4, 4))
    make_image_folder(tmp_path / "data" / "val", rng, counts=(2, 2))
    out = tmp_path / "out"
    assert main(["reproduce", "inception", "--variant", "bn-x5", *TINY[2:], "--dataset",
                 f"imagefolder:{tmp_path / 'data'}", "--image-size", "16", "--workers", "0",
                 "--batch-size", "4", "--steps", "4", "--eval-every", "2",
                 "--out", str(out)]) == 0
    record = json.loads((out / "bn-x5" / "history.json").read_text())
    assert [p["step"] for p in record["history"]] == [0, 2, 4]
    assert all(0 <= p["test_accuracy"] <= 1 for p in record["history"])


# float32 trajectories compared to 1e-4: both runs must round alike. One process would use
# the fused CPU kernels (sums in double) and DDP SyncBatchNorm's ATen path (float32 sums); on
# strongly cancelling sums such as sum(dy * xhat) behind a ReLU they differ by up to 1% after
# two steps. So both take the ATen path here; exactness is the float64 test's job.
SAME_ROUNDING = {"BATCHNORM_CPU_KERNELS": "0"}


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_command(tmp_path):
    """``torchrun --nproc_per_node=2`` runs the command data-parallel; rank 0 writes the files
    and its short run agrees with a single process (float32: a few steps only, see above)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to the interpreter")
    arguments = ["-m", "batchnorm", "reproduce", "inception", "--variant", "bn-x5", *TINY,
                 "--steps", "2", "--eval-every", "1", "--threads", "1"]
    records, weights = {}, {}
    for name, launcher in (("ddp", [torchrun, "--standalone", "--nproc_per_node=2"]),
                           ("single", [sys.executable])):
        out = tmp_path / name
        done = subprocess.run([*launcher, *arguments, "--out", str(out)], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path,
                              env=dict(os.environ, OMP_NUM_THREADS="1", **SAME_ROUNDING))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records[name] = json.loads((out / "bn-x5" / "history.json").read_text())
        weights[name] = torch.load(out / "checkpoints" / "bn-x5.pt", weights_only=False)["model"]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 2
    assert records["ddp"]["spec"] == records["single"]["spec"]
    ddp, single = records["ddp"]["history"], records["single"]["history"]
    assert [p["step"] for p in ddp] == [p["step"] for p in single] == [0, 1, 2]
    for a, b in zip(ddp, single, strict=True):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / 256 + 1e-9
        if b["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for key, value in weights["single"].items():
        if value.is_floating_point():
            assert torch.allclose(weights["ddp"][key], value, rtol=1e-4, atol=1e-6), key


def test_moved_names_still_import_with_a_warning():
    """Names that moved out of the experiment modules stay importable from there, with a
    DeprecationWarning naming the new home."""
    from batchnorm.repro import image_data, lr_sweep, mnist, mnist_report, report, trainer
    from batchnorm.repro.evaluation import batch_statistics_accuracy

    moved = [(exp, "load_data", image_data.load_data),
             (exp, "IndexBatches", image_data.IndexBatches),
             (exp, "evaluate", trainer.evaluate), (exp, "at_chance", report.at_chance),
             (lr_sweep, "train", trainer.train), (lr_sweep, "steps_text", report.format_steps),
             (mnist, "drift_statistics", mnist_report.drift_statistics),
             (mnist, "batch_statistics_accuracy", batch_statistics_accuracy)]
    for module, name, new in moved:
        with pytest.warns(DeprecationWarning, match=f"{module.__name__}.{name} is deprecated"):
            assert getattr(module, name) is new
    assert exp.TrainSpec is trainer.TrainSpec and exp.train is trainer.train  # still used there
    with pytest.raises(AttributeError, match="no_such_name"):
        exp.no_such_name  # noqa: B018



@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "--dataset must be one of"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the training set (512"),
    (["--width", "0"], "--width must be positive, got 0.0"),
    (["--dataset", "imagefolder:/nonexistent"], "is not a folder"),
])
def test_bad_arguments_are_one_line_not_a_traceback(tmp_path, capsys, extra, message):
    argv = ["reproduce", "inception", *TINY, "--steps", "2", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resume_with_other_settings_says_what_to_do(tmp_path, capsys):
    argv = ["reproduce", "inception", "--variant", "bn-x5", *TINY, "--steps", "4",
            "--eval-every", "2", "--stop-at", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv[:-4], "--base-lr", "0.5", "--resume", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--resume: checkpoint" in err and "different configuration" in err
    assert "use another --out (or --ckpt-dir)" in err
