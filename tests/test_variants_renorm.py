"""Batch Renormalization against the float64 reference of Ioffe (2017), Algorithm 1 and the
backward of section 3: forward, gradients, moving averages, inference, schedule, equivalences."""

from __future__ import annotations

import copy
from dataclasses import astuple

import numpy as np
import pytest
import test_variants_common as vc
import torch
from conftest import rel_err
from test_variants_common import KINDS, check, make_input, numpy64, step_and_check
from torch import nn

import batchnorm
from batchnorm import reference as bn_ref
from batchnorm.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    batch_renorm,
    renorm_schedule,
    to_renorm,
)
from batchnorm.variants import reference as ref
from batchnorm.variants.renorm import PAPER_SCHEDULE, RampSchedule

EPS = 1e-5


def _renorm_module(kind, dtype, gen, **kwargs):
    rank, shape = KINDS[kind]
    m = vc.module_class("BatchRenorm", rank)(shape[1], dtype=dtype, **kwargs)
    vc.randomize(m, gen, signed=True)
    with torch.no_grad():  # moving averages far enough from the batch's that r and d clip
        m.running_mean.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
        m.running_var.copy_(0.3 + 4 * torch.rand(shape[1], generator=gen, dtype=torch.float64))
    return m


# --------------------------------------------------------------------------------------------
# the reference against its own definition


