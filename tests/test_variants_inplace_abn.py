"""In-place activated BN against the float64 reference of Rota Bulo, Porzi & Kontschieder (2018),
section 3: the backward from the output alone, |gamma| + eps, exact gradients, memory."""

from __future__ import annotations

import numpy as np
import pytest
import test_variants_common as vc
import torch
import torch.nn.functional as F
from conftest import rel_err
from test_variants_common import KINDS, TOL, check, make_input, step_and_check
from torch import nn

import batchnorm
from batchnorm import reference as bn_ref
from batchnorm.variants import InPlaceABN1d, InPlaceABN2d, inplace_activated_batch_norm
from batchnorm.variants import reference as ref

ACTIVATIONS = [("leaky_relu", dict(negative_slope=0.1)), ("elu", dict(alpha=0.7)),
               ("identity", {})]
EPS = 1e-5


def _ref_args(options):
    return options.get("negative_slope", 0.01), options.get("alpha", 1.0)


@pytest.mark.parametrize("name,options", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_reference_recomputation_equals_the_chain_rule_through_x(name, options):
    """The paper's backward from z equals BN's backward (from x) through the activation."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(6, 3, 4))
    gamma = np.array([0.8, -1.2, 0.05])
    beta = rng.normal(size=3)
    slope, alpha = _ref_args(options)
    z, cache = ref.inplace_abn_forward(x, gamma, beta, EPS, name, slope, alpha)
    dz = rng.normal(size=x.shape)
    dx, dgamma, dbeta = ref.inplace_abn_backward(dz, cache)
    y, bn_cache = bn_ref.batch_norm_forward(x, np.abs(gamma) + EPS, beta, EPS)
    np.testing.assert_allclose(ref.activation_inverse(z, name, slope, alpha), y, rtol=1e-12,
                               atol=1e-12)
    dy = dz * np.where(y > 0, 1.0, {"leaky_relu": slope, "elu": alpha * np.exp(np.minimum(
        y, 0)), "identity": 1.0}[name])
    grads = bn_ref.batch_norm_backward(dy, bn_cache)
    np.testing.assert_allclose(dx, grads.dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, np.sign(gamma) * grads.dgamma, rtol=1e-10)
    np.testing.assert_allclose(dbeta, grads.dbeta, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name,options", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("path", vc.PATHS)
def test_module_matches_reference_over_steps(name, options, kind, dtype, path, monkeypatch,
                                             one_thread):
    vc.select_path(monkeypatch, path)
    rank, shape = KINDS[kind]
    gen = torch.Generator().manual_seed(len(kind) + len(name))
    fwd_tol = TOL[dtype][0]
    m = vc.randomize(vc.module_class("InPlaceABN", rank)(shape[1], momentum=0.3, activation=name,
                                                   dtype=dtype, **options), gen, signed=True)
    slope, alpha = _ref_args(options)
    for _ in range(2):
        x = make_input(kind, gen, dtype)
        mean, var = vc.numpy64(m.running_mean), vc.numpy64(m.running_var)
        step_and_check(m, x, lambda x64: ref.inplace_abn_forward(
            x64, vc.numpy64(m.weight), vc.numpy64(m.bias), m.eps, name, slope, alpha),
            ref.inplace_abn_backward, gen, TOL[dtype], path)
        mean, var = bn_ref.update_running_statistics(mean, var, x.detach().double().numpy(),
                                                     0.3, 1)
        check(m.running_mean, mean, fwd_tol, "running_mean")
        check(m.running_var, var, fwd_tol, "running_var")
    m.eval()  # inference: f((|gamma| + eps) (x - mean) / sqrt(var + eps) + beta)
    x = make_input(kind, gen, dtype)
    y = ref.frozen_batch_norm(x.double().numpy(), np.abs(m.weight.detach().double().numpy())
                              + m.eps, m.bias.detach().double().numpy(),
                              m.running_mean.double().numpy(), m.running_var.double().numpy(),
                              m.eps)
    check(m(x), ref.activation(y, name, slope, alpha), fwd_tol, "inference")
    scale, shift, act = m.fold_parts()
    view = (1, -1, *([1] * (x.dim() - 2)))
    folded = x.double() * scale.view(view) + shift.view(view)
    check(m(x), folded if act is None else act(folded), fwd_tol, "fold_parts")


@pytest.mark.parametrize("name,options", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
@pytest.mark.parametrize("path", vc.PATHS)
def test_gradcheck_and_gradgradcheck(name, options, path, monkeypatch):
    vc.select_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(4)
    x = make_input("2d", gen, shape=(4, 3, 2, 3)).requires_grad_()
    w = torch.tensor([0.7, -1.3, 0.9], dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x, w, b):
        return inplace_activated_batch_norm(x, None, None, w, b, True, activation=name, **options)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _saved_full_tensors(fn, x):
    """Distinct tensors of x's size that autograd saves for the backward of ``fn(x)``."""
    saved = {}

    def pack(t):
        if t.numel() == x.numel():
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x).sum().backward()
    return saved


