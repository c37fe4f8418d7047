"""``batchnorm reproduce inception``: variant configurations, the shared training loop
(checkpoint/resume, divergence detection), data order, the report, end to end on tiny data."""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import spawn
from torch import nn

from batchnorm.cli import main
from batchnorm.repro import inception as exp
from batchnorm.repro.inception import (
    VARIANTS,
    IndexBatches,
    TrainSpec,
    analyse,
    build_model,
    load_data,
    steps_to_reach,
    train,
    variant_spec,
)

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


def test_learning_rate_schedule_is_a_staircase():
    spec = TrainSpec(steps=100, lr=0.5, decay_every=10, decay_factor=0.96)
    assert spec.lr_at(0) == spec.lr_at(9) == 0.5
    assert spec.lr_at(10) == pytest.approx(0.48)
    assert spec.lr_at(95) == pytest.approx(0.5 * 0.96 ** 9)
    assert TrainSpec(steps=5, lr=0.1).lr_at(10**6) == 0.1
    with pytest.raises(ValueError, match="steps"):
        TrainSpec(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainSpec(steps=1, lr=0.0)


# ---------------------------------------------------------------------------- data order


def test_index_batches_are_a_function_of_the_step():
    full = IndexBatches(50, 8, seed=3)
    first = [b for b, _ in zip(full, range(20), strict=False)]
    resumed = [b for b, _ in zip(IndexBatches(50, 8, seed=3, start=7), range(13), strict=False)]
    assert resumed == first[7:]
    # each epoch (6 batches of 8 out of 50) visits distinct examples, in a new order each epoch
    epoch0 = sum(first[:6], [])
    assert len(set(epoch0)) == 48
    assert first[:6] != first[6:12]
    assert [b for b, _ in zip(IndexBatches(50, 8, seed=4), range(6), strict=False)] != first[:6]
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(IndexBatches(5, 8, seed=0)))


def test_fashion_mnist_subset_is_standardized():
    from batchnorm.data.download import MissingDataError

    try:
        data = load_data("fashion-mnist", fashion_dir(), train_subset=500, test_subset=200)
    except MissingDataError as error:
        pytest.skip(f"Fashion-MNIST not available: {error}")
    x, y = data.train
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert data.test[0].shape == (200, 1, 28, 28)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10


def fashion_dir():
    """$BATCHNORM_DATA, else where Debian's dataset-fashion-mnist package puts the files."""
    return os.environ.get("BATCHNORM_DATA", "/usr/share/datasets/fashion-mnist")


def fake_cifar_archive(path, rng, per_file=7):
    """A CIFAR-10 binary archive in the published layout with random records."""
    import io
    import tarfile

    from batchnorm.data.cifar import RECORD, SPLITS

    expected = {}
    with tarfile.open(path, "w:gz") as archive:
        for split, names in SPLITS.items():
            labels = torch.randint(10, (per_file * len(names),), generator=rng)
            images = torch.randint(256, (len(labels), 3, 32, 32), generator=rng,
                                   dtype=torch.int64).to(torch.uint8)
            expected[split] = images, labels
            for k, name in enumerate(names):
                part = slice(k * per_file, (k + 1) * per_file)
                records = torch.cat([labels[part, None].to(torch.uint8),
                                     images[part].reshape(per_file, -1)], dim=1)
                payload = records.numpy().tobytes()
                assert len(payload) == per_file * RECORD
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return expected


def test_cifar10_archive_is_parsed_and_verified(tmp_path, rng):
    from batchnorm.data.cifar import load_cifar10, read_archive
    from batchnorm.data.download import MissingDataError

    path = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    path.parent.mkdir()
    expected = fake_cifar_archive(path, rng)
    for split in ("train", "test"):
        images, labels = read_archive(path, split)
        assert images.dtype == torch.uint8 and images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(images, expected[split][0])
        assert torch.equal(labels, expected[split][1])
    # the loader only uses an archive whose md5 is the published one: ours is not
    with pytest.raises(MissingDataError, match="cifar-10-binary.tar.gz"):
        load_cifar10("train", tmp_path, download=False)
    with pytest.raises(ValueError, match="split"):
        load_cifar10("val", tmp_path, download=False)


def make_image_folder(root, rng, counts=(2, 3)):
    """root/cat, root/dog with random PNGs of different sizes (and one non-image file)."""
    image_module = pytest.importorskip("PIL.Image")
    for name, count in zip(("cat", "dog"), counts, strict=True):
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = torch.randint(256, (30 + 7 * k, 40, 3), generator=rng, dtype=torch.int64)
            image_module.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_loads_class_folders(tmp_path, rng):
    from batchnorm.data.imagefolder import ImageFolder

    make_image_folder(tmp_path, rng)
    train = ImageFolder(tmp_path, image_size=16, train=True)
    assert train.classes == ["cat", "dog"] and len(train) == 5
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 1]
    x, label = train[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == 1
    test = ImageFolder(tmp_path, image_size=16, train=False, classes=train.classes)
    assert torch.equal(test[0][0], test[0][0])  # the centre crop is deterministic
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="not in `classes`"):
        ImageFolder(tmp_path, classes=["cat"])


# ---------------------------------------------------------------------------- training loop


def tiny_model(dropout=0.3):
    torch.manual_seed(0)
    from batchnorm.models.inception import InceptionBN

    return InceptionBN(4, 1, bn=True, dropout=dropout, stem="small", width=0.05)


