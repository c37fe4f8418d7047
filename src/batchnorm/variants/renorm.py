r"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence
in Batch-Normalized Models", NeurIPS 2017).

Training (Algorithm 1, section 3), per channel over the ``m`` values of the mini-batch, with the
moving averages ``mu`` and ``sigma`` as they were before this step:

.. math::
    \mu_B = \tfrac1m \textstyle\sum_i x_i, \qquad
    \sigma_B = \sqrt{\epsilon + \tfrac1m \textstyle\sum_i (x_i - \mu_B)^2} \\
    r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma)\big), \qquad
    d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma)\big) \\
    \hat x_i = \frac{x_i - \mu_B}{\sigma_B}\, r + d, \qquad y_i = \gamma \hat x_i + \beta \\
    \mu \mathrel{+}= \alpha (\mu_B - \mu), \qquad \sigma \mathrel{+}= \alpha (\sigma_B - \sigma)

``sg`` is stop_gradient: r and d are constants in the backward. Inference is
``y = gamma (x - mu) / sigma + beta``, BN's affine map. ``r_max = 1, d_max = 0`` is exactly BN.

Implementation: with r and d fixed, ``y = (gamma r) xhat_B + (gamma d + beta)`` is plain BN with
weight ``gamma r`` and bias ``gamma d + beta``, so BN's closed-form backward with that weight gives
exactly the paper's gradients: ``dx`` of BN with weight ``gamma r``, ``dgamma = r dw' + d db'``,
``dbeta = db'`` (section 3's formulas; tested against :mod:`batchnorm.variants.reference`). On
the CPU (float32/float64) the variants' fused kernels do this in one call (statistics once,
r, d and the moving averages in C++, :mod:`batchnorm.backends.family`); elsewhere the batch
statistics are taken without gradient and :func:`batchnorm.functional.batch_norm` runs with the
effective weight and bias, autograd supplying ``dgamma = r dw' + d db'``. Double backward works on
both paths (r and d constants).

Moving averages and torch's buffers. ``running_mean`` holds mu. ``running_var`` holds
``sigma^2 - eps``, so that BN's inference map ``(x - running_mean) / sqrt(running_var + eps)``
is the paper's ``(x - mu) / sigma``; eval mode, :func:`batchnorm.fold`, ``convert(to="torch")``
and :func:`batchnorm.recalibrate` (whose population variance is the same quantity) then work
unchanged. The update is the paper's, on sigma: ``sigma = sqrt(running_var + eps)`` is moved
towards ``sigma_B`` and stored back as ``sigma^2 - eps`` (``running_average="sigma"``, the
default). ``running_average="var"`` keeps torch's BN update instead (the unbiased batch
variance averaged into ``running_var``), with which r_max = 1, d_max = 0 reproduces BN's running
statistics as well as its outputs. ``momentum`` is alpha; the default 0.01 is the paper's
(section 4). ``momentum=None`` is the cumulative average.