@pytest.mark.parametrize("name", ["leaky_relu", "elu"])
@pytest.mark.parametrize("path", vc.PATHS)
def test_saves_one_tensor_where_bn_plus_activation_saves_two(name, path, monkeypatch):
    vc.select_path(monkeypatch, path)
    x = torch.randn(8, 16, 10, 10, requires_grad=True)
    act = {"leaky_relu": nn.LeakyReLU(0.01), "elu": nn.ELU()}[name]
    abn = _saved_full_tensors(InPlaceABN2d(16, activation=name), x)
    torch_pair = _saved_full_tensors(nn.Sequential(nn.BatchNorm2d(16), act), x)
    ours_pair = _saved_full_tensors(nn.Sequential(batchnorm.BatchNorm2d(16), act), x)
    assert len(abn) == 1 and sum(abn.values()) == x.numel() * 4
    assert len(torch_pair) == len(ours_pair) == 2


@pytest.mark.parametrize("path", vc.PATHS)
def test_inplace_overwrites_the_input_and_matches(path, monkeypatch):
    vc.select_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(5)
    base = make_input("2d-channels_last", gen).requires_grad_()
    w = torch.tensor([1.1, -0.4, 0.6, 0.9, -2.0, 0.3], dtype=torch.float64, requires_grad=True)
    outs = []
    for inplace in (False, True):
        x = base * 1.0  # a non-leaf the layer may overwrite
        z = inplace_activated_batch_norm(x, None, None, w, None, True, negative_slope=0.2,
                                         inplace=inplace)
        assert (z.data_ptr() == x.data_ptr()) == inplace
        z.backward(torch.cos(z.detach()))
        outs.append((z.detach().clone(), base.grad.clone(), w.grad.clone()))
        base.grad = w.grad = None
    for a, b in zip(*outs, strict=True):
        assert rel_err(a, b) < 1e-14
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        inplace_activated_batch_norm(base, None, None, w, None, True, inplace=True)


def test_elu_inverse_error_and_gradients():
    """ELU's inverse is exact but ill-conditioned for negative y: z = alpha (e^y - 1) carries y
    to about ulp(alpha) e^-y (float32: ~1e-5 at y = -5, ~0.2 at y = -15); the gradients of a
    layer whose outputs reach y ~ -11 still match the float64 reference to 1e-4."""
    y = torch.linspace(-15, 4, 2000)
    z = F.elu(y)
    back = torch.where(z > 0, z, torch.log1p(z.clamp(min=torch.finfo(z.dtype).eps - 1)))
    bound = 2 * torch.finfo(torch.float32).eps * torch.exp(-y).clamp(min=1) + 1e-6 * y.abs()
    assert torch.all((back - y).abs() <= bound)
    gen = torch.Generator().manual_seed(6)
    x = (5 * torch.randn(64, 4, generator=gen)).requires_grad_()
    w = torch.full((4,), 3.0, requires_grad=True)  # y reaches about -3 * 3 - 2
    z = inplace_activated_batch_norm(x, None, None, w, -2 * torch.ones(4), True, activation="elu")
    dz = torch.randn(z.shape, generator=gen)
    z.backward(dz)
    _, cache = ref.inplace_abn_forward(x.detach().double().numpy(), w.detach().double().numpy(),
                                       -2 * np.ones(4), EPS, "elu")
    dx, dgamma, _ = ref.inplace_abn_backward(dz.double().numpy(), cache)
    check(x.grad, dx, 1e-4, "dx")
    check(w.grad, dgamma, 1e-4, "dgamma")


def test_recalibrate():
    """recalibrate measures BN's input, as for plain BN. (batchnorm.fold needs the patch in the
    integration notes: it would fold the raw weight instead of |weight| + eps; fold_parts is
    tested above.)"""
    vc.check_fold_and_recalibrate(InPlaceABN2d(3, negative_slope=0.2), fold=False)


def test_bad_arguments_name_the_argument():
    for bad in ("relu", "sigmoid", "tanh", "silu"):
        with pytest.raises(ValueError, match=rf"activation='{bad}' is not invertible.*"
                                             r"'leaky_relu'"):
            InPlaceABN2d(4, activation=bad)
    with pytest.raises(ValueError, match=r"activation must be one of \('identity'"):
        InPlaceABN2d(4, activation="gelu")
    for bad in (0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match=r"negative_slope must be a finite number > 0"):
            InPlaceABN2d(4, negative_slope=bad)
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0"):
        InPlaceABN2d(4, activation="elu", alpha=0)
    with pytest.raises(ValueError, match=r"batch_norm: Expected more than 1 value per"):
        inplace_activated_batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match=r"InPlaceABN1d: expected 2D or 3D input"):
        InPlaceABN1d(3)(torch.randn(2, 3, 4, 5))
    assert "negative_slope=0.2" in repr(InPlaceABN2d(4, negative_slope=0.2))
