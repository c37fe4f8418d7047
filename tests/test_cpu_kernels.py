"""The fused CPU kernels (batchnorm.cpu) against float64 torch.nn, and their fallback.

The kernels run whenever a float32/float64 CPU tensor goes through the torch backend, so the
module and functional tests exercise them too; these tests aim at what is specific to them:
layouts and their views, gradients in another layout than the input, the large-offset case,
and what happens when they are disabled or cannot be compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from batchnorm import cpu
from batchnorm.autograd import BatchNormFunction, training_batch_norm

needs_kernels = pytest.mark.skipif(cpu.extension() is None,
                                   reason="the C++ kernels could not be compiled here")

SHAPES = [  # (shape, memory format)
    ((60, 100), None), ((7, 5, 9), None), ((4, 6, 5, 3), None),
    ((4, 6, 5, 3), torch.channels_last), ((2, 3, 4, 5, 6), torch.channels_last_3d),
    ((3, 1, 4, 4), None), ((5, 4, 1, 1), torch.channels_last), ((2, 3, 70), None),
]


def _inputs(shape, fmt, dtype, rng, offset):
    x = (torch.randn(shape, generator=rng, dtype=torch.float64) * 3 + offset).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    c = shape[1]
    w = (torch.rand(c, generator=rng, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=rng, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=rng, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _reference(x, w, b, dy, momentum, eps):
    """float64 torch.nn.functional on the same values: outputs, gradients, running stats."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    rm = torch.zeros(x.shape[1], dtype=torch.float64)
    rv = torch.ones(x.shape[1], dtype=torch.float64)
    y = F.batch_norm(xr, rm, rv, wr, br, True, momentum, eps)
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad, br.grad, rm, rv


@needs_kernels
@pytest.mark.parametrize("dtype, offset, tol", [(torch.float64, 100.0, 1e-12),
                                                (torch.float32, 0.0, 2e-6),
                                                (torch.float32, 1e4, 2e-6)])
@pytest.mark.parametrize("shape, fmt", SHAPES)
def test_kernels_match_float64_reference(shape, fmt, dtype, offset, tol, rng):
    x, w, b, dy = _inputs(shape, fmt, dtype, rng, offset)
    rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    y = training_batch_norm(xg, wg, bg, rm, rv, 0.3, 1e-5)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref = _reference(x, w, b, dy, 0.3, 1e-5)
    assert y.stride() == x.stride() and xg.grad.stride() == x.stride()  # layout kept
    for name, ours, ref in [("y", y, y_ref), ("dx", xg.grad, dx_ref), ("dgamma", wg.grad, dw_ref),
                            ("dbeta", bg.grad, db_ref), ("running_mean", rm, rm_ref),
                            ("running_var", rv, rv_ref)]:
        assert rel_err(ours, ref) < tol, name


@needs_kernels
def test_gradient_in_another_layout_and_expanded(rng):
    x, w, b, _ = _inputs((4, 6, 5, 3), torch.channels_last, torch.float32, rng, 2.0)
    xg = x.clone().requires_grad_()
    training_batch_norm(xg, w, b, None, None, 0.1, 1e-5).sum().backward()  # expanded dy
    # sum(y) = m * sum(beta) whatever x is, so its gradient is 0 up to rounding
    assert xg.grad.abs().max() < 1e-5 and xg.grad.stride() == x.stride()
    xr = x.double().requires_grad_()
    dy = torch.randn(x.shape, generator=rng)  # contiguous while x is channels_last
    xg.grad = None
    training_batch_norm(xg, w, b, None, None, 0.1, 1e-5).backward(dy)
    xr.grad = None
    F.batch_norm(xr, None, None, w.double(), b.double(), True).backward(dy.double())
    assert rel_err(xg.grad, xr.grad) < 2e-6


@needs_kernels
def test_parameter_gradients_without_input_gradient(rng):
    x, w, b, dy = _inputs((8, 5, 3), None, torch.float32, rng, 1.0)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    training_batch_norm(x, wg, bg, None, None, 0.1, 1e-5).backward(dy)
    _, _, dw_ref, db_ref, _, _ = _reference(x, w, b, dy, 0.1, 1e-5)
    assert rel_err(wg.grad, dw_ref) < 2e-6 and rel_err(bg.grad, db_ref) < 2e-6


