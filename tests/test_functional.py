"""batchnorm.functional.batch_norm and the torch backend's closed-form autograd Function."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from batchnorm import backends
from batchnorm import reference as ref
from batchnorm.activations import ACTIVATIONS
from batchnorm.functional import batch_norm

SHAPES = [(9, 4), (5, 3, 7), (4, 3, 5, 6), (2, 2, 3, 4, 3), (13, 1), (3, 5, 1, 1)]


def _inputs(shape, rng, dtype=torch.float64, offset=0.0):
    c = shape[1]
    x = (offset + 2.0 * torch.randn(shape, generator=rng, dtype=torch.float64)).to(dtype)
    w = torch.rand(c, generator=rng, dtype=torch.float64).add(0.5).to(dtype)
    b = torch.randn(c, generator=rng, dtype=torch.float64).to(dtype)
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
def test_training_forward_backward_match_reference(shape, rng):
    x, w, b = _inputs(shape, rng)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    dy = torch.randn(shape, generator=rng, dtype=torch.float64)
    y.backward(dy)
    y_ref, cache = ref.batch_norm_forward(x.detach().numpy(), w.detach().numpy(),
                                          b.detach().numpy(), 1e-5)
    grads = ref.batch_norm_backward(dy.numpy(), cache)
    assert rel_err(y.detach(), torch.from_numpy(y_ref)) < 1e-12
    assert rel_err(x.grad, torch.from_numpy(grads.dx)) < 1e-10
    assert rel_err(w.grad, torch.from_numpy(grads.dgamma)) < 1e-12
    assert rel_err(b.grad, torch.from_numpy(grads.dbeta)) < 1e-12


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine, rng):
    x, w, b = _inputs(shape, rng)
    inputs = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()) if affine else (
        x.requires_grad_(),)

    def f(x, w=None, b=None):
        return batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_through_activation_and_residual(rng):
    x, w, b = _inputs((5, 3, 4), rng)
    z = torch.randn(5, 3, 4, generator=rng, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, w, b, z))

    def f(x, w, b, z):
        return batch_norm(x, None, None, w, b, training=True, activation="silu", residual=z)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_fused_epilogue_equals_composition(activation, with_residual, training, rng):
    x, w, b = _inputs((4, 3, 5, 2), rng)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    z = torch.randn(x.shape, generator=rng, dtype=torch.float64) if with_residual else None
    ours = batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=activation,
                      residual=z)
    expected = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    if z is not None:
        expected = expected + z
    if activation is not None:
        expected = getattr(F, activation)(expected)
    assert rel_err(ours, expected) < 1e-12


def test_running_stats_update_matches_torch(rng):
    x, w, b = _inputs((10, 4, 3), rng)
    ours = (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)
    theirs = tuple(t.clone() for t in ours)
    for momentum in (0.1, 0.7, 1.0, 0.0):
        batch_norm(x, *ours, w, b, True, momentum)
        F.batch_norm(x, *theirs, w, b, True, momentum)
        assert rel_err(ours[0], theirs[0]) < 1e-13
        assert rel_err(ours[1], theirs[1]) < 1e-13


def test_channels_last_is_kept_and_correct(rng):
    x, w, b = _inputs((3, 4, 5, 6), rng, dtype=torch.float32)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    y = batch_norm(x_cl, None, None, w, b, training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = F.batch_norm(x.double(), None, None, w.double(), b.double(), True)
    assert rel_err(y, expected) < 1e-6


def test_large_offset_variance_is_accurate():
    """float32 values 1e4 + N(0, 1): the variance to 1e-4 relative (no E[x^2] - E[x]^2)."""
    g = torch.Generator().manual_seed(7)
    for shape in [(4096, 3), (64, 2, 16, 16)]:
        x = (1e4 + torch.randn(shape, generator=g)).float()
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        batch_norm(x, rm, rv, training=True, momentum=1.0)
        expected = np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, shape[1]).var(0, ddof=1)
        assert np.max(np.abs(rv.double().numpy() / expected - 1)) < 1e-4
        y = batch_norm(x, None, None, training=True)
        # normalized output has unit variance per channel
        assert torch.allclose(y.double().transpose(0, 1).reshape(shape[1], -1).var(1, False),
                              torch.ones(shape[1], dtype=torch.float64), rtol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_computes_in_float32(dtype, tol, rng):
    x, w, b = _inputs((8, 3, 4, 4), rng, dtype=torch.float32, offset=3.0)
    xh = x.to(dtype).requires_grad_()
    y = batch_norm(xh, None, None, w, b, training=True)
    assert y.dtype == dtype
    y.backward(torch.ones_like(y))
    expected = F.batch_norm(xh.detach().double(), None, None, w.double(), b.double(), True)
    assert rel_err(y, expected) < tol
    assert xh.grad.dtype == dtype


def test_nan_stays_in_its_channel():
    x = torch.randn(6, 3, 4)
    x[2, 1, 3] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, training=True)
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(y[:, [0, 2]]).all()
    assert torch.isnan(rm[1]) and torch.isfinite(rm[[0, 2]]).all()


def test_inf_makes_its_channel_nan():
    x = torch.randn(6, 2)
    x[0, 0] = float("inf")
    y = batch_norm(x, None, None, training=True)
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all()


# ---------------------------------------------------------------- bad input


def _call(**overrides):
    args = dict(input=torch.randn(4, 3, 2), running_mean=torch.zeros(3),
                running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3),
                training=True, momentum=0.1, eps=1e-5)
    args.update(overrides)
    return batch_norm(**args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(input=torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
    (dict(input=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(input=torch.randn(4, 5, 2)), ValueError,
     "running_mean must have shape \\(5,\\) to match the 5 channels"),
    (dict(input=torch.randn(4)), ValueError, "at least 2 dimensions"),
    (dict(input=torch.ones(4, 3, dtype=torch.int64)), TypeError, "floating point"),
    (dict(input=[1.0, 2.0]), TypeError, "input must be a torch.Tensor"),
    (dict(eps=0.0), ValueError, "eps must be positive"),  # torch's wording
    (dict(eps=-1e-5), ValueError, "eps must be positive"),
    (dict(momentum=1.5), ValueError, "momentum must be a number in \\[0, 1\\]"),
    (dict(momentum=-0.1), ValueError, "momentum must be a number in \\[0, 1\\]"),
    (dict(momentum=None), ValueError, "momentum must be a number"),
    (dict(running_mean=torch.zeros(3, device="meta")), ValueError, "same device"),
    (dict(running_var=None), ValueError, "both be None"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "required when"),
    (dict(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight must be floating"),
    (dict(activation="gelu"), ValueError, "activation must be None or one of"),
    (dict(residual=torch.randn(4, 3, 3)), ValueError, "residual must have input's shape"),
    (dict(residual=torch.randn(4, 3, 2, dtype=torch.float64)), TypeError, "residual must have"),
    (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("momentum", [1.5, -0.1, None])
def test_momentum_is_checked_only_where_it_is_used(momentum, rng):
    """Eval and training without running statistics ignore momentum (as torch does)."""
    x = torch.randn(4, 3, 2, generator=rng, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    expected = F.batch_norm(x, rm, rv, training=False)
    assert rel_err(batch_norm(x, rm, rv, training=False, momentum=momentum), expected) < 1e-12
    expected = F.batch_norm(x, None, None, training=True)
    assert rel_err(batch_norm(x, None, None, training=True, momentum=momentum), expected) < 1e-12
    with pytest.raises(ValueError, match="momentum must be a number in"):
        batch_norm(x, rm, rv, training=True, momentum=momentum)


def test_explicit_backend_never_falls_back_silently():
    reason = "only on Tuesdays"
    backends.register_backend(backends.Backend("picky", lambda *a: None, lambda *a: reason))
    with pytest.raises(NotImplementedError, match=reason):
        _call(backend="picky")
    assert backends.resolve("auto", torch.randn(2, 3), None, True, None, None).name == "torch"


# derandomize: CI must not fail on a case a previous run never saw; widen max_examples locally.
@settings(max_examples=30, deadline=None, derandomize=True)
@example(n=2, c=1, spatial=[], offset=426.0, scale=56.0, seed=0)  # m = 2: exact dx is 0
@given(n=st.integers(1, 6), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), max_size=2),
       offset=st.floats(-1e3, 1e3), scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference_on_random_shapes(n, c, spatial, offset, scale, seed):
    shape = (n, c, *spatial)
    assume(np.prod(shape) // c >= 2)
    g = torch.Generator().manual_seed(seed)
    x = offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    x.requires_grad_()
    y = batch_norm(x, None, None, w, b, training=True)
    y.backward(dy)
    y_ref, cache = ref.batch_norm_forward(x.detach().numpy(), w.numpy(), b.numpy())
    dx_ref = ref.batch_norm_backward(dy.numpy(), cache).dx
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-9, atol=1e-9)
    # dx's natural size is |dy| * gamma / sigma; for m = 2 the exact dx is 0 and both sides are
    # cancellation noise, so the absolute tolerance must follow that scale, not dx itself.
    sigma = x.detach().numpy().std(axis=tuple(i for i in range(x.dim()) if i != 1)).min()
    dx_scale = np.abs(dy.numpy()).max() * w.numpy().max() / sigma
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-7, atol=1e-9 * dx_scale)
