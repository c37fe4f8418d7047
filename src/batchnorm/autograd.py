"""The ``"torch"`` backend: Algorithm 1 as an autograd Function with a closed-form backward.

Forward (training), per channel c over the m = N * prod(spatial) values of the mini-batch::

    mu, var = mean and biased variance   (two passes: no E[x^2] - E[x]^2)
    y       = gamma * (x - mu) / sqrt(var + eps) + beta
            = scale * x + shift,  scale = gamma / sqrt(var + eps),  shift = beta - scale * mu

Backward, the paper's chain rule collapsed into two per-channel reductions::

    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma / (m sqrt(var + eps)) * (m dy - dbeta - xhat * dgamma)

On the CPU, float32 and float64 tensors go through fused C++ kernels that compute exactly these
formulas in fewer passes, with the autograd Function in C++ too (:mod:`batchnorm.cpu`);
everything else uses the ATen operations below. Both backwards are written so that when a
second derivative is requested (``create_graph=True``) they recompute the statistics from ``x``
inside the graph with differentiable tensor ops, so double backward is exact. Half-precision
inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchnorm import cpu as cpu_kernels
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


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatcher round trip when it is a no-op (hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulation happen in float32 at least."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float32 or higher), accurate for large offsets."""
    mean, var, _ = centered_statistics(x)
    return mean, var


def _affine(x, shift, scale):
    """``x * scale + shift`` per channel, in two cheap passes (out-of-place, then in place)."""
    return (x * per_channel(scale, x)).add_(per_channel(shift, x))


def _scale_shift(mean, invstd, weight, bias):
    """y = scale * x + shift with scale = gamma * invstd, shift = beta - scale * mu."""
    scale = invstd if weight is None else cast(weight, invstd.dtype) * invstd
    shift = -mean * scale if bias is None else cast(bias, scale.dtype) - mean * scale
    return scale, shift


def closed_form_backward(dy, centered, weight, invstd):
    """``(dx, dgamma, dbeta)`` from the two per-channel reductions (see module docstring).

    ``centered`` is ``x - mu``. With ``gain = gamma * invstd`` the input gradient is
    ``dx = gain * dy + k * (x - mu) + c``, ``k = -gain * invstd * dgamma / m``,
    ``c = -gain * dbeta / m``: three elementwise passes and few per-channel ops, since on small
    tensors every op's fixed cost dominates.
    """
    dims = reduce_dims(centered)
    m = centered.numel() // centered.shape[1]
    dyc = cast(dy, invstd.dtype)
    dbeta = dyc.sum(dims)
    dgamma = (dyc * centered).sum(dims).mul_(invstd)
    gain = invstd if weight is None else cast(weight, invstd.dtype) * invstd
    k = (gain * dgamma).mul_(invstd).mul_(-1.0 / m)
    c = (gain * dbeta).mul_(-1.0 / m)
    dx = (dyc * per_channel(gain, dyc)).addcmul_(centered, per_channel(k, dyc))
    return cast(dx.add_(per_channel(c, dyc)), dy.dtype), dgamma, dbeta


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN in ATen operations, for what the fused CPU kernels do not take (other
    dtypes and devices). Updates the running statistics in place when they are given (as
    ``torch.nn.functional.batch_norm`` does), so only ``y`` leaves the Function."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        ctx.eps = eps
        mean, var, centered = centered_statistics(x)
        invstd = (var + eps).rsqrt_()
        # y = gamma * invstd * (x - mu) + beta, in place on the centered copy
        scale = invstd if weight is None else cast(weight, invstd.dtype) * invstd
        y = centered.mul_(per_channel(scale, centered))
        if bias is not None:
            y = y.add_(per_channel(cast(bias, y.dtype), y))
        if running_mean is not None:
            # running = (1 - momentum) running + momentum batch, with the unbiased m/(m-1) var
            count = x.numel() // x.shape[1]
            running_mean.lerp_(cast(mean, running_mean.dtype), momentum)
            running_var.lerp_(cast(var.mul_(count / (count - 1)), running_var.dtype), momentum)
        # x, not x - mu, is saved: the same memory as torch's BN; backward re-centers it.
        ctx.save_for_backward(x, weight, mean, invstd)
        return cast(y, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # Double backward: the statistics depend on x, so rebuild them inside the graph.
            mean, var, centered = centered_statistics(x)
            invstd = (var + ctx.eps).rsqrt()
        else:
            centered = cast(x, invstd.dtype) - per_channel(mean, x)
        dx, dgamma, dbeta = closed_form_backward(dy, centered, weight, invstd)
        return (
            dx if need_x else None,
            cast(dgamma, weight.dtype) if need_w else None,
            cast(dbeta, weight.dtype if weight is not None else dbeta.dtype) if need_b else None,
            None, None, None, None,
        )


def training_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps):
    """Algorithm 1 with its closed-form backward: the fused CPU kernels (float32/64 on the CPU)
    or :class:`BatchNormFunction`; both update the running statistics in place."""
    y = cpu_kernels.train(x, weight, bias, running_mean, running_var, momentum, eps)
    if y is None:
        y = BatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps)
    return y


def batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual
):
    """The torch backend; arguments are already validated by :mod:`batchnorm.functional`."""
    if training:
        y = training_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps)
    else:
        # Inference is Algorithm 2's fixed affine map; autograd through it is exact.
        y = cpu_kernels.infer(input, weight, bias, running_mean, running_var, eps)
        if y is None:  # not a float32/64 CPU tensor, or no kernels: ATen operations
            invstd = torch.rsqrt(cast(running_var, compute_dtype(input)) + eps)
            scale, shift = _scale_shift(cast(running_mean, invstd.dtype), invstd, weight, bias)
            y = cast(_affine(cast(input, invstd.dtype), shift, scale), input.dtype)
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y


def _supports(input, weight, training, activation, residual):
    return None  # every device, dtype, activation and residual


register_backend(Backend(name="torch", batch_norm=batch_norm, supports=_supports))
