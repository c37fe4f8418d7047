r"""BN as plain differentiable ATen operations, in the Python subset that TorchScript compiles.

The ``"torch"`` backend's form for the tools that must *see* every operation, where neither
the fused C++ kernels (opaque, writing through raw pointers) nor an autograd Function fits:

* ``torch.compile`` and ``torch.export`` (``torch.compiler.is_compiling()``): Dynamo refuses
  autograd Functions with a custom ``jvp``, and the operations below are what Inductor fuses
  into a few loops (forward and the autograd-derived backward);
* ``torch.jit.trace``: the trace records these operations, so a traced training step is right
  and can be saved (the C++ kernels' writes are invisible to the tracer);
* ``torch.jit.script``: the scripted layers' ``forward`` (:mod:`batchnorm.modules`).

Training is Algorithm 1 with ``var_mean`` (a Welford/two-pass reduction, never
``E[x^2] - E[x]^2``), statistics in float32 at least; the running statistics are updated in
place with the unbiased ``m/(m-1)`` variance, outside autograd. Evaluation is
``torch.nn.functional.batch_norm``'s operation with the running statistics (Algorithm 2's
affine map): the ONNX exporter emits it as ``BatchNormalization`` and folds it into a
preceding convolution, and Inductor folds it the same way, exactly as for ``torch.nn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchnorm.statistics import cast, compute_dtype, per_channel, reduce_dims


def empty_batch(x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
    """BN of an input without values, as torch's: an empty output, still connected to
    ``weight`` and ``bias`` so that their gradients are zeros; no statistics to update.
    (A 1-D empty input has no channels: torch accepts it too.)"""
    y = x.clone()
    if x.dim() < 2:
        return y
    if weight is not None:
        y = y * per_channel(cast(weight, y.dtype), y)
    if bias is not None:
        y = y + per_channel(cast(bias, y.dtype), y)
    return y


def check_values_per_channel(x: torch.Tensor, training: bool) -> None:
    """Batch statistics need 2 values per channel or more (or none: an empty batch)."""
    if x.dim() < 2 or x.shape[1] == 0:
        return
    per_channel_values = x.numel() // x.shape[1]
    if training and per_channel_values == 1:
        raise ValueError(  # "Expected more ... when training" is torch's wording
            f"batch_norm: Expected more than 1 value per channel when training, got input of "
            f"shape {x.shape} (1 per channel); batch statistics need at least 2 values per "
            "channel"
        )


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None,
               running_var: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, training: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """Training (batch statistics, running ones updated in place when given) or evaluation
    (``running_mean``/``running_var`` required) BN of a non-empty ``x``; arguments as
    :func:`batchnorm.functional.batch_norm`, checked by the caller (:func:`empty_batch` is for
    an empty ``x``). No shape enters a condition, so a trace holds no shape-dependent branch."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    count = x.numel() // x.shape[1]
    xc = cast(x, compute_dtype(x))
    var, mean = torch.var_mean(xc, reduce_dims(x), correction=0, keepdim=True)
    y = (xc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * per_channel(cast(weight, y.dtype), y)
    if bias is not None:
        y = y + per_channel(cast(bias, y.dtype), y)
    if running_mean is not None and running_var is not None:
        batch_mean = mean.detach().reshape(-1)
        # var * count / (count - 1), not var * (count / (count - 1)): under torch.jit.trace
        # count is a traced integer tensor, whose true division would round to float32
        batch_var = var.detach().reshape(-1) * count / (count - 1)
        running_mean.lerp_(cast(batch_mean, running_mean.dtype), momentum)
        running_var.lerp_(cast(batch_var, running_var.dtype), momentum)
    return cast(y, x.dtype)