def test_training_learns_the_synthetic_task():
    data = load_data("synthetic")
    torch.manual_seed(0)
    from batchnorm.models.convnet import SmallConvNet

    model = SmallConvNet(4, 1, bn=True, channels=4)
    spec = TrainSpec(steps=60, batch_size=16, lr=0.05, eval_every=30, progress=False)
    result = train(model, data.train, data.test, spec)
    assert [p["step"] for p in result["history"]] == [0, 30, 60]
    assert result["complete"] and result["diverged"] is None
    assert result["history"][-1]["test_accuracy"] > 0.6 > result["history"][0]["test_accuracy"]
    # train() flushes denormals on the CPU for speed; the process-wide setting must not leak
    smallest_normal = torch.finfo(torch.float64).tiny
    assert torch.tensor(smallest_normal, dtype=torch.float64) / 2 != 0


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    """Same seed: stop after step 5 (as if killed), resume, and get bitwise the same weights,
    optimizer state and history as a run that was never interrupted (dropout is on, so the
    restored RNG state matters; the checkpoint at step 5 is not on a checkpoint boundary)."""
    data = load_data("synthetic")

    def run(path, stop_at=0, resume=False):
        torch.manual_seed(0)
        model = tiny_model()
        spec = TrainSpec(steps=9, batch_size=8, lr=0.05, weight_decay=1e-3, decay_every=3,
                         eval_every=4, check_every=2, ckpt_every=4, checkpoint=str(path),
                         resume=resume, stop_at=stop_at, progress=False, eval_batch_size=100)
        return model, train(model, data.train, data.test, spec)

    reference, expected = run(tmp_path / "a.pt")
    _, stopped = run(tmp_path / "b.pt", stop_at=5)
    assert stopped["interrupted"] and stopped["steps_done"] == 5
    resumed, result = run(tmp_path / "b.pt", resume=True)
    assert result["steps_done"] == 9 and result["complete"]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in expected["history"]]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in result["history"]]
    a = torch.load(tmp_path / "a.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(tmp_path / "b.pt", weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def test_bfloat16_autocast_and_channels_last_run():
    """The GPU settings (exercised here on the CPU, where autocast supports bfloat16 too)."""
    data = load_data("synthetic")
    model = tiny_model()
    spec = TrainSpec(steps=2, batch_size=8, lr=0.05, eval_every=2, amp=True,
                     channels_last=True, progress=False)
    result = train(model, data.train, data.test, spec)
    assert result["complete"] and result["diverged"] is None
    assert math.isfinite(result["history"][-1]["train_loss"])
    weight = model.stem.conv2[0].weight
    assert weight.dtype == torch.float32  # autocast keeps float32 master weights
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_resume_refuses_a_different_configuration(tmp_path):
    data = load_data("synthetic")
    spec = TrainSpec(steps=2, batch_size=8, lr=0.05, checkpoint=str(tmp_path / "c.pt"),
                     progress=False)
    train(tiny_model(), data.train, data.test, spec)
    spec.lr, spec.resume = 0.1, True
    with pytest.raises(ValueError, match="different configuration"):
        train(tiny_model(), data.train, data.test, spec)


def test_divergence_is_detected_recorded_and_stops_the_run():
    data = load_data("synthetic")
    torch.manual_seed(0)
    from batchnorm.models.inception import InceptionBN

    model = InceptionBN(4, 1, bn=False, stem="small", width=0.05)
    spec = TrainSpec(steps=200, batch_size=8, lr=1e6, eval_every=100, check_every=1,
                     progress=False)
    result = train(model, data.train, data.test, spec)
    diverged = result["diverged"]
    assert diverged is not None and result["complete"]
    assert result["steps_done"] == diverged["step"] < 200
    assert "non-finite" in diverged["reason"]
    assert diverged["total_parameters"] == sum(p.numel() for p in model.parameters())


def test_check_divergence_sees_an_infinite_parameter():
    model = nn.Linear(3, 2)
    assert exp._check_divergence(model, torch.tensor(1.0), 5) is None
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    record = exp._check_divergence(model, torch.tensor(1.0), 5)
    assert record["reason"] == "non-finite parameters"
    assert record["infinite_parameters"] == record["nonfinite_parameters"] == 1
    assert exp._check_divergence(nn.Linear(3, 2), torch.tensor(float("nan")), 5)["step"] == 5


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


def _double(pair):
    return pair[0].double(), pair[1]


def _train_tiny_float64(rank, world, steps):
    """The bn-x5-like tiny network trained by :func:`train` in float64 (in a process group
    when ``world`` > 1: DDP with synchronized BN); its history and final weights."""
    data = load_data("synthetic")
    model = tiny_model(dropout=0.0).double()
    if world > 1:
        model = exp._synchronized(model)
    spec = TrainSpec(steps=steps, batch_size=8, lr=0.05, weight_decay=1e-3, decay_every=2,
                     eval_every=3, progress=False)
    result = train(model, _double(data.train), _double(data.test), spec)
    return result["history"], model.state_dict()


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_training_equals_one_process_in_float64(tmp_path):
    """Two processes (gloo), each on its shard of every global batch, DDP + synchronized BN:
    the same losses, accuracies and weights as one process on the whole batches, to rounding.
    (In float32 the two drift apart after a few steps: differences of 1e-7 flip ReLU and
    max-pool decisions of this tiny network, which float64 does not.)"""
    steps = 6
    results = spawn(tmp_path, 2, _train_tiny_float64, steps)
    single_history, single_weights = _train_tiny_float64(0, 1, steps)
    for history, weights in results:
        assert [p["step"] for p in history] == [0, 3, 6]
        for a, b in zip(history, single_history, strict=True):
            assert a["test_accuracy"] == b["test_accuracy"]
            if b["train_loss"] is not None:
                assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-10)
        for key, value in single_weights.items():
            if value.is_floating_point():
                assert torch.allclose(weights[key], value, rtol=1e-9, atol=1e-12), key


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


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_data("imagenet")
