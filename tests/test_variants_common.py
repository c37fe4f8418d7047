"""Helpers shared by the variant tests (tests/test_variants_*.py), and the checks that hold for
every variant: BN's parameters, buffers and state_dict keys, and what the package exports."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err
from torch import nn

import batchnorm
import batchnorm.variants as variants
from batchnorm import reference as bn_ref

# name -> (rank of the module: 1, 2 or 3; input shape); channels_last for 4D/5D where named so
KINDS = {
    "1d-2D": (1, (12, 5)),
    "1d-3D": (1, (6, 4, 7)),
    "2d": (2, (4, 3, 5, 6)),
    "2d-channels_last": (2, (4, 6, 3, 5)),
    "3d": (3, (2, 3, 4, 3, 5)),
    "3d-channels_last": (3, (2, 4, 3, 2, 3)),
}
# relative error bounds per dtype: (forward, gradients)
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 5e-5)}


def make_input(kind: str, gen: torch.Generator, dtype=torch.float64, shape=None) -> torch.Tensor:
    """Fresh random non-zero input with an offset (mean 1.5, std 2) in the kind's layout."""
    shape = shape or KINDS[kind][1]
    x = (1.5 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if kind.endswith("channels_last"):
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def randomize(module: nn.Module, gen: torch.Generator, signed: bool = False) -> nn.Module:
    """Non-trivial gamma (some negative if ``signed``) and beta."""
    if module.weight is not None:
        with torch.no_grad():
            c = module.num_features
            w = 0.5 + torch.rand(c, generator=gen, dtype=torch.float64)
            if signed:
                w[::2] *= -1
            module.weight.copy_(w)
            module.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    return module


def check(actual, expected, tol: float, what: str) -> None:
    def as_tensor(v):
        return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))

    err = rel_err(as_tensor(actual), as_tensor(expected))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def numpy64(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy (``.numpy()`` of a float64 tensor would share its memory)."""
    return t.detach().double().numpy().copy()


def step_and_check(m: nn.Module, x: torch.Tensor, forward_ref, backward_ref,
                   gen: torch.Generator, tol: tuple[float, float], path: str | None = None):
    """One training step of ``m`` on ``x`` checked against the reference:
    ``forward_ref(x64) -> (y, cache)``, ``backward_ref(dy64, cache) -> (dx, dgamma, dbeta)``;
    with ``path``, also that the step ran on it (the variants' C++ Function or not). Returns the
    cache."""
    fwd_tol, grad_tol = tol
    x.requires_grad_()
    y_ref, cache = forward_ref(numpy64(x))
    m.zero_grad()
    y = m(x)
    check(y, y_ref, fwd_tol, "forward")
    assert y.dtype == x.dtype and y.stride() == x.stride()
    if path is not None:
        name = y.grad_fn.name()  # the variants' own C++ Functions, or not
        assert ("GroupedTrain" in name or "ABNTrain" in name) == (path == "kernels"), name
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    y.backward(dy)
    actual = (x.grad, m.weight.grad, m.bias.grad)
    for name, a, e in zip(("dx", "dgamma", "dbeta"), actual, backward_ref(numpy64(dy), cache),
                          strict=True):
        check(a, e, grad_tol, name)
    return cache


PATHS = ["kernels", "aten"]  # the variants' fused CPU kernels, or their ATen implementations


def select_path(monkeypatch, path: str) -> None:
    """Run the variants (and core BN) through ATen operations for ``path="aten"``."""
    if path == "aten":
        monkeypatch.setenv("BATCHNORM_CPU_KERNELS", "0")


def check_fold_and_recalibrate(layer: nn.Module, fold: bool = True):
    """Conv -> ``layer`` -> ReLU, trained a few steps: ``batchnorm.fold`` keeps the eval output,
    ``batchnorm.recalibrate`` sets the population statistics of the reference (Algorithm 2).
    Returns the (eval-mode, recalibrated) model and an input."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), layer, nn.ReLU()).double()
    randomize(layer, torch.Generator().manual_seed(2))
    batches = [torch.randn(6, 2, 5, 5, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    for x in batches:
        model(x)
    model.eval()
    x = batches[0]
    if fold:
        folded = batchnorm.fold(model)
        assert isinstance(folded[1], nn.Identity)
        assert rel_err(folded(x), model(x)) < 1e-13
    batchnorm.recalibrate(model, batches, progress=False)
    with torch.no_grad():
        stats = [bn_ref.batch_statistics(model[0](b).numpy()) for b in batches]
    mean, var = bn_ref.population_statistics(*zip(*stats, strict=True))
    check(layer.running_mean, mean, 1e-13, "population mean")
    check(layer.running_var, var, 1e-13, "population variance")
    return model, x


def module_class(prefix: str, rank: int):
    return getattr(variants, f"{prefix}{rank}d")


CONSTRUCTORS = {
    "renorm": lambda rank, c: module_class("BatchRenorm", rank)(c, r_max=2.0, d_max=1.0),
    "ghost": lambda rank, c: module_class("GhostBatchNorm", rank)(c, ghost_batch_size=2),
    "inplace_abn": lambda rank, c: module_class("InPlaceABN", rank)(c),
}
TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("variant", sorted(CONSTRUCTORS))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_drop_in_for_torch_batchnorm(variant, rank):
    """isinstance, parameters, buffers and state_dict keys as torch.nn.BatchNorm*d, both ways."""
    ours = CONSTRUCTORS[variant](rank, 4)
    theirs = TORCH[rank](4)
    assert isinstance(ours, TORCH[rank])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(randomize(theirs, torch.Generator().manual_seed(0)).state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]


def test_package_exports():
    for name in variants.__all__:
        assert getattr(variants, name) is not None, name


@pytest.mark.parametrize("variant", sorted(CONSTRUCTORS))
def test_bfloat16_runs_on_the_aten_path(variant):
    """The fused kernels take float32/float64 only; bfloat16 goes through ATen, computed in
    float32: outputs and gradients agree with float32 to bfloat16's precision."""
    gen = torch.Generator().manual_seed(0)
    m32 = randomize(CONSTRUCTORS[variant](2, 4), gen)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(6, 4, 3, 3, generator=gen)
    dy = torch.randn(x.shape, generator=gen)  # (not constant: BN's dx of a sum is 0)
    outs = []
    for m, xi in ((m32, x.clone()), (m16, x.to(torch.bfloat16))):
        xi.requires_grad_()
        y = m(xi)
        y.backward(dy.to(y.dtype))
        assert y.dtype == xi.dtype
        if xi.dtype == torch.bfloat16:
            assert "GroupedTrain" not in y.grad_fn.name() and "ABNTrain" not in y.grad_fn.name()
        outs.append((y, xi.grad, m.weight.grad))
    for a, b in zip(*outs, strict=True):
        assert rel_err(b, a) < 3e-2


@pytest.mark.parametrize("variant", sorted(CONSTRUCTORS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernels_accurate_with_a_large_offset_and_deterministic(variant, layout):
    """float32 data with mean 1e4 and std 1: the one-pass statistics (shifted by a value of the
    same channel) lose nothing; and the results do not depend on the number of threads."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, 5, 5, generator=gen, dtype=torch.float64) + 1e4
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x32 = x.float().contiguous(memory_format=fmt)
    expected = None
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m = CONSTRUCTORS[variant](2, 4)
            xi = x32.clone().requires_grad_()
            y = m(xi)
            y.backward(torch.cos(y.detach()))
            results = (y, xi.grad, m.weight.grad, m.running_var)
            if expected is None:
                expected = results
                m64 = CONSTRUCTORS[variant](2, 4).double()
                assert rel_err(y, m64(x32.double())) < 5e-7  # the same (rounded) input
            else:
                assert all(torch.equal(a, b) for a, b in zip(results, expected, strict=True))
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The core package and its tools with the variants


def test_bn_modules_take_ghost_batch_size():
    a = batchnorm.BatchNorm2d(3, ghost_batch_size=4, momentum=None, dtype=torch.float64)
    b = variants.GhostBatchNorm2d(3, ghost_batch_size=4, momentum=None, dtype=torch.float64)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        (ya * ya).sum().backward()
        (yb * yb).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.running_var, b.running_var) and int(a.num_batches_tracked) == 4
    assert repr(a).count("ghost_batch_size=4") == repr(b).count("ghost_batch_size=4") == 1
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_fold_uses_fold_parts():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), variants.FrozenBatchNorm2d(3)).double().eval()
    assert batchnorm.fold(conv, report=True)[1].folded
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=gen)
    layers = [variants.InPlaceABN2d(3, negative_slope=0.2),
              variants.InPlaceABN2d(3, activation="elu", alpha=0.5),
              batchnorm.BatchNorm2d(3, activation="relu")]
    for bn in layers:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), randomize(bn, gen, signed=True)).double()
        for _ in range(3):
            model(torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=gen))
        model.eval()
        for m in (model, variants.freeze(copy.deepcopy(model))):
            folded, report = batchnorm.fold(m, report=True)
            assert report.folded == [("0", "1")], report
            assert rel_err(folded(x), m(x)) < 1e-12
    linear = variants.freeze(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double().eval())
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    assert rel_err(batchnorm.fold(linear)(x), linear(x)) < 1e-12


def test_convert_to_renorm_and_sync():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3),
                          variants.GhostBatchNorm2d(3, ghost_batch_size=2),
                          variants.InPlaceABN2d(3))
    weight = model[1].weight
    model = batchnorm.convert(model, to="renorm", r_max=2.0, d_max=1.0)
    assert type(model[1]) is variants.BatchRenorm2d and model[1].weight is weight
    # convert(sync=True) knows plain BN only: it leaves every variant as it is and says why;
    # a synchronized renorm layer is built from the renorm layer itself
    synced, report = batchnorm.convert(model, sync=True, report=True)
    assert [type(m) for m in synced[1:]] == [variants.BatchRenorm2d, variants.GhostBatchNorm2d,
                                           variants.InPlaceABN2d]
    assert [name for name, _ in report.skipped] == ["1", "2", "3"]
    sync = batchnorm.SyncBatchRenorm.from_batchnorm(model[1])
    assert sync.r_max == 2.0 and sync.weight is weight
    with pytest.raises(ValueError, match="renorm"):
        batchnorm.convert(model, to="renorm", sync=True)


@pytest.mark.parametrize("tool", ["jit.trace", "compile", "export"])
def test_kernels_stay_out_of_graph_tools(tool):
    """Under a tracer, compiler or exporter the variants' fused C++ kernels (raw-pointer writes
    a graph cannot see) step aside for their ATen forms: the graph computes what eager does."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 3, 5, 5, generator=gen)
    frozen = variants.FrozenBatchNorm2d(3)
    for buffer in frozen.buffers():
        buffer.copy_(torch.rand(3, generator=gen) + 0.5)
    for layer in (variants.GhostBatchNorm2d(3, ghost_batch_size=4), variants.InPlaceABN2d(3),
                  frozen):
        expected = copy.deepcopy(layer)(x)
        model = copy.deepcopy(layer)
        if tool == "jit.trace":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = torch.jit.trace(copy.deepcopy(layer), x)(x)
        elif tool == "compile":
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        else:
            got = torch.export.export(model, (x,)).module()(x)
        assert rel_err(got, expected) < 1e-5, (type(layer).__name__, tool)
    if tool == "jit.trace":  # the frozen map is recorded, not baked in as a constant
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(frozen, x)
        assert rel_err(traced(2 * x), frozen(2 * x)) < 1e-6
