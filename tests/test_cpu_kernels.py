"""The fused CPU kernels (batchnorm.cpu) against float64 torch.nn, and their fallback.

The kernels run whenever a float32/float64 CPU tensor goes through the torch backend, so the
module and functional tests exercise them too; these tests aim at what is specific to them:
layouts and their views (runs shorter and longer than a vector, a group, a prefetch), gradients
in another layout than the input, the large-offset case and data whose first values are far
from the rest (the one-read statistics shift by them), the eval kernel against the ATen path,
and what happens when they are disabled or cannot be compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from batchnorm import cpu
from batchnorm.backends.torch_backend import (
    BatchNormFunction,
    _affine,
    _scale_shift,
    training_batch_norm,
)

needs_kernels = pytest.mark.skipif(cpu.extension() is None,
                                   reason="the C++ kernels could not be compiled here")

SHAPES = [  # (shape, memory format)
    ((60, 100), None), ((7, 5, 9), None), ((4, 6, 5, 3), None),
    ((4, 6, 5, 3), torch.channels_last), ((2, 3, 4, 5, 6), torch.channels_last_3d),
    ((3, 1, 4, 4), None), ((5, 4, 1, 1), torch.channels_last), ((2, 3, 70), None),
    ((9, 4, 7, 7), None), ((3, 2, 1100), None), ((70, 13, 2, 3), torch.channels_last),
    ((300, 3), None), ((2, 5, 3), None),
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
    assert cpu.infer(x, w, b, torch.zeros(4), torch.ones(4), 1e-5) is None
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
    assert cpu.infer(x, None, None, torch.zeros(3), torch.ones(3), 1e-5) is None


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
                                        ((4, 6, 9000), None), ((64, 40, 7, 7), None),
                                        ((2, 3, 70000), None)])  # large enough to be split
def test_results_do_not_depend_on_the_thread_count(shape, fmt, rng):
    x, w, b, dy = _inputs(shape, fmt, torch.float32, rng, 5.0)
    results = []
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
            rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
            y = training_batch_norm(xg, wg, bg, rm, rv, 0.1, 1e-5)
            y.backward(dy)
            y_eval = cpu.infer(x, w, b, rm, rv, 1e-5)
        finally:
            torch.set_num_threads(previous)
        results.append((y, xg.grad, wg.grad, bg.grad, rm, rv, y_eval))
    for other in results[1:]:
        for first, again in zip(results[0], other, strict=True):
            assert torch.equal(first, again)


@needs_kernels
@pytest.mark.parametrize("layout", ["first value far out", "offset per sample", "sorted"])
@pytest.mark.parametrize("shape, fmt", [((64, 6, 9, 9), None), ((64, 6, 9, 9), torch.channels_last),
                                        ((4000, 5), None), ((8, 3, 3000), None)])
def test_statistics_of_uneven_data(layout, shape, fmt, rng):
    """The one-read statistics sum float values shifted by an origin (a channel's first values)
    and by each group's predecessor; data that defeats a fixed shift still matches float64."""
    x = torch.randn(shape, generator=rng, dtype=torch.float64) * 0.01 + 300.0
    if layout == "first value far out":
        # each channel's first value alone is far out: it dominates the variance, and a sum
        # of squares shifted by it would lose ~log10(m) digits
        x[(0, slice(None), *[0] * (len(shape) - 2))] += 1e3
    elif layout == "offset per sample":
        x += torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=rng,
                         dtype=torch.float64) * 50
    else:
        x = x.flatten().sort().values.reshape(shape)
    x = x.float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    _, w, b, dy = _inputs(shape, None, torch.float32, rng, 0.0)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    xg = x.clone().requires_grad_()
    y = training_batch_norm(xg, w, b, rm, rv, 1.0, 1e-5)
    y.backward(dy)
    y_ref, dx_ref, _, _, rm_ref, rv_ref = _reference(x, w, b, dy, 1.0, 1e-5)
    assert rel_err(y, y_ref) < 2e-6 and rel_err(xg.grad, dx_ref) < 2e-5
    assert rel_err(rm, rm_ref) < 1e-7 and rel_err(rv, rv_ref) < 2e-6


def _poison(like: torch.Tensor) -> None:
    """Fill and free a tensor of ``like``'s size, so that the allocator likely hands the kernel
    NaN-filled memory for its output: an element the kernel does not write stays NaN."""
    torch.full(like.shape, float("nan"), dtype=like.dtype).contiguous()


def _aten_eval(x, w, b, rm, rv, eps):
    """The torch backend's ATen eval path, what the eval kernel must reproduce."""
    invstd = torch.rsqrt(rv.to(x.dtype) + eps)
    scale, shift = _scale_shift(rm.to(x.dtype), invstd, w, b)
    return _affine(x, shift, scale)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, fmt", SHAPES)
