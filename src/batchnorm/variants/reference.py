"""The BN family's equations in NumPy float64, line by line: the oracle of the variant tests.

Nothing here is fast; everything is literal and written from the papers. Plain BN's pieces
(the transform, its backward, the statistics, the inference map) come from
:mod:`batchnorm.reference`, in the same rows layout: ``(N, C, *spatial)`` is viewed as
``(m, C)``, one column per channel, ``m = N * prod(spatial)``.

- Batch Renormalization: Ioffe, NeurIPS 2017, Algorithm 1 and the backward of section 3.
- Ghost Batch Normalization: Hoffer, Hubara & Soudry, NeurIPS 2017, section 4, Algorithm 1.
- Frozen BN: the inference map of Ioffe & Szegedy 2015, Algorithm 2, with fixed buffers.
- In-place activated BN: Rota Bulo, Porzi & Kontschieder, CVPR 2018, section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchnorm.reference import (
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    from_rows,
    to_rows,
    update_running_statistics,
)

# --------------------------------------------------------------------------------------------
# Batch Renormalization


@dataclass
class RenormCache:
    """What Algorithm 1's forward keeps for the backward (rows layout)."""

    x: np.ndarray  # (m, C)
    mu_b: np.ndarray  # (C,) mini-batch mean
    sigma_b: np.ndarray  # (C,) sqrt(eps + biased mini-batch variance)
    r: np.ndarray  # (C,) clip(sigma_b / sigma, 1/r_max, r_max), a constant for the gradient
    d: np.ndarray  # (C,) clip((mu_b - mu) / sigma, -d_max, d_max), a constant likewise
    xhat: np.ndarray  # (m, C) (x - mu_b) / sigma_b * r + d
    gamma: np.ndarray  # (C,)
    shape: tuple[int, ...]


def batch_renorm_forward(x, gamma, beta, mu, sigma, r_max: float, d_max: float,
                         eps: float = 1e-5):
    """Algorithm 1 (training): ``mu``, ``sigma`` are the moving averages before this step.

    Returns ``(y, cache)``; ``y`` has ``x``'s shape.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = to_rows(x)
    m = rows.shape[0]
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    mu_b = rows.sum(axis=0) / m  # mu_B = 1/m sum x_i
    sigma_b = np.sqrt(eps + ((rows - mu_b) ** 2).sum(axis=0) / m)  # sigma_B
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)  # r = stop_gradient(clip(sigma_B / sigma))
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)  # d = stop_gradient(clip((mu_B - mu)/sigma))
    xhat = (rows - mu_b) / sigma_b * r + d
    gamma = np.asarray(gamma, dtype=np.float64)
    y = gamma * xhat + np.asarray(beta, dtype=np.float64)
    return from_rows(y, x.shape), RenormCache(rows, mu_b, sigma_b, r, d, xhat, gamma, x.shape)


@dataclass
class RenormGradients:
    dx: np.ndarray  # in the input's shape
    dgamma: np.ndarray
    dbeta: np.ndarray


def batch_renorm_backward(dy, cache: RenormCache) -> RenormGradients:
    """Section 3's chain rule, with r and d treated as constants (stop_gradient)."""
    dy = to_rows(np.asarray(dy, dtype=np.float64))
    x, mu_b, sigma_b, r = cache.x, cache.mu_b, cache.sigma_b, cache.r
    m = x.shape[0]
    dxhat = dy * cache.gamma
    dsigma_b = np.sum(dxhat * (x - mu_b), axis=0) * (-r / sigma_b**2)
    dmu_b = np.sum(dxhat, axis=0) * (-r / sigma_b)
    dx = dxhat * r / sigma_b + dsigma_b * (x - mu_b) / (m * sigma_b) + dmu_b / m
    return RenormGradients(from_rows(dx, cache.shape), np.sum(dy * cache.xhat, axis=0),
                           np.sum(dy, axis=0))


def renorm_moving_averages(mu, sigma, cache: RenormCache, alpha: float):
    """Algorithm 1's updates, after r and d are computed: ``mu += alpha (mu_B - mu)`` and
    ``sigma += alpha (sigma_B - sigma)`` (sigma_B includes eps, as in the algorithm)."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    return mu + alpha * (cache.mu_b - mu), sigma + alpha * (cache.sigma_b - sigma)


def sigma_from_running_var(running_var, eps: float):
    """The library stores sigma as ``running_var = sigma^2 - eps``, so that BN's inference map
    ``(x - mean) / sqrt(running_var + eps)`` is the paper's ``(x - mu) / sigma``."""
    return np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)


def running_var_from_sigma(sigma, eps: float):
    return np.asarray(sigma, dtype=np.float64) ** 2 - eps


def batch_renorm_inference(x, gamma, beta, mu, sigma):
    """Algorithm 1 (inference): ``y = gamma (x - mu) / sigma + beta``."""
    x = np.asarray(x, dtype=np.float64)
    rows = (to_rows(x) - np.asarray(mu, np.float64)) / np.asarray(sigma, np.float64)
    return from_rows(np.asarray(gamma, np.float64) * rows + np.asarray(beta, np.float64),
                     x.shape)


# --------------------------------------------------------------------------------------------
# Ghost Batch Normalization


def ghost_batch_sizes(n: int, ghost_batch_size: int) -> list[int]:
    """Sizes of the virtual batches a mini-batch of ``n`` samples is split into (along dim 0).

    ``n = q g + r``: ``q`` virtual batches of ``g`` samples, the remainder ``r`` joining the last
    one (``g + r`` samples) instead of forming a batch smaller than ``g``; ``n <= g`` is one
    batch of ``n``.
    """
    q = max(1, n // ghost_batch_size)
    sizes = [ghost_batch_size] * q
    sizes[-1] += n - q * ghost_batch_size
    return sizes


def _split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1], axis=0)


