"""recalibrate (Algorithm 2's population statistics) and fold (BN folded into the layer before)."""

import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err
from torch import nn

import batchnorm
from batchnorm import reference as ref


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(3, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 5 * 5, 4)
        self.bn2 = nn.BatchNorm1d(4)  # torch's own layer: recalibrate takes any BN
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.drop(torch.relu(self.bn1(self.conv(x))))
        return self.bn2(self.fc(h.flatten(1)))


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1,
             torch.zeros(n)) for n in sizes]


def _expected(model, batches):
    """Reference: each batch's BN inputs, reduced by reference.population_statistics."""
    inputs = {"bn1": [], "bn2": []}
    with torch.no_grad():
        for x, _ in batches:
            a = model.conv(x)
            inputs["bn1"].append(a.numpy())
            h = torch.relu(nn.functional.batch_norm(a, None, None, model.bn1.weight,
                                                    model.bn1.bias, True, eps=model.bn1.eps))
            inputs["bn2"].append(model.fc(h.flatten(1)).numpy())
    out = {}
    for name, arrays in inputs.items():
        stats = [ref.batch_statistics(a) for a in arrays]
        out[name] = ref.population_statistics(*zip(*stats, strict=True))
    return out


@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [8, 8, 8, 3]], ids=["even", "uneven-last"])
def test_recalibrate_equals_reference_population_statistics(sizes):
    torch.manual_seed(0)
    model = TwoBN().double()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 2)
        model.bn1.bias.normal_()
    batches = _batches(sizes)
    expected = _expected(model, batches)
    model.train()
    model.bn2.eval()
    momentum = model.bn1.momentum
    tracked = int(model.bn1.num_batches_tracked)
    model.calls = 0
    batchnorm.recalibrate(model, batches, progress=False)
    assert model.calls == len(sizes)  # one pass for all layers
    for name in ("bn1", "bn2"):
        layer = getattr(model, name)
        mean, var = expected[name]
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-10)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-10)
    assert model.training and model.bn1.training and not model.bn2.training
    assert model.bn1.momentum == momentum and int(model.bn1.num_batches_tracked) == tracked
    assert all(p.grad is None for p in model.parameters())


def test_recalibrate_num_batches_and_bare_tensors():
    torch.manual_seed(1)
    model = TwoBN().double()
    batches = [x for x, _ in _batches([6, 6, 6, 6, 6])]
    model.calls = 0
    batchnorm.recalibrate(model, iter(batches), num_batches=2, progress=False)
    assert model.calls == 2
    expected = _expected(model, [(x, None) for x in batches[:2]])
    np.testing.assert_allclose(model.bn2.running_var.numpy(), expected["bn2"][1], rtol=1e-10)


def test_recalibrate_errors_and_restores_on_failure():
    model = TwoBN()
    with pytest.raises(ValueError, match="batches is empty"):
        batchnorm.recalibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        batchnorm.recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        batchnorm.recalibrate(model, [torch.randn(2, 2, 5, 5)], num_batches=0)
    before = model.bn1.running_mean.clone()
    model.eval()
    with pytest.raises(ValueError):  # a batch of one: BN cannot take training statistics
        batchnorm.recalibrate(model, [torch.randn(3, 2, 5, 5), torch.randn(1, 2, 5, 5)],
                              progress=False)
    assert torch.equal(model.bn1.running_mean, before) and not model.training


def test_recalibrated_model_matches_population_normalization():
    """With exact statistics, eval output equals normalizing with the whole data's statistics
    (one big batch: population variance estimated with the m/(m-1) correction)."""
    bn = batchnorm.BatchNorm1d(3).double()
    data = torch.randn(200, 3, dtype=torch.float64) * 3 + 2
    batchnorm.recalibrate(bn, [data], progress=False)
    np.testing.assert_allclose(bn.running_var.numpy(), data.var(0).numpy(), rtol=1e-12)


# ---------------------------------------------------------------- fold


def _trained(model, shape, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(shape) * 2 + 0.5).square().mean().backward()
        optimizer.step()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    return model.eval()


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), batchnorm.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10), batchnorm.BatchNorm1d(10, activation="relu"),
        nn.Linear(10, 3))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(6, 16), batchnorm.BatchNorm1d(16)
        self.fc2, self.bn2 = nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16, affine=False)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.sigmoid(self.bn1(self.fc1(x)))
        return self.out(torch.sigmoid(self.bn2(self.fc2(x))))


@pytest.mark.parametrize("build,shape", [(_cnn, (4, 3, 8, 8)), (MLP, (12, 6)),
                                         (lambda: nn.Sequential(nn.Conv3d(2, 3, 2),
                                                                nn.BatchNorm3d(3)),
                                          (3, 2, 4, 4, 4)),
                                         (lambda: nn.Sequential(nn.Conv1d(2, 3, 3),
                                                                batchnorm.BatchNorm1d(3)),
                                          (5, 2, 9))])
def test_fold_matches_unfolded_eval_model(build, shape):
    torch.manual_seed(0)
    model = _trained(build(), shape)
    folded, report = batchnorm.fold(model, report=True)
    assert not report.unfolded
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(shape) * 2 + 0.5
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5
    # the original model is untouched
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Unfoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_shared_input = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn_no_stats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        h = self.bn_after_relu(torch.relu(self.conv(x)))
        a = self.conv2(h)
        h = self.bn_shared_input(a) + a  # conv2's output is used twice
        return self.bn_no_stats(self.conv3(h))


