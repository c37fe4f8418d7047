"""Ghost BN against the float64 reference of Hoffer, Hubara & Soudry (2017), section 4: each
virtual batch normalized with its own statistics, running statistics per virtual batch."""

from __future__ import annotations

import warnings

import pytest
import test_variants_common as vc
import torch
from conftest import rel_err
from test_variants_common import KINDS, TOL, check, make_input, numpy64, step_and_check

import batchnorm
from batchnorm.variants import GhostBatchNorm1d, GhostBatchNorm2d, ghost_batch_norm
from batchnorm.variants import reference as ref
from batchnorm.variants.ghost import ghost_batch_sizes

# (kind, batch size N, ghost_batch_size): even splits, a remainder, one batch (N <= g)
CASES = [
    ("1d-2D", 12, 4), ("1d-2D", 10, 3), ("1d-3D", 7, 2), ("2d", 9, 4),
    ("2d-channels_last", 8, 4), ("3d", 5, 2), ("3d-channels_last", 4, 8),
]


def test_virtual_batch_sizes():
    assert ghost_batch_sizes(12, 4) == ref.ghost_batch_sizes(12, 4) == [4, 4, 4]
    assert ghost_batch_sizes(10, 4) == [4, 6]  # the remainder joins the last virtual batch
    assert ghost_batch_sizes(3, 4) == [3]
    assert ghost_batch_sizes(4, 4) == [4]
    assert ghost_batch_sizes(7, 1) == [1] * 7
    for n in range(1, 40):
        for g in range(1, 12):
            sizes = ghost_batch_sizes(n, g)
            assert sum(sizes) == n and min(sizes) >= min(n, g) and max(sizes) < 2 * max(g, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("case", CASES, ids=[f"{k}-N{n}-g{g}" for k, n, g in CASES])
@pytest.mark.parametrize("path", vc.PATHS)
def test_module_matches_reference_over_steps(case, momentum, dtype, path, monkeypatch,
                                             one_thread):
    vc.select_path(monkeypatch, path)
    kind, n, g = case
    rank, shape = KINDS[kind]
    shape = (n, *shape[1:])
    gen = torch.Generator().manual_seed(n * 10 + g)
    fwd_tol = TOL[dtype][0]
    m = vc.randomize(vc.module_class("GhostBatchNorm", rank)(shape[1], momentum=momentum,
                                                       ghost_batch_size=g, dtype=dtype), gen)
    batches_before = 0
    for _ in range(2):
        x = make_input(kind, gen, dtype, shape)
        mean, var = numpy64(m.running_mean), numpy64(m.running_var)
        step_and_check(m, x, lambda x64: ref.ghost_batch_norm_forward(
            x64, numpy64(m.weight), numpy64(m.bias), g, m.eps), ref.ghost_batch_norm_backward,
            gen, TOL[dtype],
            path if len(ghost_batch_sizes(n, g)) > 1 else None)  # one batch: core BN
        mean, var = ref.ghost_running_statistics(mean, var, x.detach().double().numpy(), g,
                                                 momentum, batches_before)
        check(m.running_mean, mean, fwd_tol, "running_mean")
        check(m.running_var, var, fwd_tol, "running_var")
        batches_before += len(ghost_batch_sizes(n, g))
        assert int(m.num_batches_tracked) == batches_before  # counts virtual batches
    m.eval()  # inference: BN's affine map with the running statistics
    x = make_input(kind, gen, dtype, shape)
    expected = ref.frozen_batch_norm(x.double().numpy(), m.weight.detach().double().numpy(),
                                     m.bias.detach().double().numpy(),
                                     m.running_mean.double().numpy(),
                                     m.running_var.double().numpy(), m.eps)
    check(m(x), expected, fwd_tol, "inference")


@pytest.mark.parametrize("kind", ["1d-2D", "2d-channels_last", "3d"])
@pytest.mark.parametrize("g_offset", [0, 5])
def test_whole_batch_is_batchnorm(kind, g_offset, one_thread):
    """ghost_batch_size >= N is BN, bit for bit (the same computation)."""
    rank, shape = KINDS[kind]
    gen = torch.Generator().manual_seed(1)
    ghost = vc.randomize(vc.module_class("GhostBatchNorm", rank)(
        shape[1], ghost_batch_size=shape[0] + g_offset, dtype=torch.float64), gen)
    bn = getattr(batchnorm, f"BatchNorm{rank}d")(shape[1], dtype=torch.float64)
    bn.load_state_dict(ghost.state_dict())
    x = make_input(kind, gen)
    results = []
    for m in (ghost, bn):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.cos(y.detach()))
        results.append((y, xi.grad, m.weight.grad, m.running_mean, m.running_var))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", vc.PATHS)