def _fresh_state(monkeypatch):
    monkeypatch.setattr(cpu, "_state", {"module": None, "failed": False})


def test_disabled_by_environment_uses_aten_path(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    assert cpu.extension() is None
    x, w, b, dy = _inputs((6, 4, 3), None, torch.float32, rng, 1e4)
    assert cpu.train(x, w, b, None, None, 0.1, 1e-5) is None
    xg = x.clone().requires_grad_()
    training_batch_norm(xg, w, b, None, None, 0.1, 1e-5).backward(dy)
    _, dx_ref, _, _, _, _ = _reference(x, w, b, dy, 0.1, 1e-5)
    assert rel_err(xg.grad, dx_ref) < 1e-4


def test_compile_failure_warns_once_and_falls_back(monkeypatch, rng):
    _fresh_state(monkeypatch)
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp, "load", broken)
    with pytest.warns(RuntimeWarning, match="could not be compiled .*no compiler here"):
        assert cpu.extension() is None
    assert cpu.extension() is None  # remembered: no second attempt, no second warning
    x, w, b, _ = _inputs((6, 4), None, torch.float64, rng, 0.0)
    y = training_batch_norm(x, w, b, None, None, 0.1, 1e-5)
    assert rel_err(y, F.batch_norm(x, None, None, w, b, True)) < 1e-12


def test_other_dtypes_are_not_taken(rng):
    x = torch.randn(4, 3, generator=rng).to(torch.bfloat16)
    assert cpu.train(x, None, None, None, None, 0.1, 1e-5) is None


@needs_kernels
def test_running_statistics_of_another_dtype(rng):
    """float64 input with float32 running buffers takes the kernel's generic update."""
    x, w, b, dy = _inputs((9, 4, 5), None, torch.float64, rng, 3.0)
    rm, rv = torch.zeros(4), torch.ones(4)
    training_batch_norm(x, w, b, rm, rv, 0.25, 1e-5)
    _, _, _, _, rm_ref, rv_ref = _reference(x, w, b, dy, 0.25, 1e-5)
    assert rm.dtype == torch.float32
    assert rel_err(rm, rm_ref) < 1e-6 and rel_err(rv, rv_ref) < 1e-6


@needs_kernels
@pytest.mark.parametrize("with_weight, with_bias", [(False, True), (True, False), (False, False)])
def test_gradients_of_the_arguments_given(with_weight, with_bias, rng):
    """The C++ Function numbers its gradients by the tensors actually passed."""
    x, w, b, dy = _inputs((6, 4, 5), None, torch.float64, rng, 1.0)
    w = w.requires_grad_() if with_weight else None
    b = b.requires_grad_() if with_bias else None
    xg = x.clone().requires_grad_()
    training_batch_norm(xg, w, b, None, None, 0.1, 1e-5).backward(dy)
    xr = x.clone().requires_grad_()
    wr = w.detach().clone().requires_grad_() if with_weight else None
    br = b.detach().clone().requires_grad_() if with_bias else None
    F.batch_norm(xr, None, None, wr, br, True).backward(dy)
    assert rel_err(xg.grad, xr.grad) < 1e-12
    if with_weight:
        assert rel_err(w.grad, wr.grad) < 1e-12
    if with_bias:
        assert rel_err(b.grad, br.grad) < 1e-12


@needs_kernels
@pytest.mark.parametrize("shape, fmt", [((2000, 70), None), ((40, 8, 30, 30), torch.channels_last),
                                        ((4, 6, 9000), None)])  # large enough to be split
def test_results_do_not_depend_on_the_thread_count(shape, fmt, rng):
    x, w, b, dy = _inputs(shape, fmt, torch.float32, rng, 5.0)
    results = []
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xg = x.clone().requires_grad_()
            rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
            y = training_batch_norm(xg, w, b, rm, rv, 0.1, 1e-5)
            y.backward(dy)
        finally:
            torch.set_num_threads(previous)
        results.append((y, xg.grad, rm, rv))
    for other in results[1:]:
        for first, again in zip(results[0], other, strict=True):
            assert torch.equal(first, again)


def test_aten_path_gradgradcheck(rng):
    """Double backward of the ATen Function (the C++ one is checked in test_functional)."""
    x, w, b, _ = _inputs((5, 3, 4), None, torch.float64, rng, 1.0)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        return BatchNormFunction.apply(x, w, b, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
