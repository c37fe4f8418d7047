"""batchnorm.probes against hand computations on tiny networks, and the promise that probing
leaves training exactly as it was; the VGG-style CNN's shapes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import batchnorm
from batchnorm.models.vgg import VGGNet
from batchnorm.monitor import ActivationMonitor
from batchnorm.probes import (
    NoisyBN,
    TimeVaryingNoise,
    add_noise_after_bn,
    batch_loss,
    default_layers,
    gradient_ics,
    landscape_smoothness,
    layer_drift,
    unit_drift,
)

BN1D = [nn.BatchNorm1d, batchnorm.BatchNorm1d]
BN2D = [nn.BatchNorm2d, batchnorm.BatchNorm2d]


def half_sse(output, target):
    return 0.5 * ((output - target) ** 2).sum()


# ---------------------------------------------------------------- ICS as gradient change


def test_ics_two_layer_linear_closed_form(rng):
    """f(X) = X W1^T W2^T, L = 1/2 ||f(X) - Y||^2, SGD: the gradients before and after W1's
    step in closed form (Santurkar et al., Definition 2.1)."""
    W1 = torch.randn(3, 4, generator=rng, dtype=torch.float64)
    W2 = torch.randn(2, 3, generator=rng, dtype=torch.float64)
    X = torch.randn(5, 4, generator=rng, dtype=torch.float64)
    Y = torch.randn(5, 2, generator=rng, dtype=torch.float64)
    lr = 0.05
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(W1)
        model[1].weight.copy_(W2)

    R = X @ W1.T @ W2.T - Y
    G1 = (R @ W2).T @ X                     # dL/dW1
    G2 = R.T @ (X @ W1.T)                   # dL/dW2
    W1_next = W1 - lr * G1
    G2_after = (X @ W1_next.T @ W2.T - Y).T @ (X @ W1_next.T)

    first, second = gradient_ics(model, batch_loss(half_sse, X, Y), lr)
    assert (first.layer, second.layer) == ("0", "1")
    assert first.l2 == 0 and first.cosine == pytest.approx(1.0)
    assert first.grad_norm == pytest.approx(float(G1.norm()), rel=1e-12)
    assert second.grad_norm == pytest.approx(float(G2.norm()), rel=1e-12)
    assert second.grad_norm_after == pytest.approx(float(G2_after.norm()), rel=1e-12)
    assert second.l2 == pytest.approx(float((G2 - G2_after).norm()), rel=1e-12)
    cosine = float((G2 * G2_after).sum() / (G2.norm() * G2_after.norm()))
    assert second.cosine == pytest.approx(cosine, rel=1e-12)
    assert second.l2 > 1e-3  # the example is not degenerate


class Tiny(nn.Module):
    """linear -> BN -> ReLU -> linear (with bias), float64."""

    def __init__(self, bn_class, generator):
        super().__init__()
        self.fc1 = nn.Linear(4, 6, bias=False)
        self.bn = bn_class(6)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        self.double()

    def forward(self, x):
        return self.fc2(self.relu(self.bn(self.fc1(x))))


def reference_grads(model, params, X, Y, wanted):
    """Plain autograd through functional_call, on clones of the model's buffers."""
    leaves = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    loss = half_sse(functional_call(model, {**leaves, **buffers}, (X,)), Y)
    return dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted]),
                    strict=True))


@pytest.mark.parametrize("bn_class", BN1D)
def test_ics_bn_net_with_momentum_optimizer_matches_hand_updates(bn_class, rng):
    """W^(t+1) from the training optimizer's state (SGD with momentum and weight decay),
    applied by hand to the preceding layers, gradients by plain autograd."""
    model = Tiny(bn_class, rng)
    X = torch.randn(8, 4, generator=rng, dtype=torch.float64)
    Y = torch.randn(8, 3, generator=rng, dtype=torch.float64)
    lr, momentum, wd = 0.1, 0.9, 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    half_sse(model(X), Y).backward()  # one earlier step: momentum buffers exist
    optimizer.step()
    optimizer.zero_grad()

    params = dict(model.named_parameters())
    names = list(params)
    G = reference_grads(model, params, X, Y, names)
    new = {}
    for n, p in params.items():
        d = G[n] + wd * p.detach()
        buf = momentum * optimizer.state[p]["momentum_buffer"] + d
        new[n] = p.detach() - lr * buf
    layers = {"fc1": ["fc1.weight"], "bn": ["bn.weight", "bn.bias"],
              "fc2": ["fc2.weight", "fc2.bias"]}
    expected, moved = [], dict(params)
    for layer, own in layers.items():
        after = reference_grads(model, moved, X, Y, own)
        before = torch.cat([G[n].reshape(-1) for n in own])
        after = torch.cat([after[n].reshape(-1) for n in own])
        expected.append((layer, float((before - after).norm()),
                         float(before @ after / (before.norm() * after.norm()))))
        moved = {**moved, **{n: new[n] for n in own}}

    result = gradient_ics(model, batch_loss(half_sse, X, Y), optimizer)
    assert [r.layer for r in result] == list(layers) == default_layers(model)
    for r, (layer, l2, cosine) in zip(result, expected, strict=True):
        assert r.layer == layer
        assert r.l2 == pytest.approx(l2, rel=1e-10, abs=1e-12)
        assert r.cosine == pytest.approx(cosine, rel=1e-10)
    assert result[1].l2 > 1e-3 and result[2].l2 > 1e-3