def ghost_batch_norm_forward(x, gamma, beta, ghost_batch_size: int, eps: float = 1e-5):
    """Algorithm 1 of Hoffer et al. (training): each virtual batch is normalized with its own
    statistics (Algorithm 1 of Ioffe & Szegedy per virtual batch). Returns ``(y, caches)``."""
    x = np.asarray(x, dtype=np.float64)
    outputs = [batch_norm_forward(part, gamma, beta, eps)
               for part in _split(x, ghost_batch_sizes(x.shape[0], ghost_batch_size))]
    return np.concatenate([y for y, _ in outputs]), [cache for _, cache in outputs]


def ghost_batch_norm_backward(dy, caches):
    """``(dx, dgamma, dbeta)``: each virtual batch's BN backward; the parameters' gradients add
    up over the virtual batches."""
    parts = _split(np.asarray(dy, dtype=np.float64), [c.shape[0] for c in caches])
    grads = [batch_norm_backward(part, cache) for part, cache in zip(parts, caches, strict=True)]
    return (np.concatenate([g.dx for g in grads]), sum(g.dgamma for g in grads),
            sum(g.dbeta for g in grads))


def ghost_running_statistics(running_mean, running_var, x, ghost_batch_size: int,
                             momentum: float | None, batches_before: int = 0):
    """The moving averages updated once per virtual batch, in order (PyTorch's convention per
    update: unbiased variance; ``momentum=None`` is the cumulative average over all virtual
    batches, ``batches_before`` of which came in earlier steps)."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = running_mean, running_var
    for i, part in enumerate(_split(x, ghost_batch_sizes(x.shape[0], ghost_batch_size))):
        mean, var = update_running_statistics(mean, var, part, momentum, batches_before + i + 1)
    return mean, var


# --------------------------------------------------------------------------------------------
# Frozen BN: Algorithm 2's inference map with fixed weight, bias, running_mean, running_var

frozen_batch_norm = batch_norm_inference


# --------------------------------------------------------------------------------------------
# In-place activated BN


def activation(y, name: str, negative_slope: float = 0.01, alpha: float = 1.0):
    """``identity``, ``leaky_relu`` (slope ``negative_slope`` for y < 0) or ``elu``
    (``alpha (exp(y) - 1)`` for y <= 0)."""
    y = np.asarray(y, dtype=np.float64)
    if name == "identity":
        return y
    if name == "leaky_relu":
        return np.where(y >= 0, y, negative_slope * y)
    return np.where(y > 0, y, alpha * np.expm1(np.minimum(y, 0)))


def activation_inverse(z, name: str, negative_slope: float = 0.01, alpha: float = 1.0):
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z
    if name == "leaky_relu":
        return np.where(z >= 0, z, z / negative_slope)
    return np.where(z > 0, z, np.log1p(np.minimum(z, 0) / alpha))


def activation_slope_from_output(z, name: str, negative_slope: float = 0.01,
                                 alpha: float = 1.0):
    """``f'(y)`` written in terms of ``z = f(y)``: 1 or the slope; for ELU ``z + alpha``."""
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return np.ones_like(z)
    if name == "leaky_relu":
        return np.where(z >= 0, 1.0, negative_slope)
    return np.where(z > 0, 1.0, z + alpha)


@dataclass
class ABNCache:
    """All the paper's backward keeps: the output z and per-channel numbers (rows layout)."""

    z: np.ndarray  # (m, C)
    sigma_b: np.ndarray  # (C,) sqrt(var_B + eps)
    gamma_eff: np.ndarray  # (C,) |gamma| + eps, so that y -> x_hat is invertible
    sign: np.ndarray  # (C,) d|gamma|/dgamma, 0 at gamma = 0
    beta: np.ndarray
    name: str
    negative_slope: float
    alpha: float
    shape: tuple[int, ...]


def inplace_abn_forward(x, gamma, beta, eps: float = 1e-5, name: str = "leaky_relu",
                        negative_slope: float = 0.01, alpha: float = 1.0):
    """``z = f(BN(x))`` with gamma replaced by ``|gamma| + eps`` (section 3). Returns ``(z,
    cache)``; the cache holds no input, only ``z`` and per-channel values."""
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    gamma_eff = np.abs(gamma) + eps
    y, bn = batch_norm_forward(x, gamma_eff, beta, eps)
    z = activation(y, name, negative_slope, alpha)
    cache = ABNCache(to_rows(z), np.sqrt(bn.var + eps), gamma_eff, np.sign(gamma), beta, name,
                     negative_slope, alpha, bn.shape)
    return z, cache


def inplace_abn_backward(dz, cache: ABNCache):
    """``(dx, dgamma, dbeta)`` from z alone (section 3): ``y = f^-1(z)``, ``dy = dz f'(y)``,
    ``x_hat = (y - beta) / gamma``, then BN's two-reduction backward in x_hat."""
    dz = to_rows(np.asarray(dz, dtype=np.float64))
    z, g = cache.z, cache.gamma_eff
    m = z.shape[0]
    y = activation_inverse(z, cache.name, cache.negative_slope, cache.alpha)
    dy = dz * activation_slope_from_output(z, cache.name, cache.negative_slope, cache.alpha)
    xhat = (y - cache.beta) / g
    dbeta = dy.sum(axis=0)
    dgamma_eff = (dy * xhat).sum(axis=0)
    dx = g / (m * cache.sigma_b) * (m * dy - dbeta - xhat * dgamma_eff)
    return from_rows(dx, cache.shape), cache.sign * dgamma_eff, dbeta