def test_eval_kernel_matches_the_aten_path(shape, fmt, dtype, affine, rng):
    """Eval: the same bits as the ATen formula, the input's layout, every element written."""
    x, w, b, _ = _inputs(shape, fmt, dtype, rng, 3.0)
    if not affine:
        w = b = None
    rm = torch.randn(shape[1], generator=rng, dtype=torch.float64).to(dtype)
    rv = (torch.rand(shape[1], generator=rng, dtype=torch.float64) + 0.2).to(dtype)
    _poison(x)
    y = cpu.infer(x, w, b, rm, rv, 1e-3)
    assert y.stride() == x.stride() and not y.isnan().any()
    assert torch.equal(y, _aten_eval(x, w, b, rm, rv, 1e-3))
    xr, wr, br = (None if t is None else t.double() for t in (x, w, b))
    expected = F.batch_norm(xr, rm.double(), rv.double(), wr, br, False, 0.1, 1e-3)
    assert rel_err(y, expected) < (1e-15 if dtype == torch.float64 else 1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, fmt", SHAPES)
def test_fixed_affine_kernel(shape, fmt, dtype, rng):
    """Frozen BN's map: y = x * scale + shift and dx = dy * scale, each one pass in the input's
    layout with every element written, against float64; scale and shift in float64 are cast to
    x's dtype first, as the ATen form (``addcmul``) does."""
    x, _, _, dy = _inputs(shape, fmt, dtype, rng, 3.0)
    scale, shift = (torch.randn(shape[1], generator=rng, dtype=torch.float64) for _ in "ab")
    view = (1, -1, *([1] * (x.dim() - 2)))
    a, s = scale.to(dtype).double().view(view), shift.to(dtype).double().view(view)
    xg = x.clone().requires_grad_()
    _poison(x)
    y = cpu.fixed_affine(xg, scale, shift)
    assert y.grad_fn.name().endswith("FixedAffine>")
    _poison(x)
    y.backward(dy)
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    for got, expected in ((y, x.double() * a + s), (xg.grad, dy.double() * a)):
        assert got.dtype == dtype and got.stride() == x.stride() and not got.isnan().any()
        assert rel_err(got, expected) < tol
    with torch.no_grad():
        assert torch.equal(cpu.fixed_affine(x, scale, shift), y.detach())


@needs_kernels
def test_fixed_affine_steps_aside(rng):
    """None (the caller's ATen form) when scale or shift need a gradient or do not have one
    value per channel, for an empty input, and under a torch.func transform."""
    x, w, b, _ = _inputs((4, 3, 5), None, torch.float32, rng, 0.0)
    assert cpu.fixed_affine(x, w.clone().requires_grad_(), b) is None
    assert cpu.fixed_affine(x, w, b.clone().requires_grad_()) is None
    assert cpu.fixed_affine(x, w[:2], b) is None and cpu.fixed_affine(x, w, b[None]) is None
    assert cpu.fixed_affine(x[:0], w, b) is None
    seen = []
    torch.func.vmap(lambda t: seen.append(cpu.fixed_affine(t, w, b)) or t)(x[None])
    assert seen == [None]


@needs_kernels
def test_eval_kernel_with_buffers_of_another_dtype(rng):
    x, w, b, _ = _inputs((5, 4, 3), None, torch.float64, rng, 1.0)
    w, b, rm, rv = (t.float() for t in (w, b, torch.randn(4, generator=rng),
                                        torch.rand(4, generator=rng) + 0.5))
    assert torch.equal(cpu.infer(x, w, b, rm, rv, 1e-5),
                       _aten_eval(x, w.double(), b.double(), rm.double(), rv.double(), 1e-5))


@needs_kernels
@pytest.mark.parametrize("shape, fmt", [((5, 3, 4), None), ((3, 4, 2, 3), torch.channels_last),
                                        ((6, 3), None)])
def test_eval_kernel_gradients(shape, fmt, rng):
    """With x, weight or bias requiring a gradient, eval is a differentiable Function: first and
    second derivatives match finite differences (float64)."""
    x, w, b, _ = _inputs(shape, fmt, torch.float64, rng, 1.0)
    rm = torch.randn(shape[1], generator=rng, dtype=torch.float64)
    rv = torch.rand(shape[1], generator=rng, dtype=torch.float64) + 0.5
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        return cpu.infer(x, w, b, rm, rv, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    # only some arguments requiring a gradient, float32
    xf, wf = x.float().requires_grad_(), w.float()
    y = cpu.infer(xf, wf, None, rm.float(), rv.float(), 1e-5)
    y.backward(torch.ones_like(y))
    assert rel_err(xf.grad, (wf * (rv.float() + 1e-5).rsqrt()).reshape(1, -1, *[1] * (
        len(shape) - 2)).expand(shape)) < 1e-6


@needs_kernels
def test_eval_kernel_leaves_running_statistics_with_gradients_to_aten(rng):
    x, w, b, _ = _inputs((4, 3, 2), None, torch.float32, rng, 1.0)
    rm = torch.zeros(3, requires_grad=True)
    assert cpu.infer(x, w, b, rm, torch.ones(3), 1e-5) is None
    with torch.no_grad():
        assert cpu.infer(x, w, b, rm, torch.ones(3), 1e-5) is not None


class _Subclass(torch.Tensor):
    """A tensor subclass that does nothing: the kernels must still leave it to ATen."""


def _outside_plain_eager(call):
    """``call(x, w, b)`` (returning what the extension returned) under each tool that must see
    the operations; the list of results."""
    from torch.autograd import forward_ad
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, w, b = torch.randn(4, 3, 5), torch.rand(3) + 0.5, torch.randn(3)
    seen = []
    with forward_ad.dual_level():
        seen.append(call(forward_ad.make_dual(x, torch.ones_like(x)), w, b))

    def record(x):
        seen.append(call(x, w, b))
        return x

    torch.func.vmap(record)(x.unsqueeze(0).expand(2, *x.shape))
    torch.func.grad(lambda x: record(x).sum())(x)
    torch.jit.trace(record, x, check_trace=False)
    with Passthrough():
        seen.append(call(x, w, b))
    return seen


@needs_kernels
def test_the_extension_steps_aside_outside_plain_eager():
    """The C++ entry points themselves (not only the Python seam in front of them) return None
    under forward-mode AD, vmap, grad, jit.trace and a dispatch mode, for training and eval
    alike; in plain eager mode they take the call."""
    ext = cpu.extension()
    stats = torch.zeros(3), torch.ones(3)
    train_results = _outside_plain_eager(
        lambda x, w, b: ext.train(x, w, b, None, None, 0.1, 1e-5))
    eval_results = _outside_plain_eager(lambda x, w, b: ext.infer(x, w, b, *stats, 1e-5))
    assert len(train_results) == len(eval_results) == 5
    assert all(r is None for r in train_results + eval_results)
    x = torch.randn(4, 3, 5)
    assert ext.train(x, None, None, None, None, 0.1, 1e-5) is not None
    assert ext.infer(x, None, None, *stats, 1e-5) is not None


@pytest.mark.parametrize("training", [True, False])
def test_tensor_subclasses_take_the_aten_path(training):
    """A subclass with __torch_function__ only is unwrapped on its way into C++, so the check
    is the seam's (batchnorm.backends.plain_eager): the ATen operations keep the subclass."""
    import batchnorm

    x = torch.randn(4, 3, 5).as_subclass(_Subclass)
    y = batchnorm.batch_norm(x, torch.zeros(3), torch.ones(3), torch.rand(3), torch.randn(3),
                             training=training)
    assert type(y) is _Subclass


@needs_kernels
@pytest.mark.parametrize("shape, fmt", [((3, 5, 1000, 283), None),  # 17 MB, runs of 283000
                                        ((64, 13, 80, 80), torch.channels_last)])  # rows of 13
def test_large_outputs(shape, fmt, rng):
    """From 16 MB on, y and dx are written with streaming stores (from a 32-byte boundary on,
    the values before it and after the last full vector are stored one by one); from 4 MB on,
    the channels-last reductions prefetch rows ahead, up to the last ones."""
    x, w, b, dy = _inputs(shape, fmt, torch.float32, rng, 2.0)
    xg = x.clone().requires_grad_()
    y = training_batch_norm(xg, w, b, None, None, 0.1, 1e-5)
    y.backward(dy)
    y_ref, dx_ref, _, _, _, _ = _reference(x, w, b, dy, 0.1, 1e-5)
    assert y.stride() == x.stride() and xg.grad.stride() == x.stride()
    assert rel_err(y, y_ref) < 2e-6 and rel_err(xg.grad, dx_ref) < 2e-5


@needs_kernels
@pytest.mark.parametrize("shape, fmt", SHAPES[:6])
def test_training_outputs_are_fully_written(shape, fmt, rng):
    x, w, b, dy = _inputs(shape, fmt, torch.float32, rng, 1.0)
    xg = x.clone().requires_grad_()
    _poison(x)
    y = training_batch_norm(xg, w, b, None, None, 0.1, 1e-5)
    _poison(x)
    y.backward(dy)
    assert not y.isnan().any() and not xg.grad.isnan().any()


def test_aten_path_gradgradcheck(rng):
    """Double backward of the ATen Function (the C++ one is checked in test_functional)."""
    x, w, b, _ = _inputs((5, 3, 4), None, torch.float64, rng, 1.0)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        return BatchNormFunction.apply(x, w, b, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