def test_fold_reports_what_it_cannot_fold(caplog):
    torch.manual_seed(0)
    model = _trained(Unfoldable(), (4, 3, 5, 5))
    with caplog.at_level(logging.WARNING, logger="batchnorm"):
        folded, report = batchnorm.fold(model, report=True)
    reasons = dict(report.unfolded)
    assert set(reasons) == {"bn_after_relu", "bn_shared_input", "bn_no_stats"}
    assert "not the output of a Linear or Conv" in reasons["bn_after_relu"]
    assert "used elsewhere" in reasons["bn_shared_input"]
    assert "no running statistics" in reasons["bn_no_stats"]
    assert "bn_after_relu" in caplog.text
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x))  # unfolded layers stay in place


def test_fold_falls_back_to_sequential_order_when_tracing_fails():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: not traceable
                return x
            return self.body(x)

    torch.manual_seed(0)
    model = _trained(Dynamic(), (8, 4))
    folded, report = batchnorm.fold(model, report=True)
    assert report.folded == [("body.0", "body.1")]
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


@pytest.mark.parametrize("progress", [False, True])
def test_recalibrate_draws_exactly_num_batches_and_leaves_the_iterator_open(progress):
    """The caller's generator yields the rest afterwards (progress bar on or off)."""
    torch.manual_seed(2)
    drawn, closed = [], []

    def generate():
        try:
            for x, _ in _batches([6] * 5):
                drawn.append(x)
                yield x
        finally:
            closed.append(True)

    batches = generate()
    batchnorm.recalibrate(TwoBN().double(), batches, num_batches=2, progress=progress)
    assert len(drawn) == 2 and not closed
    assert len(list(batches)) == 3 and closed


class _SubclassBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_convert_reports_what_it_converts_and_skips(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), _SubclassBN(4),
                          nn.SyncBatchNorm(4), batchnorm.SyncBatchNorm(4),
                          batchnorm.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="batchnorm"):
        same, report = batchnorm.convert(model, report=True)
    assert same is model
    assert report.converted == [("1", "torch.nn.BatchNorm2d -> batchnorm.BatchNorm2d")]
    reasons = dict(report.skipped)
    assert set(reasons) == {"2", "3", "4"}  # "5" is ours already
    assert "_SubclassBN subclasses torch.nn.BatchNorm2d" in reasons["2"]
    assert "sync=True" in reasons["3"] and "pass cls" in reasons["4"]
    assert type(model[2]) is _SubclassBN and type(model[3]) is nn.SyncBatchNorm
    assert "3 BN layer(s) left as they were" in caplog.text
    assert batchnorm.convert(model) is model  # the old return value without report=True
    _, report = batchnorm.convert(model, sync=True, report=True)
    assert [name for name, _ in report.converted] == ["1", "3", "5"]
    assert [name for name, _ in report.skipped] == ["2"]
    _, report = batchnorm.convert(model, to="torch", report=True)
    assert not report.converted and len(report.skipped) == 4  # synchronized ones stay


def _add_one(module, args, output):
    return output + 1


def _double_input(module, args):
    return (args[0] * 2,)


@pytest.mark.parametrize("to,sync", [("batchnorm", False), ("batchnorm", True)])
def test_convert_keeps_hooks(to, sync):
    bn = nn.BatchNorm2d(3).eval()
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bn)
    handle = bn.register_forward_hook(_add_one)
    bn.register_forward_pre_hook(_double_input)
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        expected = model(x)
        batchnorm.convert(model, to=to, sync=sync)
        assert type(model[1]) is not nn.BatchNorm2d
        assert torch.allclose(model(x), expected, atol=1e-6)
        if not sync:
            batchnorm.convert(model, to="torch")
            assert type(model[1]) is nn.BatchNorm2d
            assert torch.allclose(model(x), expected, atol=1e-6)
        handle.remove()  # the handle from the original layer still works
        assert torch.allclose(model(x), expected - 1, atol=1e-6)


class _WSConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class _SequentialWithForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


class _Untraceable(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: not traceable
            return x
        return self.body(x)


@pytest.mark.parametrize("traceable", [True, False])
def test_fold_refuses_layers_it_does_not_know(traceable):
    """Parametrized, weight-standardizing, hooked convolutions and unknown containers stay,
    each reported with the reason and the way out; the function is unchanged."""
    hooked = nn.Conv2d(3, 3, 1)
    hooked.register_forward_hook(_add_one)
    body = nn.Sequential(
        nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3),
        _WSConv(3, 3, 1), nn.BatchNorm2d(3),
        hooked, nn.BatchNorm2d(3),
        _SequentialWithForward(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
        nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3, activation="tanh"))
    model = _trained(body if traceable else _Untraceable(body), (4, 3, 5, 5))
    prefix = "" if traceable else "body."
    folded, report = batchnorm.fold(model, report=True)
    assert report.method == ("torch.fx" if traceable else "nn.Sequential")
    # traced, the container's own forward is seen through: its conv and BN fold
    assert report.folded == ([("8.0", "8.1")] if traceable else []) + [(f"{prefix}9",
                                                                         f"{prefix}10")]
    reasons = dict(report.unfolded)
    assert "parametrized" in reasons[f"{prefix}1"] and "remove_parametrizations" in reasons[
        f"{prefix}1"]
    assert "parametrized" in reasons[f"{prefix}3"]
    assert "_WSConv, not exactly" in reasons[f"{prefix}5"]
    assert "forward hooks" in reasons[f"{prefix}7"]
    if not traceable:
        assert "has a forward of its own" in reasons[f"{prefix}8.1"]
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-6
    assert isinstance(folded.get_submodule(f"{prefix}10"), nn.Tanh)


def test_fold_explains_a_model_it_cannot_copy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 3, 1)), nn.BatchNorm2d(3))
    with pytest.raises(RuntimeError, match=r"deepcopy failed.*torch.no_grad\(\)"):
        batchnorm.fold(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 4, 4))
    _, report = batchnorm.fold(model, report=True)
    assert "forward hooks" in dict(report.unfolded)["1"]
