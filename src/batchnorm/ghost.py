r"""Ghost Batch Normalization, the functional form and the modules' training branch (Hoffer,
Hubara & Soudry, "Train longer, generalize better: closing
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
batch, reading the input where it lies (:mod:`batchnorm.backends.family`); elsewhere each
virtual batch goes through :func:`batchnorm.functional.batch_norm` (so the Triton backend serves
CUDA tensors) and the outputs are concatenated. A single virtual batch is always plain BN (the same
call). Double backward works on both paths.

The modules: ``batchnorm.BatchNorm1d/2d/3d(..., ghost_batch_size=g)`` take this branch
(:func:`ghost_forward`) whenever they normalize with batch statistics;
:class:`batchnorm.variants.GhostBatchNorm2d` and its siblings are those modules with
``ghost_batch_size`` required.
"""

from __future__ import annotations

import torch

from batchnorm.activations import epilogue
from batchnorm.backends import family
from batchnorm.functional import batch_norm, check_as


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
    if input.numel() and per_channel < 2:
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
        y = family.grouped_train(input, weight, bias, running_mean, running_var, sizes,
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
    ``batchnorm.BatchNorm*d(..., ghost_batch_size=g)`` takes, after its input checks."""
    buffers, params = module._buffers, module._parameters  # dicts: no Module.__getattr__
    update = module.training and module.track_running_stats
    return ghost_batch_norm(
        input, buffers["running_mean"] if update else None,
        buffers["running_var"] if update else None, params["weight"], params["bias"], True,
        module.momentum if update else 0.0, module.eps, ghost_batch_size=module.ghost_batch_size,
        num_batches_tracked=buffers["num_batches_tracked"] if update else None,
        activation=module.activation, residual=residual, backend=module.backend,
    )
