r"""In-place activated BN (Rota Bulo, Porzi & Kontschieder, "In-Place Activated BatchNorm for
Memory-Optimized Training of DNNs", CVPR 2018, section 3).

BN followed by an invertible activation ``f``, fused so that the backward needs only the output:

.. math::
    y = \gamma\,\hat x + \beta, \quad \hat x = \frac{x - \mu_B}{\sqrt{\sigma^2_B + \epsilon}},
    \quad z = f(y)

Backward from ``z`` alone (section 3): ``y = f^{-1}(z)``, ``dy = dz f'(y)`` (written in ``z``),
``\hat x = (y - \beta) / \gamma``, then BN's closed form

.. math::
    \frac{\partial L}{\partial \beta} = \sum_i dy_i, \quad
    \frac{\partial L}{\partial \gamma} = \sum_i dy_i \hat x_i, \quad
    \frac{\partial L}{\partial x_i} = \frac{\gamma}{\sqrt{\sigma^2_B+\epsilon}} \Big(dy_i
    - \tfrac1m \tfrac{\partial L}{\partial \beta}
    - \tfrac1m \hat x_i \tfrac{\partial L}{\partial \gamma}\Big)

So the layer keeps one full-size tensor, ``z`` (which the next layer usually keeps anyway), and
per-channel numbers, where BN + activation keeps two (BN's input and the activation's). With
``inplace=True`` z is also written over the input's memory (the paper's "in-place"), so the
forward needs no second buffer; the input must then be used by nothing else.

``gamma`` must be non-zero for ``y -> \hat x`` to be invertible: as in the paper the layer uses
``|gamma| + eps`` in place of ``gamma`` (``eps`` is the layer's eps), with the gradient
``sign(gamma) dL/d(|gamma| + eps)`` (0 at gamma = 0, as torch's ``abs``).

Activations: ``"identity"``, ``"leaky_relu"`` with ``negative_slope > 0`` (inverse: slope
``1/negative_slope``), ``"elu"`` with ``alpha > 0`` (inverse ``log1p(z / alpha)`` for z <= 0,
``f'(y) = z + alpha``). ELU's inverse is exact but ill-conditioned for negative ``y``: ``z``
carries ``y`` only to about ``ulp(alpha) e^-y`` (float32: 1e-5 at ``y = -5``, 0.2 at ``y = -15``;
the output saturates to ``-alpha`` at ``y ~ -16.6``, float64 at ``y ~ -36.7``, where the inverse
is clamped). The error enters only ``xhat`` of those elements (``f'(y) = z + alpha`` is taken
from ``z`` directly), and BN's outputs rarely go below -10, so gradients stay accurate (tested).
``relu`` (and ``silu``) are not injective, so ``y`` cannot be
recovered; ``sigmoid`` and ``tanh`` are injective but saturate to 1 in floating point from
``|y| ~ 9`` (float32), losing ``y`` there: all four raise ValueError.

Implementation: on the CPU (float32/float64) the variants' fused kernels
(:mod:`batchnorm.backends.family`): statistics in one pass, the affine map and activation in
another; the backward's two per-channel sums in one pass over ``(z, dz)``, ``dx`` in a second,
recovering ``y`` per element. Elsewhere :class:`InPlaceABNFunction` does the same in ATen
operations. Either saves only ``z``, the (raw) weight, the bias and the per-channel ``1/sqrt(var +
eps)``.

Double backward is supported: the backward is written in differentiable operations of the
saved output ``z`` and the per-channel ``1/sqrt(var + eps)``, which the Function also returns,
so that autograd differentiates through them back to ``x`` (tested with gradgradcheck).

Evaluation uses the running statistics: ``z = f(|gamma| + eps) (x - mean) / sqrt(var + eps)
+ beta)``, an affine map and the activation (:meth:`_InPlaceABN.fold_parts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.backends import family as _kernels
from batchnorm.variants._core import (
    BatchNormBase,
    batch_norm,
    check_as,
    is_number,
    per_channel,
    reduce_dims,
    statistics_arguments,
)

INVERTIBLE = ("identity", "leaky_relu", "elu")
_NOT_INVERTIBLE = {
    "relu": "it maps every negative input to 0, so BN's output cannot be recovered from it",
    "silu": "it is not one-to-one (it has a minimum near -1.28)",
    "sigmoid": "it saturates to exactly 0 or 1 in floating point for large |y|",
    "tanh": "it saturates to exactly -1 or 1 in floating point for large |y|",
}


def check_activation_args(who: str, activation, negative_slope, alpha) -> None:
    if activation in _NOT_INVERTIBLE:
        raise ValueError(
            f"{who}: activation={activation!r} is not invertible: {_NOT_INVERTIBLE[activation]}. "
            f"In-place ABN recovers BN's output from the activation's, so it needs one of "
            f"{INVERTIBLE} (e.g. activation='leaky_relu', negative_slope=0.01); for "
            f"{activation} use batchnorm.BatchNorm2d(..., activation={activation!r}) instead")
    if activation not in INVERTIBLE:
        raise ValueError(f"{who}: activation must be one of {INVERTIBLE}, got {activation!r}")
    if not is_number(negative_slope) or not 0 < negative_slope < float("inf"):
        raise ValueError(f"{who}: negative_slope must be a finite number > 0 (0 would be ReLU, "
                         f"which is not invertible), got {negative_slope!r}")
    if not is_number(alpha) or not 0 < alpha < float("inf"):
        raise ValueError(f"{who}: alpha must be a finite number > 0, got {alpha!r}")


def _activate_(y, act: str, slope: float, alpha: float):
    if act == "leaky_relu":
        return F.leaky_relu_(y, slope)
    if act == "elu":
        return F.elu_(y, alpha)
    return y


def _invert(z, dz, act: str, slope: float, alpha: float):
    """``(y, dy)``: ``y = f^-1(z)`` and ``dy = dz f'(y)`` with ``f'`` written in ``z`` (``dy`` is
    None when ``dz`` is), in differentiable operations."""
    if act == "leaky_relu":
        positive = z >= 0
        dy = None if dz is None else torch.where(positive, dz, dz * slope)
        return torch.where(positive, z, z / slope), dy
    if act == "elu":
        positive = z > 0
        floor = torch.finfo(z.dtype).eps - 1.0  # keep log1p finite where the output saturated
        negative = torch.log1p((z / alpha).clamp(min=floor))
        dy = None if dz is None else torch.where(positive, dz, dz * (z + alpha))
        return torch.where(positive, z, negative), dy
    return z, dz


class InPlaceABNFunction(torch.autograd.Function):
    """Training-mode BN (weight = the positive effective gamma) + activation; saves only the
    output and per-channel values. Returns ``(z, invstd)``: ``invstd`` is returned so that a
    double backward can differentiate through it (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, act, slope,
                alpha, inplace):
        dims = reduce_dims(x)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x if x.dtype == dtype else x.to(dtype)
        mean = xc.mean(dims)
        var = (xc - per_channel(mean, xc)).square_().mean(dims)
        invstd = (var + eps).rsqrt_()
        scale = invstd if weight is None else weight.to(dtype) * invstd
        shift = -mean * scale if bias is None else bias.to(dtype) - mean * scale
        if inplace:
            z = x.mul_(per_channel(scale.to(x.dtype), x)).add_(per_channel(shift.to(x.dtype), x))
            ctx.mark_dirty(x)
        else:
            z = torch.addcmul(per_channel(shift, xc), xc, per_channel(scale, xc)).to(x.dtype)
        z = _activate_(z, act, slope, alpha)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
        ctx.act, ctx.slope, ctx.alpha = act, slope, alpha
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, weight, bias, invstd)
        return z, invstd

    @staticmethod
    def backward(ctx, dz, dinvstd):
        z, weight, bias, invstd = ctx.saved_tensors
        dx, dgamma, dbeta = abn_backward(dz, dinvstd, z, weight, bias, invstd, ctx.act,
                                         ctx.slope, ctx.alpha)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dgamma if need[1] else None,
                dbeta if need[2] else None) + (None,) * 8


