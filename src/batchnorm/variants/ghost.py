r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, "Train longer, generalize better: closing
the generalization gap in large batch training of neural networks", NeurIPS 2017, section 4).

A mini-batch of ``N`` samples is split along dimension 0 into virtual ("ghost") batches of
``g = ghost_batch_size`` samples, and each is normalized with its own statistics (the paper's
Algorithm 1), per channel over its ``m_l = n_l * prod(spatial)`` values:

.. math::
    \mu_l = \tfrac{1}{m_l} \textstyle\sum_{i \in l} x_i, \qquad
    \sigma^2_l = \tfrac{1}{m_l} \textstyle\sum_{i \in l} (x_i - \mu_l)^2, \qquad
    y_i = \gamma \frac{x_i - \mu_l}{\sqrt{\sigma^2_l + \epsilon}} + \beta \quad (i \in l)

so the gradient of each sample flows only through its own virtual batch's statistics, and
``dgamma``, ``dbeta`` sum over all virtual batches. Inference is BN's affine map with the
running statistics.

The last virtual batch. ``N = q g + r`` with ``0 < r < g``: the remainder joins the last
virtual batch (``g + r`` samples) rather than forming a batch of ``r < g`` samples, whose
statistics would be noisier than the ``g`` asked for (and undefined for ``r = 1`` without
spatial dimensions). ``N <= g`` is one batch: plain BN. :func:`ghost_batch_sizes` gives the
sizes; ``ghost_batch_size=N`` is exactly BN.

Running statistics. Algorithm 1 folds every virtual batch's statistics into the moving
averages with the momentum; here the update is applied once per virtual batch, in order, as
torch's BN does for a batch (mean, and the unbiased variance ``m_l/(m_l-1) sigma^2_l``):
after one step of ``k`` virtual batches
``running = (1-a)^k running + sum_l a (1-a)^(k-l) stat_l``. This is what running BN on the
virtual batches one after another gives (the authors' own experiments ran BN on chunks of the
batch). ``momentum=None`` is the cumulative average over all virtual batches, so the modules'
``num_batches_tracked`` counts virtual batches.

Implementation: on the CPU (float32/float64) one call of the variants' fused kernels computes
the statistics of every (virtual batch, channel) in one pass and the backward per virtual
batch, reading the input where it lies (:mod:`._kernels`); elsewhere each virtual batch goes
through :func:`batchnorm.functional.batch_norm` (so the Triton backend serves CUDA tensors) and
the outputs are concatenated. A single virtual batch is always plain BN (the same call).
Double backward works on both paths.
"""

from __future__ import annotations

import torch

from batchnorm.variants import _kernels
from batchnorm.variants._core import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    batch_norm,
    check_as,
    epilogue,
)


def ghost_batch_sizes(n: int, ghost_batch_size: int) -> list[int]:
    """Sizes of the virtual batches of a mini-batch of ``n`` samples: ``n // g`` batches of
    ``g``, the remainder added to the last one; one batch of ``n`` when ``n <= g``."""
    q = max(1, n // ghost_batch_size)
    sizes = [ghost_batch_size] * q
    sizes[-1] += n - q * ghost_batch_size
    return sizes


def check_ghost_batch_size(who: str, ghost_batch_size) -> None:
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) \
            or ghost_batch_size < 1:
        raise ValueError(f"{who}: ghost_batch_size must be a positive int (the samples per "
                         f"virtual batch), got {ghost_batch_size!r}")


def ghost_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                     training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
                     ghost_batch_size: int, num_batches_tracked: torch.Tensor | None = None,
                     activation: str | None = None, residual: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Ghost BN over dimension 1 of ``input`` (see the module docstring).

    Arguments as :func:`batchnorm.functional.batch_norm`, plus ``ghost_batch_size`` (samples per
    virtual batch along dimension 0) and ``num_batches_tracked``: a one-element integer tensor
    incremented by the number of virtual batches when the running statistics are updated;
    required with ``momentum=None`` (the cumulative average over virtual batches). With
    ``training=False`` this is BN's inference map.
    """
    who = "ghost_batch_norm"
    check_ghost_batch_size(who, ghost_batch_size)
    cumulative = momentum is None
    if cumulative and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError(f"{who}: momentum=None (cumulative average) needs num_batches_tracked, "
                         "the count of virtual batches averaged so far")
    check_as(who, input, running_mean, running_var, weight, bias, training,
             0.0 if cumulative else momentum, eps, activation, residual)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps,
                          activation=activation, residual=residual, backend=backend)
    sizes = ghost_batch_sizes(input.shape[0], ghost_batch_size)
    per_channel = sizes[0] * (input.numel() // (input.shape[0] * input.shape[1])) \
        if input.numel() else 0
    if per_channel < 2:
        raise ValueError(
            f"{who}: ghost_batch_size={ghost_batch_size} leaves {per_channel} value per channel "
            f"in a virtual batch of input shape {tuple(input.shape)}; batch statistics need at "
            "least 2, so use ghost_batch_size >= 2 for input without spatial dimensions"
        )
    if running_mean is None:
        factors = [0.0] * len(sizes)
    elif cumulative:  # 1 / (number of virtual batches averaged so far, this one included)
        done = int(num_batches_tracked)
        factors = [1.0 / (done + i) for i in range(1, len(sizes) + 1)]
    else:
        factors = [momentum] * len(sizes)
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(len(sizes))
    if len(sizes) == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, True, factors[0], eps,
                          activation=activation, residual=residual, backend=backend)
    if backend in ("auto", "torch"):  # the fused CPU kernels, when they take the input
        y = _kernels.grouped_train(input, weight, bias, running_mean, running_var, sizes,
                                   factors, eps)
        if y is not None:
            return epilogue(y, activation, residual)
    residuals = residual.split(sizes) if residual is not None else [None] * len(sizes)
    outputs = [
        batch_norm(part, running_mean, running_var, weight, bias, True, factor, eps,
                   activation=activation, residual=res, backend=backend)
        for part, res, factor in zip(input.split(sizes), residuals, factors, strict=True)
    ]
    return torch.cat(outputs)