def test_reference_backward_matches_central_differences_with_r_d_constant():
    """Section 3's gradients equal finite differences of Algorithm 1 with r, d held fixed."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(5, 3, 2))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    mu, sigma = rng.normal(size=3), rng.uniform(0.5, 3.0, 3)
    weights = rng.normal(size=x.shape)
    _, cache = ref.batch_renorm_forward(x, gamma, beta, mu, sigma, 1.5, 0.3, EPS)
    assert np.any(cache.r == 1.5) or np.any(cache.r == 1 / 1.5)  # clipping is exercised
    grads = ref.batch_renorm_backward(weights, cache)

    def loss(x, gamma, beta):  # Algorithm 1 with r and d frozen at the values above
        rows = bn_ref.to_rows(x)
        mu_b = rows.mean(axis=0)
        sigma_b = np.sqrt(EPS + ((rows - mu_b) ** 2).mean(axis=0))
        y = gamma * ((rows - mu_b) / sigma_b * cache.r + cache.d) + beta
        return np.sum(bn_ref.to_rows(weights) * y)

    h = 1e-6
    for which, arg, analytic in ((0, x, grads.dx), (1, gamma, grads.dgamma),
                                 (2, beta, grads.dbeta)):
        numeric = np.zeros_like(arg)
        for index in np.ndindex(*arg.shape):
            args = [x, gamma, beta]
            plus, minus = arg.copy(), arg.copy()
            plus[index] += h
            minus[index] -= h
            args[which] = plus
            up = loss(*args)
            args[which] = minus
            numeric[index] = (up - loss(*args)) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_reference_is_batchnorm_with_r1_d0():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(6, 4))
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    y, cache = ref.batch_renorm_forward(x, gamma, beta, rng.normal(size=4),
                                        rng.uniform(1, 2, 4), 1.0, 0.0, EPS)
    y_bn, bn_cache = bn_ref.batch_norm_forward(x, gamma, beta, EPS)
    np.testing.assert_allclose(y, y_bn, rtol=1e-13)
    dy = rng.normal(size=x.shape)
    np.testing.assert_allclose(ref.batch_renorm_backward(dy, cache).dx,
                               bn_ref.batch_norm_backward(dy, bn_cache).dx, rtol=1e-11)


# --------------------------------------------------------------------------------------------
# modules against the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("running_average", ["sigma", "var"])
@pytest.mark.parametrize("path", vc.PATHS)
def test_module_matches_reference_over_steps(kind, dtype, running_average, path, monkeypatch,
                                             one_thread):
    vc.select_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(len(kind))
    fwd_tol = vc.TOL[dtype][0]
    m = _renorm_module(kind, dtype, gen, r_max=1.5, d_max=0.5, momentum=0.2,
                       running_average=running_average)
    clipped = False
    for _ in range(3):
        x = make_input(kind, gen, dtype)
        mu = numpy64(m.running_mean)
        sigma = ref.sigma_from_running_var(numpy64(m.running_var), m.eps)
        cache = step_and_check(
            m, x, lambda x64, mu=mu, sigma=sigma: ref.batch_renorm_forward(
                x64, numpy64(m.weight), numpy64(m.bias), mu, sigma, 1.5, 0.5, m.eps),
            lambda dy64, cache: astuple(ref.batch_renorm_backward(dy64, cache)), gen,
            vc.TOL[dtype], path)
        clipped |= bool(np.any(np.abs(cache.d) == 0.5) and np.any(cache.r != 1.5))
        if running_average == "sigma":
            mu_new, sigma_new = ref.renorm_moving_averages(mu, sigma, cache, 0.2)
            var_new = ref.running_var_from_sigma(sigma_new, m.eps)
        else:
            mu_new, var_new = bn_ref.update_running_statistics(
                mu, sigma**2 - m.eps, x.detach().double().numpy(), 0.2, 1)
        check(m.running_mean, mu_new, fwd_tol, "running_mean")
        check(m.running_var, var_new, fwd_tol * 10, "running_var")
    assert clipped, "the test data should make r and d clip"
    # inference: the paper's y = gamma (x - mu) / sigma + beta with the final moving averages
    m.eval()
    x = make_input(kind, gen, dtype)
    expected = ref.batch_renorm_inference(
        x.double().numpy(), m.weight.detach().double().numpy(), m.bias.detach().double().numpy(),
        m.running_mean.double().numpy(),
        ref.sigma_from_running_var(m.running_var.double().numpy(), m.eps))
    check(m(x), expected, fwd_tol, "inference")


@pytest.mark.parametrize("kind", ["1d-2D", "2d-channels_last", "3d"])
@pytest.mark.parametrize("path", vc.PATHS)
def test_r1_d0_is_batchnorm(kind, path, monkeypatch, one_thread):
    """r_max = 1, d_max = 0 is BN: outputs and gradients; with running_average="var" also the
    running statistics (the paper's "sigma" update is checked against the reference above)."""
    vc.select_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(3)
    rank, shape = KINDS[kind]
    renorm = _renorm_module(kind, torch.float64, gen, r_max=1.0, d_max=0.0, momentum=0.1,
                            running_average="var")
    bn = getattr(batchnorm, f"BatchNorm{rank}d")(shape[1], dtype=torch.float64)
    bn.load_state_dict(renorm.state_dict())
    for _ in range(2):
        x = make_input(kind, gen)
        outs = []
        for m in (renorm, bn):
            xi = x.clone().requires_grad_()
            m.zero_grad()
            y = m(xi)
            y.backward(torch.ones_like(y) * torch.arange(y.numel()).reshape(y.shape).double())
            outs.append((y, xi.grad, m.weight.grad, m.bias.grad))
        for a, b in zip(*outs, strict=True):
            assert rel_err(a, b) < 1e-13
        assert rel_err(renorm.running_var, bn.running_var) < 1e-15
        assert rel_err(renorm.running_mean, bn.running_mean) < 1e-15


@pytest.mark.parametrize("path", vc.PATHS)
def test_gradcheck_and_gradgradcheck(path, monkeypatch):
    """Finite differences see r and d move with x, which the paper's stop_gradient ignores on
    purpose; with both clipped to their bounds r and d are locally constant, and the stop-gradient
    derivative is the true one (r != 1, d != 0 all the same)."""
    gen = torch.Generator().manual_seed(5)
    x = make_input("2d", gen).requires_grad_()  # mean ~1.5, std ~2
    w = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    rm = torch.full((3,), 10.0, dtype=torch.float64)  # d = (mu_B - 10) / 6 < -0.2: clipped
    rv = torch.full((3,), 36.0, dtype=torch.float64)  # r = sigma_B / 6 < 1 / 1.2: clipped
    vc.select_path(monkeypatch, path)

    def f(x, w, b):  # momentum 0: the moving averages stay put between calls
        return batch_renorm(x, rm, rv, w, b, True, 0.0, r_max=1.2, d_max=0.2)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


# --------------------------------------------------------------------------------------------
# schedule


def test_paper_schedule():
    r, d = PAPER_SCHEDULE["r_max"], PAPER_SCHEDULE["d_max"]
    assert [r(s) for s in (0, 5000, 22500, 40000, 10**6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert [d(s) for s in (0, 5000, 15000, 25000, 10**6)] == [0.0, 0.0, 2.5, 5.0, 5.0]
    assert renorm_schedule(2.0, 1.0, warmup=10, r_max_step=20, d_max_step=30)["r_max"] == \
        RampSchedule(1.0, 2.0, 10, 20)


def test_module_follows_schedule_by_step(one_thread):
    gen = torch.Generator().manual_seed(7)
    m = BatchRenorm1d(4, dtype=torch.float64)  # default: the paper's schedule
    assert m.bounds() == (1.0, 0.0)
    bn = batchnorm.BatchNorm1d(4, momentum=0.01, dtype=torch.float64)
    x = make_input("1d-2D", gen, shape=(8, 4))
    assert rel_err(m(x), bn(x)) < 1e-14  # warm-up: BN (step 0)
    assert int(m.num_batches_tracked) == 1
    m.num_batches_tracked.fill_(40_000)
    assert m.bounds() == (3.0, 5.0)
    small = BatchRenorm1d(4, **renorm_schedule(2.0, 1.0, warmup=0, r_max_step=2, d_max_step=4))
    assert [small.bounds(s) for s in (0, 1, 2, 4)] == [(1.0, 0.0), (1.5, 0.25), (2.0, 0.5),
                                                        (2.0, 1.0)]


def test_cumulative_average_momentum_none(one_thread):
    gen = torch.Generator().manual_seed(8)
    m = BatchRenorm1d(3, momentum=None, r_max=2.0, d_max=1.0, dtype=torch.float64)
    sigmas, means = [], []
    for _ in range(3):
        x = make_input("1d-2D", gen, shape=(10, 3))
        mu, var, _ = bn_ref.batch_statistics(x.numpy())
        means.append(mu)
        sigmas.append(np.sqrt(var + m.eps))
        m(x)
    # alpha = 1/t: the running values are the averages of mu_B and sigma_B over the 3 steps
    # (the initial sigma = sqrt(1 + eps) is replaced at t = 1)
    check(m.running_mean, np.mean(means, axis=0), 1e-14, "mean")
    check(m.running_var, np.mean(sigmas, axis=0) ** 2 - m.eps, 1e-13, "var")


# --------------------------------------------------------------------------------------------
# the library's tools: convert, fold, recalibrate, torch interop


def test_to_renorm_shares_parameters_and_keeps_inference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          batchnorm.BatchNorm2d(3, activation="relu"), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5))
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            vc.randomize(m, torch.Generator().manual_seed(1))
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    expected = model(x)
    weight = model[1].weight
    to_renorm(model, r_max=3.0, d_max=5.0)
    names = [type(m).__name__ for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert names == ["BatchRenorm2d", "BatchRenorm2d", "BatchRenorm1d"]
    assert model[1].weight is weight and model[3].activation == "relu"
    assert rel_err(model(x), expected) < 1e-6  # float32: torch's eval kernel vs ours
    single = to_renorm(nn.BatchNorm2d(3), momentum=0.01)
    assert isinstance(single, BatchRenorm2d) and single.momentum == 0.01
    with pytest.raises(ValueError, match="track_running_stats=False"):
        to_renorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))