def abn_backward(dz, dinvstd, z, weight, bias, invstd, act: str, slope: float, alpha: float):
    """``(dx, dgamma, dbeta)`` from the output ``z`` (differentiable operations throughout).

    ``dinvstd`` (or None) is the gradient reaching the returned ``invstd``; with
    ``dinvstd/dx_i = -invstd^2 xhat_i / m`` it adds ``-dinvstd invstd^2 xhat / m`` to dx.
    """
    dtype = invstd.dtype
    zc = z.to(dtype)
    m = z.numel() // z.shape[1]
    dims = reduce_dims(z)
    y, dy = _invert(zc, None if dz is None else dz.to(dtype), act, slope, alpha)
    gamma = torch.ones_like(invstd) if weight is None else weight.to(dtype)
    centered = y if bias is None else y - per_channel(bias.to(dtype), y)  # gamma * xhat
    dx = dgamma = dbeta = None
    if dz is not None:
        dbeta = dy.sum(dims)
        dgamma = (dy * centered).sum(dims) / gamma
        gain = gamma * invstd
        dx = (per_channel(gain, dy) * dy
              - per_channel(invstd * dgamma / m, dy) * centered
              - per_channel(gain * dbeta / m, dy))
    if dinvstd is not None:
        extra = -per_channel(dinvstd * invstd.square() / (m * gamma), centered) * centered
        dx = extra if dx is None else dx + extra
    param = weight.dtype if weight is not None else z.dtype
    return (None if dx is None else dx.to(z.dtype),
            None if dgamma is None else dgamma.to(param),
            None if dbeta is None else dbeta.to(param))


def effective_gamma(weight, eps: float):
    """``|gamma| + eps`` (section 3): non-zero, so that ``xhat = (y - beta) / gamma``."""
    return None if weight is None else weight.abs() + eps


