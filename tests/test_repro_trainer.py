"""The shared training loop (:mod:`batchnorm.repro.trainer`): schedule, learning, checkpoints
and resume, divergence, the GPU settings, data-parallel training, and an experiment's own
loss/batches/evaluation."""

import math

import pytest
import torch
from multiproc import spawn
from torch import nn

from batchnorm.repro.image_data import load_data
from batchnorm.repro.trainer import (
    Trainer,
    TrainSpec,
    check_divergence,
    synchronized,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert check_divergence(model, torch.tensor(1.0), 5) is None
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    record = check_divergence(model, torch.tensor(1.0), 5)
    assert record["reason"] == "non-finite parameters"
    assert record["infinite_parameters"] == record["nonfinite_parameters"] == 1
    assert check_divergence(nn.Linear(3, 2), torch.tensor(float("nan")), 5)["step"] == 5


def test_an_experiment_overrides_loss_batches_and_evaluation():
    """A subclass changes what a step optimizes, which examples it sees and what an evaluation
    measures; the loop, history and checks stay the trainer's."""
    calls = []

    class Probe(Trainer):
        def loss(self, x, y):
            return super().loss(x, y) * 0.0 + (self.net(x) ** 2).mean()

        def batches(self, start):
            calls.append(start)
            while True:
                yield torch.ones(4, 3), torch.zeros(4, dtype=torch.long)

        def evaluate(self):
            return float(self.state.step)

    torch.manual_seed(0)
    spec = TrainSpec(steps=6, batch_size=4, lr=0.1, momentum=0.0, eval_every=100,
                     eval_steps=(2, 5), progress=False, log_evaluations=False,
                     flush_denormals=False)
    result = Probe(nn.Linear(3, 2), spec).run()
    assert calls == [0]
    assert [(p["step"], p["test_accuracy"]) for p in result["history"]] == [
        (0, 0.0), (2, 2.0), (5, 5.0), (6, 6.0)]
    assert result["complete"] and result["history"][-1]["train_loss"] < result["history"][1][
        "train_loss"]


def _double(pair):
    return pair[0].double(), pair[1]


def _train_tiny_float64(rank, world, steps):
    """The bn-x5-like tiny network trained by :func:`train` in float64 (in a process group
    when ``world`` > 1: DDP with synchronized BN); its history and final weights."""
    data = load_data("synthetic")
    model = tiny_model(dropout=0.0).double()
    if world > 1:
        model = synchronized(model)
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