def test_fold_recalibrate_and_convert_to_torch():
    model, x = vc.check_fold_and_recalibrate(BatchRenorm2d(3, r_max=2.0, d_max=1.0))
    # convert knows exact classes only: renorm trains differently from torch's BN, so a
    # renorm layer stays and the report says why (fold, above, merges its inference map)
    torch_model, report = batchnorm.convert(model, to="torch", report=True)
    assert type(torch_model[1]) is BatchRenorm2d
    assert [name for name, _ in report.skipped] == ["1"]
    assert "BatchRenorm2d" in report.skipped[0][1]


# --------------------------------------------------------------------------------------------
# bad arguments


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"batch_renorm: r_max must be a number >= 1"):
        batch_renorm(x, rm, rv, training=True, r_max=0.5, d_max=0.0)
    with pytest.raises(ValueError, match=r"batch_renorm: d_max must be a number >= 0"):
        batch_renorm(x, rm, rv, training=True, r_max=1.0, d_max=-1.0)
    with pytest.raises(ValueError, match=r"running_mean and running_var are required"):
        batch_renorm(x, None, None, training=True, r_max=2.0, d_max=1.0)
    with pytest.raises(ValueError, match=r"running_average must be one of"):
        batch_renorm(x, rm, rv, training=True, r_max=2.0, d_max=1.0, running_average="std")
    with pytest.raises(ValueError, match=r"batch_renorm: weight must have shape \(3,\)"):
        batch_renorm(x, rm, rv, torch.ones(4), training=True, r_max=2.0, d_max=1.0)
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(TypeError, match=r"r_max must be a number or a callable"):
        BatchRenorm1d(3, r_max="3")
    with pytest.raises(ValueError, match=r"r_max must be a number >= 1"):
        BatchRenorm1d(3, r_max=0.9)
    with pytest.raises(ValueError, match=r"\(step 3\): d_max must be"):
        BatchRenorm1d(3, d_max=lambda step: -step).bounds(3)
    with pytest.raises(ValueError, match=r"expected 4D input"):
        BatchRenorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"r_max_step must be an int > warmup=5000"):
        renorm_schedule(r_max_step=100)


