r"""Per-channel statistics of a batch in PyTorch: the one home of the helpers every layer shares.

An input of shape ``(N, C, *spatial)`` holds, for each channel ``c``, the ``m = N *
prod(spatial)`` values of dimension 1's slice ``c``; BN's statistics are taken over them::

    mu_c  = 1/m sum_i x_ic
    var_c = 1/m sum_i (x_ic - mu_c)^2          (biased: the variance BN normalizes with)

computed by two passes (first the mean, then the squares of the centered values), never as
``E[x^2] - E[x]^2``, which cancels catastrophically for data with a large offset. Statistics
are computed in float32 at least (float64 stays float64). The ``"torch"`` backend, the
synchronized layer and :func:`batchnorm.recalibrate` all use these functions.

:func:`reduce_dims`, :func:`per_channel`, :func:`cast` and :func:`compute_dtype` are written
in the subset of Python that TorchScript compiles, so the scripted layers
(:mod:`batchnorm.backends.composite`) share them.
"""

from __future__ import annotations

import torch


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    dims = [0]
    for d in range(2, x.dim()):
        dims.append(d)
    return dims


def per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (C,) tensor to broadcast against ``like`` of shape (N, C, *spatial)."""
    if torch.jit.is_scripting():
        return t.reshape([1, -1] + [1] * (like.dim() - 2))
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))  # a list argument costs more in eager


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatcher round trip when it is a no-op (hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulation happen in float32 at least."""
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def centered_statistics(x: torch.Tensor):
    """Per-channel ``(mean, biased variance, x - mean)`` by a two-pass algorithm.

    Pass 1 sums x (torch's CPU/GPU sums are cascaded, so the mean is accurate); pass 2 sums
    the squares of the centered values. Unlike ``E[x^2] - E[x]^2`` this stays accurate for data
    with a large offset, and plain sums are far faster than a Welford reduction on the CPU.
    """
    dims = reduce_dims(x)
    xc = cast(x, compute_dtype(x))
    mean = xc.mean(dims)
    centered = xc - per_channel(mean, xc)
    var = (centered * centered).mean(dims)
    return mean, var, centered


def mean_and_variance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float32 or higher), accurate for large offsets.

    (Formerly ``batchnorm.autograd.batch_statistics``.)
    """
    mean, var, _ = centered_statistics(x)
    return mean, var
