"""batchnorm.monitor: percentiles against NumPy, hooks only while recording, tables."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.monitor import ActivationMonitor, compute_percentiles


@pytest.mark.parametrize("n", [1, 2, 7, 60, 1001])
def test_percentiles_match_numpy(rng, n):
    values = torch.randn(n, 5, generator=rng, dtype=torch.float64) * 3 + 1
    qs = [0, 15, 50, 85, 100, 2.5, 99.9]
    ours = compute_percentiles(values, qs).numpy()
    expected = np.percentile(values.numpy(), qs, axis=0)  # NumPy's default: linear
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_percentiles_of_known_data():
    values = torch.arange(101, dtype=torch.float32).unsqueeze(1)  # 0, 1, ..., 100
    assert compute_percentiles(values, [15, 50, 85]).flatten().tolist() == [15, 50, 85]
    ties = torch.tensor([[1.0], [1.0], [1.0], [5.0]])
    assert compute_percentiles(ties, [50, 100]).flatten().tolist() == [1.0, 5.0]


@pytest.mark.parametrize("qs, shape", [([15, 101], (3, 2)), ([], (3, 2)), ([50], (0, 2)),
                                       ([50], (4,))])
def test_percentiles_reject_bad_arguments(qs, shape):
    with pytest.raises(ValueError, match="compute_percentiles"):
        compute_percentiles(torch.ones(shape), qs)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3))


def test_monitor_records_inputs_of_chosen_units(rng):
    model = small_model()
    monitor = ActivationMonitor(model, ["1"], units=[0, 5, 7])
    batches = [torch.randn(n, 6, generator=rng) for n in (30, 17)]
    scales = {0: 1.0, 10: 2.0}
    for step, scale in scales.items():
        with torch.no_grad(), monitor.record(step):
            for x in batches:  # several forward calls in one recording are pooled
                model(x * scale)
    assert monitor.steps == [0, 10]
    series = monitor.series("1")
    assert series.shape == (2, 3, 3)  # steps, percentiles, units
    with torch.no_grad():
        for i, scale in enumerate(scales.values()):
            inputs = torch.cat([model[0](x * scale) for x in batches]).double().numpy()
            expected = np.percentile(inputs[:, [0, 5, 7]], [15, 50, 85], axis=0)
            np.testing.assert_allclose(series[i], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(monitor.series("1", unit=5), series[:, :, 1])


def test_monitor_outputs_and_conv_channels(rng):
    conv = nn.Conv2d(2, 4, 3)
    model = nn.Sequential(conv, nn.ReLU())
    monitor = ActivationMonitor(model, ["0"], watch="output", percentiles=[10, 90])
    x = torch.randn(5, 2, 7, 7, generator=rng)
    with torch.no_grad(), monitor.record(3):
        out = model(x)
    with torch.no_grad():
        maps = conv(x)
    # a channel's samples are all its positions in all images
    per_channel = maps.permute(1, 0, 2, 3).reshape(4, -1).T.double().numpy()
    np.testing.assert_allclose(monitor.series("0")[0], np.percentile(per_channel, [10, 90], axis=0),
                               rtol=1e-6, atol=1e-6)
    assert out.shape == (5, 4, 5, 5)


def test_hooks_exist_only_while_recording(rng):
    model = small_model()
    monitor = ActivationMonitor(model, ["1", "2"])
    assert not model[1]._forward_pre_hooks and not model[2]._forward_pre_hooks
    with monitor.record(0):
        assert len(model[1]._forward_pre_hooks) == 1 and len(model[2]._forward_pre_hooks) == 1
        model(torch.randn(4, 6, generator=rng))
    assert not model[1]._forward_pre_hooks and not model[2]._forward_pre_hooks
    model(torch.randn(4, 6, generator=rng))  # not recorded
    assert monitor.steps == [0]


def test_rows_and_csv(tmp_path, rng):
    model = small_model()
    monitor = ActivationMonitor(model, ["2"], units=[1, 4])
    for step in (0, 5, 9):
        with monitor.record(step):
            model(torch.randn(20, 6, generator=rng))
    rows = monitor.rows()
    assert len(rows) == 3 * 2
    assert rows[0].keys() == {"step", "module", "unit", "p15", "p50", "p85"}
    assert [(r["step"], r["unit"]) for r in rows] == [(s, u) for s in (0, 5, 9) for u in (1, 4)]
    assert all(r["p15"] <= r["p50"] <= r["p85"] for r in rows)
    path = tmp_path / "monitor.csv"
    monitor.to_csv(path)
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows)
    assert float(read[3]["p50"]) == pytest.approx(rows[3]["p50"])


def test_monitor_errors():
    model = small_model()
    with pytest.raises(ValueError, match="no module 'sigmoid'"):
        ActivationMonitor(model, ["sigmoid"])
    with pytest.raises(ValueError, match="watch must be"):
        ActivationMonitor(model, ["1"], watch="gradient")
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        ActivationMonitor(model, ["1"], percentiles=[50, 150])
    monitor = ActivationMonitor(model, ["1"])
    with pytest.raises(RuntimeError, match="not called inside record"), monitor.record(0):
        pass
    assert monitor.steps == []
    wide = ActivationMonitor(model, ["1"], units=[8])
    with pytest.raises(ValueError, match="out of range"), wide.record(0):
        model(torch.ones(2, 6))