def test_ics_callable_update_and_lr_agree(rng):
    model = Tiny(nn.BatchNorm1d, rng)
    X = torch.randn(8, 4, generator=rng, dtype=torch.float64)
    Y = torch.randn(8, 3, generator=rng, dtype=torch.float64)
    loss_fn = batch_loss(half_sse, X, Y)

    def sgd(params, grads):
        return {n: params[n] - 0.03 * g for n, g in grads.items()}

    by_lr = gradient_ics(model, loss_fn, 0.03)
    by_callable = gradient_ics(model, loss_fn, sgd)
    by_optimizer = gradient_ics(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.03))
    for a, b, c in zip(by_lr, by_callable, by_optimizer, strict=True):
        assert a.l2 == pytest.approx(b.l2, rel=1e-12) == pytest.approx(c.l2, rel=1e-12)
    # an update that moves nothing: no gradient change anywhere
    still = gradient_ics(model, loss_fn, lambda params, grads: {})
    assert all(r.l2 == 0 for r in still)


def test_ics_layers_argument(rng):
    model = Tiny(nn.BatchNorm1d, rng)
    X = torch.randn(8, 4, generator=rng, dtype=torch.float64)
    loss_fn = batch_loss(half_sse, X, torch.zeros(8, 3, dtype=torch.float64))
    by_name = gradient_ics(model, loss_fn, 0.1, layers=["fc1", "fc2"])
    by_module = gradient_ics(model, loss_fn, 0.1, layers=[model.fc1, model.fc2])
    assert [r.layer for r in by_name] == ["fc1", "fc2"]
    assert [r.l2 for r in by_name] == [r.l2 for r in by_module]
    # fc2 after fc1 only (BN not listed: it stays at W^(t)) differs from the default
    default = {r.layer: r for r in gradient_ics(model, loss_fn, 0.1)}
    assert by_name[1].l2 != pytest.approx(default["fc2"].l2)
    with pytest.raises(ValueError, match="two layers"):
        gradient_ics(model, loss_fn, 0.1, layers=["", "fc1"])
    with pytest.raises(ValueError, match="no module"):
        gradient_ics(model, loss_fn, 0.1, layers=["fc3"])
    with pytest.raises(ValueError, match="no trainable"):
        gradient_ics(model, loss_fn, 0.1, layers=["relu"])
    with pytest.raises(TypeError):
        gradient_ics(model, loss_fn, "fast")


# ---------------------------------------------------------------- landscape smoothness


def test_smoothness_least_squares_closed_form(rng):
    """L(w) = 1/2 ||X w - y||^2: g = X^T (X w - y), L(w - eta g) = L - eta ||g||^2 +
    eta^2 ||X g||^2 / 2, grad(w - eta g) - g = -eta X^T X g, so beta = ||X^T X g|| / ||g||."""
    X = torch.randn(10, 3, generator=rng, dtype=torch.float64)
    y = torch.randn(10, 1, generator=rng, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=rng, dtype=torch.float64))
    w = model.weight.detach().reshape(3, 1)
    L = float(0.5 * ((X @ w - y) ** 2).sum())
    g = X.T @ (X @ w - y)
    etas = [0.01, 0.05, 0.2]
    losses = [L - eta * float(g.norm()) ** 2 + 0.5 * eta ** 2 * float((X @ g).norm()) ** 2
              for eta in etas]
    hg = float((X.T @ X @ g).norm())

    s = landscape_smoothness(model, batch_loss(half_sse, X, y), etas)
    assert s.step_sizes == tuple(etas)
    assert s.loss == pytest.approx(L, rel=1e-12)
    assert s.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert s.losses == pytest.approx(losses, rel=1e-10)
    assert s.loss_variation == pytest.approx(max(losses) - min(losses), rel=1e-10)
    assert s.grad_change == pytest.approx([eta * hg for eta in etas], rel=1e-10)
    assert s.max_grad_change == pytest.approx(0.2 * hg, rel=1e-10)
    assert s.beta == pytest.approx(hg / float(g.norm()), rel=1e-10)
    assert s.as_dict()["beta"] == s.beta
    for bad in ([], [0.0], [-0.1], [math.inf]):
        with pytest.raises(ValueError):
            landscape_smoothness(model, batch_loss(half_sse, X, y), bad)


