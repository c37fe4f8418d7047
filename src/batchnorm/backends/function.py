r"""Training BN as a composable autograd Function: closed-form backward, ``jvp``, vmap rule.

The ``"torch"`` backend's form for everything the fused C++ kernels do not take: other dtypes
and devices, and the transforms that need more than a first-order backward of plain tensors:
``torch.func`` (``grad``, ``vjp``, ``jvp``, ``vmap``, model ensembling), forward-mode AD
(``torch.autograd.forward_ad``), batched gradients (``is_grads_batched=True``,
``jacobian(vectorize=True)``, ``gradcheck``'s batched checks) and dispatch modes (fake tensors).

Forward, per channel over the ``m`` values of the batch (statistics in float32 at least)::

    mu, var = mean and biased variance   (two passes: no E[x^2] - E[x]^2)
    xhat    = (x - mu) / sqrt(var + eps),   y = gamma * xhat + beta

Backward, the paper's chain rule collapsed into two per-channel reductions::

    dbeta  = sum(dy),   dgamma = sum(dy * xhat)
    dx     = gamma / (m sqrt(var + eps)) * (m dy - dbeta - xhat * dgamma)

Forward-mode (``jvp``), with ``mean`` over the channel's values::

    dxhat = invstd * (dx - mean(dx) - xhat * mean(dx * xhat))
    dy    = gamma * dxhat + dgamma * xhat + dbeta

The Function is written in the ``setup_context`` style with ``generate_vmap_rule = True``, so
``torch.func`` transforms it; the running statistics are updated in place inside ``forward``,
so a transform sees the mutation at the operation (under ``vmap`` with running statistics
this fails as it does for ``torch.nn``: see ``torch.func.replace_all_batch_norm_modules_``).
When a second derivative is requested (``create_graph=True``), the backward recomputes the
statistics from ``x`` inside the graph, so double backward is exact.
"""

from __future__ import annotations

import torch

from batchnorm.statistics import cast, centered_statistics, per_channel, reduce_dims


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


def update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """``running = (1 - momentum) running + momentum batch``, with the unbiased
    ``count/(count-1)`` variance, in place."""
    if _is_batched(mean) and not _is_batched(running_mean):
        raise RuntimeError(
            "batch_norm: got an input batched by torch.func.vmap while running_mean and "
            "running_var, which are updated in place, are not batched (torch.nn's BN refuses "
            "this too). Use track_running_stats=False, or torch.func.replace_all_batch_norm_"
            "modules_(model) to stop updating them, or vmap over stacked buffers as well."
        )
    running_mean.lerp_(cast(mean, running_mean.dtype), momentum)
    running_var.lerp_(cast(var * (count / (count - 1)), running_var.dtype), momentum)


_is_batched = torch._C._functorch.is_batchedtensor


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN in ATen operations. ``apply`` returns ``(y, mean, invstd)``; the
    statistics are non-differentiable outputs (the backward and ``jvp`` read them)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps):
        mean, var, centered = centered_statistics(x)
        invstd = (var + eps).rsqrt()
        # y = gamma * invstd * (x - mu) + beta, in place on the centered copy
        scale = invstd if weight is None else cast(weight, invstd.dtype) * invstd
        y = centered.mul_(per_channel(scale, centered))
        if bias is not None:
            y = y.add_(per_channel(cast(bias, y.dtype), y))
        if running_mean is not None:
            update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1],
                           momentum)
        return cast(y, x.dtype), mean, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _running_mean, _running_var, _momentum, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        # x, not x - mu, is saved: the same memory as torch's BN; backward re-centers it.
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # Double backward: the statistics depend on x, so rebuild them inside the graph.
            mean, var, centered = centered_statistics(x)
            invstd = (var + ctx.eps).rsqrt()
        else:
            centered = cast(x, invstd.dtype) - per_channel(mean, x)
        dx, dgamma, dbeta = closed_form_backward(dy, centered, weight, invstd)
        param_dtype = weight.dtype if weight is not None else dbeta.dtype
        return (
            dx if need_x else None,
            cast(dgamma, param_dtype) if need_w else None,
            cast(dbeta, param_dtype) if need_b else None,
            None, None, None, None,
        )

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _drunning_mean, _drunning_var, _dmomentum, _deps):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = reduce_dims(x)
        xhat = (cast(x, invstd.dtype) - per_channel(mean, x)) * per_channel(invstd, x)
        dy = torch.zeros_like(xhat)
        if dx is not None:
            dxc = cast(dx, invstd.dtype)
            dxhat = dxc - per_channel(dxc.mean(dims), dxc)
            dxhat = dxhat - xhat * per_channel((dxc * xhat).mean(dims), dxc)
            gain = invstd if weight is None else cast(weight, invstd.dtype) * invstd
            dy = dxhat * per_channel(gain, dxhat)
        if dweight is not None:
            dy = dy + xhat * per_channel(cast(dweight, xhat.dtype), xhat)
        if dbias is not None:
            dy = dy + per_channel(cast(dbias, dy.dtype), dy)
        return cast(dy, x.dtype), None, None
