"""The NumPy reference against its own definition and against finite differences (float64)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm import reference as ref

SHAPES = [(7, 3), (16, 1), (4, 3, 5), (3, 4, 2, 3), (2, 3, 2, 2, 3)]


def _params(rng, c):
    return rng.uniform(0.5, 2.0, c), rng.normal(size=c)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_normalizes_each_channel(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=shape)
    y, cache = ref.batch_norm_forward(x, np.ones(shape[1]), np.zeros(shape[1]), eps=0.0)
    rows = ref.to_rows(y)
    np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(rows.var(axis=0), 1.0, rtol=1e-12)
    assert y.shape == x.shape
    # conv case: one statistic per channel over batch and all positions
    np.testing.assert_allclose(cache.mu, np.moveaxis(x, 1, 0).reshape(shape[1], -1).mean(1))


def test_identity_is_representable():
    """gamma = sqrt(var + eps), beta = mu recovers the input (section 3)."""
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, size=(20, 4))
    mu, var, _ = ref.batch_statistics(x)
    y, _ = ref.batch_norm_forward(x, np.sqrt(var + 1e-5), mu, eps=1e-5)
    np.testing.assert_allclose(y, x, rtol=1e-12)


def _loss_and_grad(x, gamma, beta, weights, eps=1e-5):
    y, cache = ref.batch_norm_forward(x, gamma, beta, eps)
    return float(np.sum(weights * y)), ref.batch_norm_backward(weights, cache)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_central_differences(shape):
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape)
    gamma, beta = _params(rng, shape[1])
    weights = rng.normal(size=shape)  # l = sum(weights * y): dl/dy = weights
    _, grads = _loss_and_grad(x, gamma, beta, weights)
    h = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(*shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (_loss_and_grad(plus, gamma, beta, weights)[0]
                          - _loss_and_grad(minus, gamma, beta, weights)[0]) / (2 * h)
    np.testing.assert_allclose(grads.dx, numeric, rtol=1e-5, atol=1e-7)
    for name, param in (("dgamma", gamma), ("dbeta", beta)):
        numeric_p = np.zeros_like(param)
        for k in range(param.size):
            plus, minus = param.copy(), param.copy()
            plus[k] += h
            minus[k] -= h
            args_p = (plus, beta) if name == "dgamma" else (gamma, plus)
            args_m = (minus, beta) if name == "dgamma" else (gamma, minus)
            numeric_p[k] = (_loss_and_grad(x, *args_p, weights)[0]
                            - _loss_and_grad(x, *args_m, weights)[0]) / (2 * h)
        np.testing.assert_allclose(getattr(grads, name), numeric_p, rtol=1e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), c=st.integers(1, 5), spatial=st.integers(1, 4),
       offset=st.floats(-100, 100), seed=st.integers(0, 2**31))
def test_two_reduction_form_equals_papers_chain_rule(m, c, spatial, offset, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(offset, 1.0, size=(m, c, spatial))
    gamma, beta = _params(rng, c)
    dy = rng.normal(size=x.shape)
    _, cache = ref.batch_norm_forward(x, gamma, beta)
    grads = ref.batch_norm_backward(dy, cache)
    np.testing.assert_allclose(ref.batch_norm_backward_two_reductions(dy, cache), grads.dx,
                               rtol=1e-7, atol=1e-9)
    # the input gradient is orthogonal to constant shifts of a channel (BN removes the mean)
    np.testing.assert_allclose(ref.to_rows(grads.dx).sum(axis=0), 0.0, atol=1e-8)


def test_population_statistics_equal_sizes_is_papers_formula():
    rng = np.random.default_rng(3)
    batches = [rng.normal(2.0, 3.0, size=(10, 4)) for _ in range(6)]
    stats = [ref.batch_statistics(b) for b in batches]
    mean, var = ref.population_statistics([s[0] for s in stats], [s[1] for s in stats],
                                          [s[2] for s in stats])
    np.testing.assert_allclose(mean, np.mean([s[0] for s in stats], axis=0))
    np.testing.assert_allclose(var, 10 / 9 * np.mean([s[1] for s in stats], axis=0))


def test_population_statistics_uneven_last_batch_is_pooled_variance():
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(10, 3)), rng.normal(size=(10, 3)), rng.normal(size=(3, 3))]
    stats = [ref.batch_statistics(b) for b in batches]
    mean, var = ref.population_statistics(*zip(*stats, strict=True))
    np.testing.assert_allclose(mean, np.concatenate(batches).mean(axis=0))
    within = sum(((b - b.mean(0)) ** 2).sum(0) for b in batches)
    np.testing.assert_allclose(var, within / (23 - 3))


def test_inference_map_equals_normalization_with_population_stats():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 3, 4))
    gamma, beta = _params(rng, 3)
    mean, var = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    expected = gamma[None, :, None] * (x - mean[None, :, None]) / np.sqrt(
        var[None, :, None] + 1e-3) + beta[None, :, None]
    np.testing.assert_allclose(ref.batch_norm_inference(x, gamma, beta, mean, var, 1e-3),
                               expected)


def test_running_statistics_cumulative_average():
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(8, 2)) for _ in range(3)]
    rm, rv = np.zeros(2), np.ones(2)
    for step, x in enumerate(xs, start=1):
        rm, rv = ref.update_running_statistics(rm, rv, x, None, step)
    np.testing.assert_allclose(rm, np.mean([x.mean(0) for x in xs], axis=0))
    np.testing.assert_allclose(rv, np.mean([x.var(0, ddof=1) for x in xs], axis=0))
