"""The ``"torch"`` backend: Algorithm 1 with a closed-form backward, in three forms.

Training, per channel c over the m = N * prod(spatial) values of the mini-batch::

    mu, var = mean and biased variance   (two passes: no E[x^2] - E[x]^2)
    y       = gamma * (x - mu) / sqrt(var + eps) + beta
    dbeta   = sum(dy),  dgamma = sum(dy * xhat)
    dx      = gamma / (m sqrt(var + eps)) * (m dy - dbeta - xhat * dgamma)

Each call takes the fastest form that the tools in play can see through:

1. plain eager mode on the CPU (float32/float64 tensors, no transform, tracer, forward-mode AD
   level or dispatch mode): the fused C++ kernels with their C++ autograd Function
   (:mod:`batchnorm.cpu`), a few passes over memory and little per-call overhead;
2. ``torch.compile``, ``torch.export`` and ``torch.jit.trace``: plain ATen operations
   (:mod:`batchnorm.backends.composite`) that the compiler fuses, the exporter records and the
   tracer sees; evaluation is torch's own operation there, so it folds into convolutions;
3. everything else (other dtypes and devices, ``torch.func`` transforms, forward-mode AD,
   batched gradients, fake tensors): :class:`BatchNormFunction`
   (:mod:`batchnorm.backends.function`), with a ``jvp`` and a generated vmap rule.

Forms 1 and 3 recompute the statistics from ``x`` inside the graph when a second derivative
is requested (``create_graph=True``), so double backward is exact; form 2 is differentiable
to any order as it stands. Half-precision inputs are computed in float32 and cast back.
Evaluation in eager mode is Algorithm 2's fixed affine map: one pass of the fused CPU kernel
(:func:`batchnorm.cpu.infer`) in plain eager mode, ATen operations otherwise.

The seam (:mod:`batchnorm.backends`) loads this module on the first call that needs it and
registers its :func:`batch_norm` and :func:`supports`. Formerly ``batchnorm.autograd``, which
remains as a deprecated alias.
"""

from __future__ import annotations

import torch

from batchnorm import cpu as cpu_kernels
from batchnorm.activations import epilogue
from batchnorm.backends import composite, fused_candidate
from batchnorm.backends.function import BatchNormFunction, closed_form_backward
from batchnorm.statistics import cast, compute_dtype, per_channel

__all__ = ["COMPOSABLE", "BatchNormFunction", "batch_norm", "closed_form_backward", "supports",
           "training_batch_norm"]

#: works under torch.func transforms, forward-mode AD and torch.jit.trace (see the seam)
COMPOSABLE = True


def _affine(x, shift, scale):
    """``x * scale + shift`` per channel, in two cheap passes (out-of-place, then in place)."""
    return (x * per_channel(scale, x)).add_(per_channel(shift, x))


def _scale_shift(mean, invstd, weight, bias):
    """y = scale * x + shift with scale = gamma * invstd, shift = beta - scale * mu."""
    scale = invstd if weight is None else cast(weight, invstd.dtype) * invstd
    shift = -mean * scale if bias is None else cast(bias, scale.dtype) - mean * scale
    return scale, shift


def training_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps):
    """Algorithm 1 with its closed-form backward, updating the running statistics in place.

    Three forms of the same math (module docstring): the fused C++ kernels in plain eager mode,
    the plain ATen composite when compiling, exporting or tracing, and
    :class:`BatchNormFunction` for everything else."""
    if fused_candidate(x, weight, bias):
        y = cpu_kernels.train(x, weight, bias, running_mean, running_var, momentum, eps)
        if y is not None:
            return y
    if torch.compiler.is_compiling() or torch._C._get_tracing_state():
        return composite.batch_norm(x, running_mean, running_var, weight, bias, True, momentum,
                                    eps)
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps)[0]


def eval_batch_norm(x, running_mean, running_var, weight, bias, eps):
    """Algorithm 2's fixed affine map ``x * scale + shift`` (autograd through it is exact): the
    fused one-pass CPU kernel in plain eager mode; torch's own operation for tracers and
    compilers (exporters fold it into a preceding convolution); ATen operations otherwise."""
    if fused_candidate(x, weight, bias):  # checked first: the common case pays for nothing else
        y = cpu_kernels.infer(x, weight, bias, running_mean, running_var, eps)
        if y is not None:
            return y
    if torch._C._get_tracing_state() or torch.compiler.is_compiling():
        return composite.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    invstd = torch.rsqrt(cast(running_var, compute_dtype(x)) + eps)
    scale, shift = _scale_shift(cast(running_mean, invstd.dtype), invstd, weight, bias)
    return cast(_affine(cast(x, invstd.dtype), shift, scale), x.dtype)


def batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual
):
    """The torch backend; arguments are already validated by :mod:`batchnorm.functional`."""
    if training:
        y = training_batch_norm(input, weight, bias, running_mean, running_var, momentum, eps)
    else:
        y = eval_batch_norm(input, running_mean, running_var, weight, bias, eps)
    return epilogue(y, activation, residual)


def supports(input, weight, training, activation, residual) -> str | None:
    """Always ``None``: every device, dtype, activation and residual."""
    return None