The r_max / d_max schedule (section 4): BN (r_max = 1, d_max = 0) for the first 5000 steps,
then relaxed to reach r_max = 3 at 40k steps and d_max = 5 at 25k steps; "gradually relaxed" is
read as a linear ramp (:func:`renorm_schedule`, the modules' default). A module's step is its
``num_batches_tracked`` before the call (0 for the first training batch), saved in state_dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.backends import family as _kernels
from batchnorm.variants._core import (
    OURS,
    TORCH_BATCHNORMS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    averaging_factor,
    batch_norm,
    batch_statistics,
    check_as,
    epilogue,
    is_number,
    rebuild,
    replace,
)

RENORM_MOMENTUM = 0.01  # alpha in the paper's experiments (section 4)
RUNNING_AVERAGES = ("sigma", "var")


@dataclass(frozen=True)
class RampSchedule:
    """``start`` up to step ``warmup``, then linear to ``end`` at step ``reach``, then ``end``."""

    start: float
    end: float
    warmup: int
    reach: int

    def __call__(self, step: int) -> float:
        if step <= self.warmup:
            return self.start
        if step >= self.reach:
            return self.end
        return self.start + (self.end - self.start) * (step - self.warmup) / (
            self.reach - self.warmup)


def renorm_schedule(r_max: float = 3.0, d_max: float = 5.0, *, warmup: int = 5000,
                    r_max_step: int = 40_000, d_max_step: int = 25_000) -> dict[str, RampSchedule]:
    """The paper's schedule (section 4) as ``{"r_max": ..., "d_max": ...}`` callables of the step:
    BN for ``warmup`` steps, then a linear ramp to ``r_max`` at ``r_max_step`` and to ``d_max``
    at ``d_max_step``. Use as ``BatchRenorm2d(64, **renorm_schedule(warmup=500, ...))``."""
    if not is_number(r_max) or r_max < 1:
        raise ValueError(f"renorm_schedule: r_max must be a number >= 1, got {r_max!r}")
    if not is_number(d_max) or d_max < 0:
        raise ValueError(f"renorm_schedule: d_max must be a number >= 0, got {d_max!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"renorm_schedule: warmup must be an int >= 0, got {warmup!r}")
    for name, step in (("r_max_step", r_max_step), ("d_max_step", d_max_step)):
        if not isinstance(step, int) or step <= warmup:
            raise ValueError(f"renorm_schedule: {name} must be an int > warmup={warmup}, got "
                             f"{step!r}")
    return {"r_max": RampSchedule(1.0, float(r_max), warmup, r_max_step),
            "d_max": RampSchedule(0.0, float(d_max), warmup, d_max_step)}


PAPER_SCHEDULE = renorm_schedule()


def check_bounds(who: str, r_max, d_max) -> None:
    if not is_number(r_max) or not r_max >= 1:
        raise ValueError(f"{who}: r_max must be a number >= 1 (1 is plain BN), got {r_max!r}")
    if not is_number(d_max) or not d_max >= 0:
        raise ValueError(f"{who}: d_max must be a number >= 0 (0 is plain BN), got {d_max!r}")


@torch.no_grad()
def renorm_corrections(mean_b, var_b, running_mean, running_var, r_max: float, d_max: float,
                       eps: float):
    """``(r, d)`` of Algorithm 1 from the batch's mean and biased variance and the moving
    averages (``sigma = sqrt(running_var + eps)``), in the statistics' dtype."""
    sigma = (running_var.to(var_b.dtype) + eps).sqrt_()
    r = (var_b + eps).sqrt_().div_(sigma).clamp_(1.0 / r_max, r_max)
    d = (mean_b - running_mean.to(mean_b.dtype)).div_(sigma).clamp_(-d_max, d_max)
    return r, d


@torch.no_grad()
def update_moving_averages(running_mean, running_var, mean_b, var_b, count: int, alpha: float,
                           eps: float, running_average: str) -> None:
    """Algorithm 1's updates in place: ``mu += alpha (mu_B - mu)`` and, for ``"sigma"``,
    ``sigma += alpha (sigma_B - sigma)`` stored as ``running_var = sigma^2 - eps``; for
    ``"var"``, torch's ``running_var += alpha (m/(m-1) var_B - running_var)``."""
    running_mean.lerp_(mean_b.to(running_mean.dtype), alpha)
    if running_average == "var":
        running_var.lerp_((var_b * (count / (count - 1))).to(running_var.dtype), alpha)
        return
    sigma = (running_var.to(var_b.dtype) + eps).sqrt_()
    sigma.lerp_((var_b + eps).sqrt_(), alpha)
    running_var.copy_(sigma.square_().sub_(eps).clamp_(min=0.0))


def batch_renorm(input, running_mean, running_var, weight=None, bias=None,
                 training: bool = False, momentum: float = RENORM_MOMENTUM, eps: float = 1e-5, *,
                 r_max: float, d_max: float, running_average: str = "sigma",
                 activation: str | None = None, residual: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Batch Renormalization over dimension 1 of ``input`` (see the module docstring).

    Arguments as :func:`batchnorm.functional.batch_norm`, plus ``r_max >= 1`` and
    ``d_max >= 0`` (numbers; the modules resolve schedules) and ``running_average``
    (``"sigma"``, the paper's, or ``"var"``, torch's). ``running_mean`` and ``running_var``
    are required: training normalizes with them too. In training they are updated in place
    (after r and d are computed from their old values).
    """
    who = "batch_renorm"
    check_as(who, input, running_mean, running_var, weight, bias, training, momentum, eps,
             activation, residual)
    if running_mean is None:
        raise ValueError(f"{who}: running_mean and running_var are required: Batch "
                         "Renormalization uses the moving averages in training too (r and d)")
    check_bounds(who, r_max, d_max)
    if running_average not in RUNNING_AVERAGES:
        raise ValueError(f"{who}: running_average must be one of {RUNNING_AVERAGES}, got "
                         f"{running_average!r}")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps,
                          activation=activation, residual=residual, backend=backend)
    if backend in ("auto", "torch"):  # the fused CPU kernels, when they take the input
        y = _kernels.grouped_train(input, weight, bias, running_mean, running_var,
                                   [input.shape[0]], [momentum or 0.0], eps, renorm=True,
                                   r_max=r_max, d_max=d_max,
                                   sigma_average=running_average == "sigma")
        if y is not None:
            return epilogue(y, activation, residual)
    mean_b, var_b = batch_statistics(input.detach())
    r, d = renorm_corrections(mean_b, var_b, running_mean, running_var, r_max, d_max, eps)
    if momentum:
        count = input.numel() // input.shape[1]
        update_moving_averages(running_mean, running_var, mean_b, var_b, count, momentum, eps,
                               running_average)
    weight_r, bias_d = effective_affine(weight, bias, r, d)
    return batch_norm(input, None, None, weight_r, bias_d, True, 0.0, eps,
                      activation=activation, residual=residual, backend=backend)


def effective_affine(weight, bias, r, d):
    """``(gamma r, gamma d + beta)``: BN's weight and bias that make BN compute renorm's
    ``gamma (r xhat_B + d) + beta``; autograd through them gives ``dgamma = r dw' + d db'``."""
    dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else r.dtype)
    r, d = r.to(dtype), d.to(dtype)
    if weight is None:
        return r, d if bias is None else bias + d
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


Bound = float | Callable[[int], float]


class _RenormMixin:
    """Renorm's forward over our BN modules: subclasses of ``batchnorm.BatchNorm*d`` (and so of
    ``torch.nn.BatchNorm*d``), with the same parameters, buffers and state_dict keys."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = RENORM_MOMENTUM,
        affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
        r_max: Bound = PAPER_SCHEDULE["r_max"], d_max: Bound = PAPER_SCHEDULE["d_max"],
        running_average: str = "sigma", activation: str | None = None, backend: str = "auto",
    ):
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(f"{name}: track_running_stats must be True: Batch Renormalization "
                             "normalizes with the moving averages in training (r and d)")
        if running_average not in RUNNING_AVERAGES:
            raise ValueError(f"{name}: running_average must be one of {RUNNING_AVERAGES}, got "
                             f"{running_average!r}")
        for bound, value in (("r_max", r_max), ("d_max", d_max)):
            if not (callable(value) or is_number(value)):
                raise TypeError(f"{name}: {bound} must be a number or a callable of the step "
                                f"(e.g. renorm_schedule()[{bound!r}]), got {value!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, activation=activation, backend=backend)
        self.r_max, self.d_max, self.running_average = r_max, d_max, running_average
        self.bounds(0)  # a fixed bound out of range fails here, not at the first step

    def bounds(self, step: int | None = None) -> tuple[float, float]:
        """``(r_max, d_max)`` at ``step`` (default: the coming training step)."""
        if step is None:
            step = int(self.num_batches_tracked)
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        check_bounds(f"{type(self).__name__} (step {step})", r_max, d_max)
        return float(r_max), float(d_max)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return super().forward(input, residual)
        self._check_input_dim(input)
        buffers, params = self._buffers, self._parameters  # dicts: see averaging_factor
        if callable(self.r_max) or callable(self.d_max):  # a schedule: needs the step
            r_max, d_max = self.bounds(int(buffers["num_batches_tracked"]))
        else:  # fixed bounds, checked by batch_renorm
            r_max, d_max = self.r_max, self.d_max
        factor = averaging_factor(self)
        return batch_renorm(
            input, buffers["running_mean"], buffers["running_var"], params["weight"],
            params["bias"], True, factor, self.eps, r_max=r_max, d_max=d_max,
            running_average=self.running_average, activation=self.activation,
            residual=residual, backend=self.backend,
        )

    def variant_kwargs(self) -> dict:
        """The constructor arguments beyond BN's (for rebuilding this layer)."""
        return dict(r_max=self.r_max, d_max=self.d_max, running_average=self.running_average)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max!r}, d_max={self.d_max!r}, "
                f"running_average={self.running_average!r}")


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` input; inference as
    ``torch.nn.BatchNorm1d``. Arguments as :class:`batchnorm.BatchNorm1d`, default
    ``momentum=0.01`` (the paper's alpha), plus keyword-only ``r_max``, ``d_max`` (numbers or
    callables of the step; default the paper's schedule, :func:`renorm_schedule`) and
    ``running_average`` (``"sigma"`` or ``"var"``, see the module docstring)."""

    _expected_dims = (2, 3)


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    """Batch Renormalization over ``(N, C, H, W)`` input; arguments as :class:`BatchRenorm1d`."""

    _expected_dims = (4,)


class BatchRenorm3d(_RenormMixin, BatchNorm3d):
    """Batch Renormalization over ``(N, C, D, H, W)`` input; arguments as
    :class:`BatchRenorm1d`."""

    _expected_dims = (5,)


_BY_RANK = {nn.BatchNorm1d: BatchRenorm1d, nn.BatchNorm2d: BatchRenorm2d,
            nn.BatchNorm3d: BatchRenorm3d}
_KEEP = object()


def to_renorm(model: nn.Module, *, r_max: Bound = PAPER_SCHEDULE["r_max"],
              d_max: Bound = PAPER_SCHEDULE["d_max"], running_average: str = "sigma",
              momentum=_KEEP) -> nn.Module:
    """Replace every plain ``BatchNorm1d/2d/3d`` (torch's or ours; other variants stay) in
    ``model`` by the BatchRenorm of the same rank, in place; returns the model (or the
    replacement if ``model`` is one).

    Parameters and buffers are shared, not copied (an optimizer built before keeps working);
    mode, eps, affine, fused activation and backend carry over, and so does momentum unless
    ``momentum=`` is given (the paper used 0.01). The running statistics keep their meaning:
    ``sqrt(running_var + eps)`` is renorm's sigma. Layers with ``track_running_stats=False``
    cannot be renormalized (ValueError). This is ``batchnorm.convert(model, to="renorm")``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_renorm: model must be a torch.nn.Module, got {type(model).__name__}")
    plain = (*TORCH_BATCHNORMS, *OURS.values())  # not the other variants (ghost, in-place ABN)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in plain and getattr(m, "ghost_batch_size", None) is None]
    for name, module in targets:
        if not module.track_running_stats:
            raise ValueError(f"to_renorm: BN layer {name or 'model'!r} has "
                             "track_running_stats=False; Batch Renormalization needs moving "
                             "averages")
        cls = next(c for base, c in _BY_RANK.items() if isinstance(module, base))
        extra = {}
        if isinstance(module, BatchNormBase):
            extra = dict(activation=module.activation, backend=module.backend)
        new = rebuild(module, cls, r_max=r_max, d_max=d_max, running_average=running_average,
                      **extra)
        if momentum is not _KEEP:
            new.momentum = momentum
        if not name:
            return new
        replace(model, name, new)
    return model
