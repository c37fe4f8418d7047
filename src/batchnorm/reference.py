"""The paper's equations in NumPy, line by line: the float64 oracle the tests compare against.

Nothing here is fast; everything here is literal. Names follow the paper
(Ioffe & Szegedy 2015, Algorithms 1 and 2 and the backward pass in section 3).

Shapes. A fully connected layer's input is ``(m, d)``: ``m`` examples, ``d`` features.
A convolutional layer's input is ``(N, C, *spatial)``; the paper normalizes each feature map
jointly over the mini-batch and all spatial positions, so the effective mini-batch per channel
has ``m = N * prod(spatial)`` values. Both cases are handled by viewing the input as rows:
``(m, C)``, one column per feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def to_rows(x: np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` -> ``(N * prod(spatial), C)``: one column per feature/channel."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_rows` for an array of the given original ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return np.moveaxis(rows.reshape(moved), -1, 1)


@dataclass
class Cache:
    """What Algorithm 1's forward keeps for the backward pass (all in rows layout)."""

    x: np.ndarray  # (m, C) inputs x_i
    mu: np.ndarray  # (C,)  mini-batch mean mu_B
    var: np.ndarray  # (C,)  mini-batch variance sigma^2_B (biased, 1/m)
    xhat: np.ndarray  # (m, C) normalized inputs
    gamma: np.ndarray  # (C,)
    eps: float
    shape: tuple[int, ...]  # the original input shape


def batch_norm_forward(x, gamma, beta, eps: float = 1e-5):
    """Algorithm 1, the BN transform over a mini-batch, for FC or conv input.

    Returns ``(y, cache)`` with ``y`` in the input's shape.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = to_rows(x)
    m = rows.shape[0]
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    mu = np.sum(rows, axis=0) / m  # mu_B = 1/m sum x_i
    var = np.sum((rows - mu) ** 2, axis=0) / m  # sigma^2_B = 1/m sum (x_i - mu_B)^2
    xhat = (rows - mu) / np.sqrt(var + eps)  # xhat_i = (x_i - mu_B) / sqrt(sigma^2_B + eps)
    y = gamma * xhat + beta  # y_i = gamma xhat_i + beta
    return from_rows(y, x.shape), Cache(rows, mu, var, xhat, gamma, eps, x.shape)


@dataclass
class Gradients:
    """Every term of the paper's chain rule, by name (rows layout except ``dx``)."""

    dxhat: np.ndarray  # dl/dxhat_i, (m, C)
    dvar: np.ndarray  # dl/dsigma^2_B, (C,)
    dmu: np.ndarray  # dl/dmu_B, (C,)
    dx: np.ndarray  # dl/dx_i, in the input's shape
    dgamma: np.ndarray  # dl/dgamma, (C,)
    dbeta: np.ndarray  # dl/dbeta, (C,)


def batch_norm_backward(dy, cache: Cache) -> Gradients:
    """The backward pass exactly as derived in the paper (section 3)."""
    dy = to_rows(np.asarray(dy, dtype=np.float64))
    x, mu, var, xhat, gamma, eps = cache.x, cache.mu, cache.var, cache.xhat, cache.gamma, cache.eps
    m = x.shape[0]
    dxhat = dy * gamma
    dvar = np.sum(dxhat * (x - mu), axis=0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(dxhat * (-1.0 / np.sqrt(var + eps)), axis=0) + dvar * np.sum(
        -2.0 * (x - mu), axis=0
    ) / m
    dx = dxhat / np.sqrt(var + eps) + dvar * 2.0 * (x - mu) / m + dmu / m
    dgamma = np.sum(dy * xhat, axis=0)
    dbeta = np.sum(dy, axis=0)
    return Gradients(dxhat, dvar, dmu, from_rows(dx, cache.shape), dgamma, dbeta)


def batch_norm_backward_two_reductions(dy, cache: Cache) -> np.ndarray:
    """The simplified form of dl/dx that implementations use:

    ``dx = gamma / (m sqrt(var + eps)) * (m dy - sum(dy) - xhat * sum(dy xhat))``.
    """
    dy = to_rows(np.asarray(dy, dtype=np.float64))
    m = dy.shape[0]
    scale = cache.gamma / (m * np.sqrt(cache.var + cache.eps))
    dx = scale * (m * dy - dy.sum(axis=0) - cache.xhat * np.sum(dy * cache.xhat, axis=0))
    return from_rows(dx, cache.shape)


def batch_statistics(x) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-feature ``(mu_B, sigma^2_B (biased), m)`` of one mini-batch."""
    rows = to_rows(np.asarray(x, dtype=np.float64))
    m = rows.shape[0]
    mu = rows.sum(axis=0) / m
    return mu, ((rows - mu) ** 2).sum(axis=0) / m, m


def population_statistics(batch_means, batch_vars, batch_sizes):
    """Algorithm 2, step 10: population statistics from many training mini-batches.

    For mini-batches of equal size ``m`` this is the paper's
    ``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) E_B[sigma^2_B]``.
    With unequal sizes ``m_b`` (a smaller last batch), each batch counts by its size:
    ``E[x] = sum m_b mu_b / sum m_b`` and ``Var[x] = sum m_b sigma^2_b / sum (m_b - 1)``
    (the pooled unbiased within-batch variance), which reduces to the paper's formula
    when all ``m_b`` are equal.
    """
    means = np.asarray(batch_means, dtype=np.float64)
    variances = np.asarray(batch_vars, dtype=np.float64)
    sizes = np.asarray(batch_sizes, dtype=np.float64).reshape(-1, *([1] * (means.ndim - 1)))
    if np.any(sizes < 2):
        raise ValueError("every batch needs at least 2 values per feature for an unbiased variance")
    mean = np.sum(sizes * means, axis=0) / np.sum(sizes)
    var = np.sum(sizes * variances, axis=0) / np.sum(sizes - 1)
    return mean, var


def inference_affine(gamma, beta, mean, var, eps: float = 1e-5):
    """Algorithm 2, step 11: BN at inference is the fixed affine map ``y = scale * x + shift``

    with ``scale = gamma / sqrt(Var[x] + eps)`` and
    ``shift = beta - gamma E[x] / sqrt(Var[x] + eps)``.
    """
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shift = np.asarray(beta, dtype=np.float64) - scale * np.asarray(mean, dtype=np.float64)
    return scale, shift


def batch_norm_inference(x, gamma, beta, mean, var, eps: float = 1e-5) -> np.ndarray:
    """Apply the inference affine map per feature (FC or conv input)."""
    x = np.asarray(x, dtype=np.float64)
    scale, shift = inference_affine(gamma, beta, mean, var, eps)
    return from_rows(to_rows(x) * scale + shift, x.shape)


def update_running_statistics(running_mean, running_var, x, momentum: float | None, step: int):
    """The moving averages a framework keeps during training (PyTorch's convention).

    ``running = (1 - a) * running + a * batch`` with ``a = momentum``, or ``a = 1 / step`` for a
    cumulative average when ``momentum is None`` (``step`` counts batches from 1). The variance
    fed in is the unbiased one, ``m/(m-1) sigma^2_B``, as in Algorithm 2.
    """
    mu, var, m = batch_statistics(x)
    factor = 1.0 / step if momentum is None else momentum
    new_mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mu
    new_var = (1 - factor) * np.asarray(running_var, np.float64) + factor * var * m / (m - 1)
    return new_mean, new_var