@pytest.mark.parametrize("bn_class", BN1D)
def test_smoothness_bn_net_matches_plain_autograd(bn_class, rng):
    model = Tiny(bn_class, rng)
    X = torch.randn(8, 4, generator=rng, dtype=torch.float64)
    Y = torch.randn(8, 3, generator=rng, dtype=torch.float64)
    params = dict(model.named_parameters())
    names = list(params)
    G = reference_grads(model, params, X, Y, names)
    g = torch.cat([G[n].reshape(-1) for n in names])
    etas = [0.02, 0.1]
    betas = []
    for eta in etas:
        moved = reference_grads(model, {n: params[n] - eta * G[n] for n in names}, X, Y, names)
        change = float((torch.cat([moved[n].reshape(-1) for n in names]) - g).norm())
        betas.append(change / (eta * float(g.norm())))
    s = landscape_smoothness(model, batch_loss(half_sse, X, Y), etas)
    assert s.beta == pytest.approx(max(betas), rel=1e-10)
    # only the named parameters move
    only_fc2 = landscape_smoothness(model, batch_loss(half_sse, X, Y), etas,
                                    params=["fc2.weight", "fc2.bias"])
    assert only_fc2.grad_norm == pytest.approx(
        float(torch.cat([G["fc2.weight"].reshape(-1), G["fc2.bias"]]).norm()), rel=1e-12)
    with pytest.raises(ValueError, match="trainable"):
        landscape_smoothness(model, batch_loss(half_sse, X, Y), etas, params=["nope"])


# ---------------------------------------------------------------- training state untouched