# --------------------------------------------------------------------------------------------
# synchronized across processes


def _sync_world(rank, world, state, batches, grads, sizes):
    """Each process: two training steps of SyncBatchRenorm on its shard; what it computed."""
    from batchnorm import SyncBatchRenorm

    local = BatchRenorm2d(3, r_max=1.5, d_max=0.5, momentum=0.2, dtype=torch.float64)
    local.load_state_dict(state)
    layer = SyncBatchRenorm.from_batchnorm(local)
    out = []
    for x, dy in zip(batches, grads, strict=True):
        x = x.split(sizes)[rank].clone().requires_grad_()
        layer.zero_grad()
        y = layer(x)
        y.backward(dy.split(sizes)[rank])
        out.append(dict(y=y.detach(), dx=x.grad, dw=layer.weight.grad.clone(),
                        db=layer.bias.grad.clone(), mean=layer.running_mean.clone(),
                        var=layer.running_var.clone()))
    assert type(layer.to_batchnorm()) is BatchRenorm2d
    return out


@pytest.mark.distributed
def test_sync_batch_renorm_equals_single_process_on_the_whole_batch(tmp_path):
    from multiproc import spawn

    gen = torch.Generator().manual_seed(11)
    single = _renorm_module("2d", torch.float64, gen, r_max=1.5, d_max=0.5, momentum=0.2)
    state = copy.deepcopy(single.state_dict())
    batches = [make_input("2d", gen, shape=(8, 3, 4, 4)) for _ in range(2)]
    grads = [torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    sizes = [5, 3]
    results = spawn(tmp_path, 2, _sync_world, state, batches, grads, sizes)
    for step, (x, dy) in enumerate(zip(batches, grads, strict=True)):
        x = x.clone().requires_grad_()
        single.zero_grad()
        y = single(x)
        y.backward(dy)
        per_rank = [r[step] for r in results]
        assert rel_err(torch.cat([r["y"] for r in per_rank]), y) < 1e-13
        assert rel_err(torch.cat([r["dx"] for r in per_rank]), x.grad) < 1e-12
        assert rel_err(sum(r["dw"] for r in per_rank), single.weight.grad) < 1e-12
        assert rel_err(sum(r["db"] for r in per_rank), single.bias.grad) < 1e-12
        for r in per_rank:
            assert rel_err(r["mean"], single.running_mean) < 1e-14
            assert rel_err(r["var"], single.running_var) < 1e-14


def test_to_renorm_leaves_other_variants():
    from batchnorm.variants import GhostBatchNorm2d, InPlaceABN2d

    model = nn.Sequential(GhostBatchNorm2d(3, ghost_batch_size=2), InPlaceABN2d(3),
                          BatchRenorm2d(3, r_max=2.0, d_max=1.0), nn.BatchNorm2d(3))
    kinds = [type(m) for m in model[:3]]
    to_renorm(model)
    assert [type(m) for m in model] == [*kinds, BatchRenorm2d]
    assert model[2].r_max == 2.0