def ghost_forward(module, input: torch.Tensor, residual: torch.Tensor | None = None):
    """A BN module's training forward with ghost batches (``module.ghost_batch_size`` samples;
    the module computes with batch statistics): the running statistics, when kept, are updated
    per virtual batch and ``num_batches_tracked`` counts virtual batches. This is the branch
    ``batchnorm.BatchNorm*d(..., ghost_batch_size=g)`` takes (see :class:`GhostMixin`)."""
    module._check_input_dim(input)
    buffers = module._buffers
    update = module.training and module.track_running_stats
    return ghost_batch_norm(
        input, buffers["running_mean"] if update else None,
        buffers["running_var"] if update else None, module.weight, module.bias, True,
        module.momentum if update else 0.0, module.eps, ghost_batch_size=module.ghost_batch_size,
        num_batches_tracked=buffers["num_batches_tracked"] if update else None,
        activation=module.activation, residual=residual, backend=module.backend,
    )


class GhostMixin:
    """Ghost BN over our BN modules. The keyword-only ``ghost_batch_size`` (``None``: plain BN)
    applies whenever the layer normalizes with batch statistics (training, or no running
    statistics); evaluation with running statistics is BN's inference map."""

    def __init__(self, *args, ghost_batch_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if ghost_batch_size is not None:
            check_ghost_batch_size(type(self).__name__, ghost_batch_size)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        buffers = self._buffers
        use_batch_stats = self.training or (buffers["running_mean"] is None
                                            and buffers["running_var"] is None)
        if self.ghost_batch_size is None or not use_batch_stats:
            return super().forward(input, residual)
        return ghost_forward(self, input, residual)

    def variant_kwargs(self) -> dict:
        return dict(ghost_batch_size=self.ghost_batch_size)

    def extra_repr(self) -> str:
        text = super().extra_repr()  # (once our BN modules take ghost_batch_size, they show it)
        return text if "ghost_batch_size=" in text else \
            f"{text}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm1d(GhostMixin, BatchNorm1d):
    """:class:`batchnorm.BatchNorm1d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training (``(N, C)`` or ``(N, C, L)`` input)."""


class GhostBatchNorm2d(GhostMixin, BatchNorm2d):
    """:class:`batchnorm.BatchNorm2d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training."""


class GhostBatchNorm3d(GhostMixin, BatchNorm3d):
    """:class:`batchnorm.BatchNorm3d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training."""