class DropNet(nn.Module):
    """conv -> BN -> ReLU -> dropout -> linear: running statistics and global RNG in play."""

    def __init__(self, bn_class):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = bn_class(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def training_state(model, optimizer):
    return (copy.deepcopy(model.state_dict()),
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("bn_class", BN2D)
def test_probes_leave_training_untouched(bn_class):
    torch.manual_seed(0)
    model = DropNet(bn_class)
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 5, (6,))
    loss_fn = batch_loss(nn.functional.cross_entropy, x, y)

    def make_optimizer(m):
        optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
        return optimizer

    optimizer, twin_optimizer = make_optimizer(model), make_optimizer(twin)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        torch.manual_seed(1)
        loss_fn(m).backward()  # one step: Adam state, running stats, .grad all non-trivial
        opt.step()
    torch.manual_seed(2)
    before = training_state(model, optimizer)
    ics = gradient_ics(model, loss_fn, optimizer)
    smooth = landscape_smoothness(model, loss_fn, [1e-3, 1e-2])
    assert_same(training_state(model, optimizer), before)
    assert all(math.isfinite(r.l2) for r in ics) and math.isfinite(smooth.beta)

    # the next training step (dropout draws included) is the one the unprobed twin takes,
    # and its gradient is the probe's G
    torch.manual_seed(2)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        state = torch.get_rng_state()
        opt.zero_grad()
        loss_fn(m).backward()
        if m is model:
            assert [r.grad_norm for r in ics] == pytest.approx(
                [float(torch.cat([p.grad.reshape(-1).double() for p in mod.parameters()])
                       .norm()) for mod in (m.conv, m.bn, m.fc)], rel=1e-6)
        opt.step()
        torch.set_rng_state(state)
    assert_same(model.state_dict(), twin.state_dict())


# ---------------------------------------------------------------- distribution drift


def rows_for(module, unit, medians, spreads, steps=None):
    steps = steps if steps is not None else range(len(medians))
    return [dict(step=s, module=module, unit=unit, p15=m - w / 2, p50=m, p85=m + w / 2)
            for s, m, w in zip(steps, medians, spreads, strict=True)]


def test_drift_synthetic_histories():
    rows = (rows_for("a", 0, [0.0, 0.5, 1.0, 1.5, 2.0], [1.0] * 5)        # median moves 2 spreads
            + rows_for("a", 1, [1.0] * 5, [1.0, 1.5, 2.0, 2.5, 3.0])     # spread 1 -> 3, mean 2
            + rows_for("b", 0, [0.0, 1.0, 0.0, 1.0], [1.0] * 4, steps=[30, 10, 20, 0]))
    drift = layer_drift(rows)
    assert list(drift) == ["a", "b"]
    a = drift["a"]
    assert (a.median_drift, a.spread_drift, a.drift) == pytest.approx((1.0, 0.5, 1.5))
    assert (a.units, a.steps) == (2, 5)
    # unordered steps are sorted: medians by step are 1, 1, 0, 0 -> range 1, variation 1
    assert drift["b"].drift == pytest.approx(1.0)
    tv = layer_drift(rows, measure="total_variation")
    assert tv["a"].median_drift == pytest.approx(1.0) and tv["b"].drift == pytest.approx(1.0)
    oscillating = rows_for("c", 0, [0.0, 1.0, 0.0, 1.0], [2.0] * 4)
    assert layer_drift(oscillating)["c"].drift == pytest.approx(0.5)
    assert layer_drift(oscillating, measure="total_variation")["c"].drift == pytest.approx(1.5)


def test_unit_drift_edge_cases():
    assert unit_drift([3.0], [2.0], [4.0]) == (0.0, 0.0)           # one step
    assert unit_drift([1.0, 1.0], [1.0, 1.0], [1.0, 1.0]) == (0.0, 0.0)  # constant unit
    assert unit_drift([1.0, 2.0], [1.0, 2.0], [1.0, 2.0])[0] == math.inf
    with pytest.raises(ValueError, match="measure"):
        unit_drift([1.0], [0.0], [2.0], measure="max")
    with pytest.raises(ValueError, match="below"):
        unit_drift([1.0], [2.0], [0.0])
    with pytest.raises(ValueError, match="twice"):
        layer_drift(rows_for("a", 0, [0.0, 1.0], [1.0, 1.0], steps=[5, 5]))
    with pytest.raises(ValueError, match="column"):
        layer_drift([dict(step=0, module="a", unit=0, p50=0.0)])


def test_drift_from_monitor_records(rng):
    """Inputs shifted by a known amount each step: the monitor's median moves by exactly that
    and the spread stays; drift = range of the shifts / the 15-85 spread."""
    base = torch.randn(1001, 2, generator=rng, dtype=torch.float64)
    model = nn.Sequential(nn.Identity())
    monitor = ActivationMonitor(model, ["0"])
    shifts = [0.0, 0.3, -0.2, 0.9]
    for step, shift in enumerate(shifts):
        with monitor.record(step):
            model(base + shift)
    q = torch.quantile(base, torch.tensor([0.15, 0.85], dtype=torch.float64), dim=0)
    spread = q[1] - q[0]
    expected = float((1.1 / spread).mean())
    drift = layer_drift(monitor)["0"]
    assert drift.median_drift == pytest.approx(expected, rel=1e-9)
    assert drift.spread_drift == pytest.approx(0.0, abs=1e-9)
    assert (drift.units, drift.steps) == (2, 4)


# ---------------------------------------------------------------- noisy BN


def test_noise_statistics_and_time_variation():
    torch.manual_seed(0)
    x = torch.randn(20000, 3, dtype=torch.float64) * 4 + 7
    noisy = NoisyBN(nn.BatchNorm1d(3).double(), TimeVaryingNoise(0.5, (1.0, 1.25), seed=3))
    clean = nn.BatchNorm1d(3).double()
    state = torch.get_rng_state()
    params = []
    for step in range(4):
        assert int(noisy.noise.step) == step
        mu, sigma = noisy.noise.distribution(step, 3, dtype=torch.float64)
        out, ref = noisy(x).detach(), clean(x).detach()
        z = out - ref
        tol = 6 * float(sigma.max()) / math.sqrt(x.shape[0])
        # mean mu (non-zero), variance 1 + sigma^2 (non-unit) at this step
        assert z.mean(0).tolist() == pytest.approx(mu.tolist(), abs=tol)
        assert out.var(0).tolist() == pytest.approx((1 + sigma ** 2).tolist(), rel=0.05)
        assert ((mu.abs() > 0) & (mu.abs() < 0.5)).all()
        assert ((sigma > 1.0) & (sigma < 1.25)).all()
        params.append(torch.cat([mu, sigma]))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    assert all(not torch.allclose(params[i], params[i + 1]) for i in range(3))  # time-varying
    noisy.eval()
    clean.eval()
    assert torch.equal(noisy(x), clean(x)) and int(noisy.noise.step) == 4


def test_noise_is_reproducible_from_seed_and_state_dict():
    x = torch.randn(16, 4, 5, 5)
    a, b, c = (TimeVaryingNoise(seed=s) for s in (7, 7, 8))
    outs_a, outs_b, outs_c = [a(x) for _ in range(3)], [b(x) for _ in range(3)], c(x)
    assert all(torch.equal(p, q) for p, q in zip(outs_a, outs_b, strict=True))
    assert not torch.equal(outs_a[0], outs_c)
    assert not torch.equal(outs_a[0], outs_a[1])
    resumed = TimeVaryingNoise(seed=0)
    resumed.load_state_dict(a.state_dict())  # seed 7, step 3
    assert torch.equal(resumed(x), a(x))
    assert torch.equal(copy.deepcopy(a)(x), a(x))
    with pytest.raises(ValueError):
        TimeVaryingNoise(0.0)
    with pytest.raises(ValueError):
        TimeVaryingNoise(std_range=(2.0, 1.0))
    with pytest.raises(TypeError):
        TimeVaryingNoise(seed=1.5)


@pytest.mark.parametrize("bn_class", BN2D)
def test_add_noise_after_bn_and_ics_on_noisy_net(bn_class):
    torch.manual_seed(0)
    model = VGGNet(width=2, depth=1, stages=2, hidden=8, norm=bn_class)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    replaced = add_noise_after_bn(model, seed=5)
    assert replaced == ["features.block1.norm1", "features.block2.norm1"]
    seeds = {int(m.noise.seed) for m in model.modules() if isinstance(m, NoisyBN)}
    assert len(seeds) == 2
    assert "features.block1.norm1.bn.running_mean" in model.state_dict()
    model(x)
    steps = [int(m.step) for m in model.modules() if isinstance(m, TimeVaryingNoise)]
    assert steps == [1, 1]
    loss_fn = batch_loss(nn.functional.cross_entropy, x, y)
    result = gradient_ics(model, loss_fn, 0.05)
    assert result[0].l2 == 0 and all(math.isfinite(r.l2) for r in result)
    assert [int(m.noise.step) for m in model.modules() if isinstance(m, NoisyBN)] == [1, 1]
    # the probe saw the noise of step 1, the one the next training step draws
    loss_fn(model).backward()
    first = model.features.block1.conv1.weight.grad
    assert result[0].grad_norm == pytest.approx(float(first.double().norm()), rel=1e-6)
    with pytest.raises(ValueError, match="activation"):
        add_noise_after_bn(nn.Sequential(batchnorm.BatchNorm1d(3, activation="relu")))
    assert add_noise_after_bn(nn.Sequential(nn.Linear(2, 3), nn.SyncBatchNorm(3))) == ["1"]


# ---------------------------------------------------------------- VGG-style CNN


@pytest.mark.parametrize("norm", [batchnorm.BatchNorm2d, nn.BatchNorm2d, None])
def test_vgg_shapes_and_norm(norm):
    model = VGGNet(width=4, depth=2, stages=3, hidden=16, norm=norm)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 6 and [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16]
    assert len(norms) == (0 if norm is None else 6)
    assert all((c.bias is None) == (norm is not None) for c in convs)
    assert model.classifier.fc.in_features == 16 * 3 * 3


def test_vgg_options_and_init():
    assert VGGNet(num_classes=7, in_channels=3, stages=2, image_size=32)(
        torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with_bn = VGGNet(generator=torch.Generator().manual_seed(4))
    without = VGGNet(norm=None, generator=torch.Generator().manual_seed(4))
    assert torch.equal(with_bn.features.block2.conv1.weight, without.features.block2.conv1.weight)
    for bad in (dict(width=0), dict(depth=True), dict(stages=6), dict(norm="bn")):
        with pytest.raises((ValueError, TypeError)):
            VGGNet(**bad)
