"""``batch_norm``: argument checks, then routing to a backend (:mod:`batchnorm.backends`).

Same signature and semantics as :func:`torch.nn.functional.batch_norm`, plus three keyword-only
arguments: ``activation`` and ``residual`` fuse ``y = activation(BN(x) + residual)``, and
``backend`` chooses the implementation.
"""

from __future__ import annotations

import numbers

import torch

from batchnorm import backends
from batchnorm.activations import check_activation, epilogue
from batchnorm.backends import composite


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Batch Normalization (Ioffe & Szegedy, 2015) over dimension 1 of ``input``.

    In training (``training=True``) each channel ``c`` is normalized with the statistics of its
    ``m = N * prod(spatial)`` values in this mini-batch (Algorithm 1):

    .. math::
        \mu = \frac{1}{m}\sum_i x_i,\quad \sigma^2 = \frac{1}{m}\sum_i (x_i-\mu)^2,\quad
        y_i = \gamma\,\frac{x_i-\mu}{\sqrt{\sigma^2+\epsilon}} + \beta

    and, if ``running_mean``/``running_var`` are given, they are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance
    ``m/(m-1) sigma^2``. In evaluation (``training=False``) BN is the fixed affine map of
    Algorithm 2 built from the running statistics.

    Args:
        input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``, floating point,
            any memory format (channels_last is kept).
        running_mean, running_var: ``(C,)`` or both ``None`` (then only ``training=True`` works).
        weight, bias: ``(C,)`` gamma and beta, or ``None`` for 1 and 0.
        training: normalize with batch statistics (and update the running ones).
        momentum: in ``[0, 1]``, the weight of the new batch in the running averages (checked
            only when it is used: in training with running statistics).
        eps: ``> 0``, added to the variance.
        activation: ``None``, ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"sigmoid"``,
            ``"tanh"`` or ``"silu"``, applied after the residual add.
        residual: a tensor of ``input``'s shape added to BN's output before the activation.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when available, else ``"torch"``),
            ``"torch"`` or ``"triton"``.

    An empty ``input`` (no values per channel) gives an empty output, zero gradients for
    ``weight`` and ``bias`` and leaves the running statistics as they are, as torch does.

    NaN and Inf: BN mixes values only within a channel, so a NaN or Inf in the input makes
    that channel's batch statistics NaN/Inf and hence its whole output (and, in training, its
    running statistics) NaN; other channels are unaffected. This matches ``torch.nn``.
    """
    if isinstance(input, torch.fx.Proxy):  # torch.fx tracing: one node that calls this function
        return input.tracer.create_proxy(
            "call_function", batch_norm, (input, running_mean, running_var, weight, bias,
                                          training, momentum, eps),
            dict(activation=activation, residual=residual, backend=backend))
    empty = untraced(
        check_arguments, input, running_mean, running_var, weight, bias, training, momentum, eps,
        activation, residual,
    )
    if empty:  # as torch: an empty output, zero gradients, statistics untouched
        return epilogue(composite.empty_batch(input, weight, bias), activation, residual)
    impl = backends.resolve(backend, input, weight, training, activation, residual)
    return impl.batch_norm(
        input, running_mean, running_var, weight, bias, bool(training),
        0.0 if momentum is None else float(momentum),  # None only where it is unused
        float(eps), activation, residual,
    )


def untraced(fn, *args):
    """``fn(*args)`` with ``torch.jit.trace`` paused: for checks that read shapes, which the
    tracer would record as tensors (and warn when they are compared). A trace's shapes are
    fixed, so checking them once, while tracing, is all a check can do. (A plain function, not
    a context manager: this runs on every call, where a generator's microsecond shows.)"""
    state = torch._C._get_tracing_state()
    if state is None:
        return fn(*args)
    torch._C._set_tracing_state(None)
    try:
        return fn(*args)
    finally:
        torch._C._set_tracing_state(state)


def check_arguments(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual,
    *, sharded: bool = False,
) -> bool:
    """Raise a clear error naming the argument for anything :func:`batch_norm` cannot take;
    return whether ``input`` is empty (a batch without values, which needs no backend).

    ``sharded=True`` is for a batch split over processes (:class:`batchnorm.SyncBatchNorm`):
    this process's part may then hold fewer than 2 values per channel (even none), and the
    caller checks the count of the whole batch instead.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"batch_norm: input must be floating point, got dtype {input.dtype}")
    if input.dim() < 2 and input.numel():  # an empty 1-D input is an empty batch (as torch)
        raise ValueError(
            f"batch_norm: input must have at least 2 dimensions (N, C, ...), got shape "
            f"{tuple(input.shape)}"
        )
    channels = input.shape[1] if input.dim() >= 2 else 0
    # This runs on every call: a small layer's whole step is ~50 us, so the loop below avoids
    # building a dict and devices (``.device`` makes a new object each time) where it can.
    shape, device, on_cpu = (channels,), None, input.is_cpu
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"batch_norm: {name} must be a tensor or None, got "
                            f"{type(tensor).__name__}")
        if tensor.shape != shape:
            raise ValueError(
                f"batch_norm: {name} must have shape ({channels},) to match the {channels} "
                f"channels of input (dimension 1 of shape {tuple(input.shape)}), got "
                f"{tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"batch_norm: {name} must be floating point, got {tensor.dtype}")
        if on_cpu and tensor.is_cpu:
            continue  # the common case, without making device objects
        device = device or input.device
        if tensor.device != device:
            raise ValueError(
                f"batch_norm: {name} is on {tensor.device} but input is on {input.device}; "
                "all tensors must be on the same device"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: running_mean and running_var must both be tensors or "
                         "both be None")
    if not training and running_mean is None:
        raise ValueError("batch_norm: running_mean and running_var are required when "
                         "training=False (evaluation uses the population statistics)")
    if not (type(eps) is float or isinstance(eps, numbers.Real)) or not eps > 0:
        # "eps must be positive" is torch's wording, which code and tests match on
        raise ValueError(f"batch_norm: eps must be positive (a number > 0 added to the "
                         f"variance, e.g. 1e-5), got {eps!r}")
    # momentum is only used to update running statistics (eval ignores it, as torch does)
    if training and running_mean is not None and not (
            type(momentum) is float and 0.0 <= momentum <= 1.0) and (
            isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
            or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"batch_norm: momentum must be a number in [0, 1], got {momentum!r}")
    if not sharded:
        composite.check_values_per_channel(input, training)
    check_activation(activation, "batch_norm")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"batch_norm: residual must be a tensor or None, got "
                            f"{type(residual).__name__}")
        if residual.shape != input.shape:
            raise ValueError(
                f"batch_norm: residual must have input's shape {tuple(input.shape)}, got "
                f"{tuple(residual.shape)}"
            )
        if residual.device != input.device:
            raise ValueError(f"batch_norm: residual is on {residual.device} but input is on "
                             f"{input.device}")
        if residual.dtype != input.dtype:
            raise TypeError(f"batch_norm: residual must have input's dtype {input.dtype}, got "
                            f"{residual.dtype}")
    return input.numel() == 0


def check_as(who: str, *args, **kwargs) -> None:
    """:func:`check_arguments`, with ``who`` naming the caller in the message instead of
    ``batch_norm`` (for the BN family's functions built on :func:`batch_norm`)."""
    try:
        check_arguments(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("batch_norm:", f"{who}:", 1)) from None