def inplace_activated_batch_norm(
        input, running_mean, running_var, weight=None, bias=None, training: bool = False,
        momentum: float = 0.1, eps: float = 1e-5, *, activation: str = "leaky_relu",
        negative_slope: float = 0.01, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``f(BN(x))`` with ``|weight| + eps`` as gamma; in training only the output is saved for
    the backward (see the module docstring). Arguments as
    :func:`batchnorm.functional.batch_norm` (``weight`` is the raw gamma), plus the activation
    (``"identity"``, ``"leaky_relu"`` with ``negative_slope``, ``"elu"`` with ``alpha``) and
    ``inplace`` (write the output over ``input``, when it is contiguous or channels-last).

    On the CPU (float32, float64) this runs the fused kernels of
    :mod:`batchnorm.backends.family`, elsewhere :class:`InPlaceABNFunction` (ATen operations);
    both compute the formulas above."""
    who = "inplace_activated_batch_norm"
    check_as(who, input, running_mean, running_var, weight, bias, training, momentum, eps,
             None, None)
    check_activation_args(who, activation, negative_slope, alpha)
    if training:  # the fused kernels take the raw weight and use |weight| + eps themselves
        z = _kernels.abn_train(input, weight, bias, running_mean, running_var, momentum, eps,
                               activation, negative_slope, alpha, inplace)
        if z is not None:
            return z
    gamma = effective_gamma(weight, eps)
    if not training:
        y = batch_norm(input, running_mean, running_var, gamma, bias, False, 0.0, eps,
                       backend="torch")
        return _activate_(y, activation, negative_slope, alpha)
    z, _ = InPlaceABNFunction.apply(input, gamma, bias, running_mean, running_var,
                                    float(momentum), float(eps), activation,
                                    float(negative_slope), float(alpha), bool(inplace))
    return z


class _InPlaceABN:
    """BN + invertible activation as one layer; subclasses ``torch.nn.BatchNorm1d/2d/3d`` (same
    parameters, buffers, state_dict keys; ``isinstance(m, nn.BatchNorm2d)`` holds, so
    :func:`batchnorm.recalibrate` works). ``weight`` is the raw gamma; the layer uses
    ``|weight| + eps``."""

    _expected_dims: tuple[int, ...]

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, activation: str = "leaky_relu", negative_slope: float = 0.01,
                 alpha: float = 1.0, inplace: bool = False):
        check_activation_args(type(self).__name__, activation, negative_slope, alpha)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation, self.negative_slope, self.alpha = activation, negative_slope, alpha
        self.inplace = bool(inplace)

    _check_input_dim = BatchNormBase._check_input_dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = statistics_arguments(
            self.training, self.track_running_stats, self.momentum, self.running_mean,
            self.running_var, self.num_batches_tracked)
        return inplace_activated_batch_norm(
            input, running_mean, running_var, self.weight,
            self.bias, use_batch_stats, factor, self.eps, activation=self.activation,
            negative_slope=self.negative_slope, alpha=self.alpha, inplace=self.inplace)

    def activation_module(self) -> nn.Module | None:
        """The activation as a module (None for identity)."""
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        return nn.ELU(self.alpha) if self.activation == "elu" else None

    def fold_parts(self):
        """``(scale, shift, activation module or None)`` of the inference map, in float64:
        ``z = act(scale x + shift)``; for :func:`batchnorm.fold`."""
        gamma = effective_gamma(self.weight, self.eps)
        invstd = torch.rsqrt(self.running_var.double() + self.eps)
        scale = invstd if gamma is None else gamma.detach().double() * invstd
        shift = -self.running_mean.double() * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift, self.activation_module()

    def frozen_parts(self):
        """``(weight, bias, activation)`` for a FrozenBatchNorm with this inference map."""
        gamma = effective_gamma(self.weight, self.eps)
        return (None if gamma is None else gamma.detach(), self.bias, self.activation_module())

    @staticmethod
    def weight_from_frozen(weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The raw gamma whose ``|gamma| + eps`` is a frozen layer's weight."""
        return (weight - eps).clamp_min(0.0)

    def variant_kwargs(self) -> dict:
        return dict(activation=self.activation, negative_slope=self.negative_slope,
                    alpha=self.alpha, inplace=self.inplace)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        if self.activation == "elu":
            text += f", alpha={self.alpha}"
        return text + (", inplace=True" if self.inplace else "")


class InPlaceABN1d(_InPlaceABN, nn.BatchNorm1d):
    """In-place activated BN over ``(N, C)`` or ``(N, C, L)`` input.

    Args as ``torch.nn.BatchNorm1d``, plus keyword-only ``activation`` (``"leaky_relu"``,
    ``"elu"`` or ``"identity"``), ``negative_slope`` (leaky ReLU, > 0), ``alpha`` (ELU, > 0) and
    ``inplace`` (overwrite the input with the output)."""

    _expected_dims = (2, 3)


class InPlaceABN2d(_InPlaceABN, nn.BatchNorm2d):
    """In-place activated BN over ``(N, C, H, W)`` input; arguments as :class:`InPlaceABN1d`."""

    _expected_dims = (4,)


class InPlaceABN3d(_InPlaceABN, nn.BatchNorm3d):
    """In-place activated BN over ``(N, C, D, H, W)`` input; arguments as
    :class:`InPlaceABN1d`."""

    _expected_dims = (5,)