def test_gradcheck_and_gradgradcheck(path, monkeypatch):
    vc.select_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(2)
    x = make_input("2d", gen, shape=(5, 3, 2, 3)).requires_grad_()
    w = (0.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return ghost_batch_norm(x, None, None, w, b, True, ghost_batch_size=2)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_activation_residual_and_no_running_stats(one_thread):
    gen = torch.Generator().manual_seed(3)
    x = make_input("2d", gen, shape=(6, 3, 2, 2))
    res = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    m = GhostBatchNorm2d(3, ghost_batch_size=2, activation="relu", dtype=torch.float64)
    y_ref, _ = ref.ghost_batch_norm_forward(x.numpy(), m.weight.detach().numpy(),
                                            m.bias.detach().numpy(), 2)
    check(m(x, res), torch.relu(torch.as_tensor(y_ref) + res), 1e-12, "relu(GBN(x) + res)")
    untracked = GhostBatchNorm1d(3, ghost_batch_size=2, track_running_stats=False,
                                 dtype=torch.float64).eval()  # eval uses batch statistics
    x = make_input("1d-2D", gen, shape=(4, 3))
    y_ref, _ = ref.ghost_batch_norm_forward(x.numpy(), [1.0] * 3, [0.0] * 3, 2)
    check(untracked(x), y_ref, 1e-12, "eval without running statistics")
    assert "ghost_batch_size=2" in repr(untracked)


def test_fold_and_recalibrate():
    vc.check_fold_and_recalibrate(GhostBatchNorm2d(3, ghost_batch_size=2))


def test_bad_arguments_name_the_argument():
    x = torch.randn(6, 3)
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"ghost_batch_size must be a positive int"):
            ghost_batch_norm(x, None, None, training=True, ghost_batch_size=bad)
        with pytest.raises(ValueError, match=r"GhostBatchNorm1d: ghost_batch_size must be"):
            GhostBatchNorm1d(3, ghost_batch_size=bad)
    with pytest.raises(ValueError, match=r"ghost_batch_size=1 leaves 1 value per channel.*"
                                         r"use ghost_batch_size >= 2"):
        GhostBatchNorm1d(3, ghost_batch_size=1)(x)
    with pytest.raises(ValueError, match=r"momentum=None .* needs num_batches_tracked"):
        ghost_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None,
                         ghost_batch_size=2)
    with pytest.raises(ValueError, match=r"ghost_batch_norm: momentum must be a number"):
        ghost_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=2.0,
                         ghost_batch_size=2)
    assert rel_err(GhostBatchNorm1d(3, ghost_batch_size=None)(x),
                   batchnorm.BatchNorm1d(3)(x)) == 0  # None: plain BN


# --------------------------------------------------------------------------------------------
# ghost_batch_size on the plain modules, under the tools a user applies to them


def _train_twice(module, x, *, call=None):
    """Two training steps of ``call`` (default: the module) on ``x``; outputs and input grads."""
    call = module if call is None else call
    outputs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        y = call(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        outputs += [y.detach(), xi.grad]
    return outputs


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "cumulative"])
@pytest.mark.parametrize("tool", ["script", "trace", "compile"])
def test_plain_module_with_ghost_batches_under_tools(tool, momentum):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64, generator=gen) * 2 + 1
    eager = batchnorm.BatchNorm2d(3, momentum=momentum, ghost_batch_size=4,
                                  activation="relu", dtype=torch.float64)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5, generator=gen)
        eager.bias.uniform_(-0.5, 0.5, generator=gen)
    other = batchnorm.BatchNorm2d(3, momentum=momentum, ghost_batch_size=4,
                                  activation="relu", dtype=torch.float64)
    other.load_state_dict(eager.state_dict())
    if tool == "script":
        call = torch.jit.script(other)
    elif tool == "trace":
        with warnings.catch_warnings():  # the virtual batch sizes are recorded as constants
            warnings.simplefilter("ignore")
            call = torch.jit.trace(other, x.clone(), check_trace=False)
        other.load_state_dict(eager.state_dict())
    else:
        torch._dynamo.reset()
        call = torch.compile(other, backend="aot_eager", fullgraph=False)
    expected = _train_twice(eager, x)
    got = _train_twice(other, x, call=call)
    for a, b in zip(got, expected, strict=True):
        assert rel_err(a, b) < 1e-12
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(other, name), getattr(eager, name)) < 1e-12
    assert int(other.num_batches_tracked) == int(eager.num_batches_tracked) == 4  # 2 x [4, 6]
    ref_y = ref.ghost_batch_norm_forward(x.numpy(), eager.weight.detach().numpy(),
                                         eager.bias.detach().numpy(), 4)[0]
    assert rel_err(expected[2], torch.from_numpy(ref_y).clamp_min(0)) < 1e-12


def test_plain_module_with_ghost_batches_in_model_tools():
    gen = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3),
                                batchnorm.BatchNorm2d(3, ghost_batch_size=2))
    model(torch.randn(6, 2, 5, 5, generator=gen))
    assert "ghost_batch_size=2" in repr(model[1])
    with pytest.raises(ValueError, match=r"\(s\) 1 normalize ghost.*ghost_batch_size=None"):
        batchnorm.convert(model, to="torch")
    with pytest.raises(ValueError, match="ghost batches of 2 samples"):
        batchnorm.SyncBatchNorm.from_batchnorm(model[1])
    _, report = batchnorm.convert(model, sync=True, report=True)  # logs a warning too
    assert [name for name, _ in report.skipped] == ["1"] and "ghost" in report.skipped[0][1]
    assert type(model[1]) is batchnorm.BatchNorm2d
    frozen = batchnorm.freeze(model)
    assert isinstance(frozen[1], batchnorm.FrozenBatchNorm2d)
    back = batchnorm.unfreeze(frozen)
    assert type(back[1]) is batchnorm.BatchNorm2d and back[1].ghost_batch_size == 2
    empty = back[1](torch.randn(0, 3, 3, 3))  # an empty batch, as torch.nn.BatchNorm2d takes it
    assert empty.shape == (0, 3, 3, 3)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        batchnorm.BatchNorm1d(3, ghost_batch_size=0)
