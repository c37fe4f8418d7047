"""The ``"torch"`` backend: Algorithm 1 as an autograd Function with a closed-form backward.

Forward (training), per channel c over the m = N * prod(spatial) values of the mini-batch::

    mu, var = mean and biased variance   (Welford, via torch.var_mean: no E[x^2] - E[x]^2)
    y       = gamma * (x - mu) / sqrt(var + eps) + beta
            = scale * x + shift,  scale = gamma / sqrt(var + eps),  shift = beta - scale * mu

Backward, the paper's chain rule collapsed into two per-channel reductions::

    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma / (m sqrt(var + eps)) * (m dy - dbeta - xhat * dgamma)

The backward is itself written in differentiable tensor ops, and when a second derivative is
requested (``create_graph=True``) it recomputes the statistics from ``x`` inside the graph, so
double backward is exact. Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchnorm.backends import Backend, register_backend

ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, torch's default
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
}


def reduce_dims(x: torch.Tensor) -> list[int]:
    """Every dimension but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (C,) tensor to broadcast against ``like`` of shape (N, C, *spatial)."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulation happen in float32 at least."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, accurate for data with a large offset."""
    var, mean = torch.var_mean(x.to(compute_dtype(x)), dim=reduce_dims(x), correction=0)
    return mean, var


def _normalize(x, mean, invstd, weight, bias):
    """y = scale * x + shift with per-channel scale = gamma * invstd, shift = beta - scale * mu."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(scale.dtype) - mean * scale
    xc = x.to(scale.dtype)
    return torch.addcmul(per_channel(shift, xc), xc, per_channel(scale, xc)).to(x.dtype)


def closed_form_backward(dy, x, weight, mean, invstd):
    """``(dx, dgamma, dbeta)`` from the two per-channel reductions (see module docstring)."""
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    xc = x.to(invstd.dtype)
    dyc = dy.to(invstd.dtype)
    xhat = (xc - per_channel(mean, xc)) * per_channel(invstd, xc)
    dbeta = dyc.sum(dims)
    dgamma = (dyc * xhat).sum(dims)
    gain = invstd if weight is None else weight.to(invstd.dtype) * invstd
    # dx = gain * (dy - mean(dy) - xhat * mean(dy * xhat)), written with two fused multiply-adds
    dx = torch.addcmul(dyc - per_channel(dbeta / m, xc), xhat, per_channel(-dgamma / m, xc))
    dx = (dx * per_channel(gain, xc)).to(x.dtype)
    return dx, dgamma, dbeta


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN: returns ``(y, mean, var)``; only ``y`` is differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, var = batch_statistics(x)
        invstd = torch.rsqrt(var + eps)
        y = _normalize(x, mean, invstd, weight, bias)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: the statistics depend on x, so rebuild them inside the graph.
            mean, var = batch_statistics(x)
            invstd = torch.rsqrt(var + ctx.eps)
        dx, dgamma, dbeta = closed_form_backward(dy, x, weight, mean, invstd)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return (
            dx if need_x else None,
            dgamma.to(weight.dtype) if need_w else None,
            dbeta.to(weight.dtype if weight is not None else dbeta.dtype) if need_b else None,
            None,
        )


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """``running = (1 - momentum) * running + momentum * batch``, variance unbiased (m/(m-1))."""
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual
):
    """The torch backend; arguments are already validated by :mod:`batchnorm.functional`."""
    if training:
        y, mean, var = BatchNormFunction.apply(input, weight, bias, eps)
        if running_mean is not None:
            count = input.numel() // input.shape[1]
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        # Inference is Algorithm 2's fixed affine map; autograd through it is exact.
        invstd = torch.rsqrt(running_var.to(compute_dtype(input)) + eps)
        y = _normalize(input, running_mean.to(invstd.dtype), invstd, weight, bias)
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y


def _supports(input, weight, training, activation, residual):
    return None  # every device, dtype, activation and residual


register_backend(Backend(name="torch", batch_norm=batch_norm, supports=_supports))
