"""Ghost Batch Normalization's modules (Hoffer, Hubara & Soudry 2017): our BN modules with
``ghost_batch_size`` required.

The equations, the last virtual batch, the running statistics and the implementation are in
:mod:`batchnorm.ghost`, below the modules: ``batchnorm.BatchNorm2d(C, ghost_batch_size=g)``
computes exactly what ``GhostBatchNorm2d(C, ghost_batch_size=g)`` does. These classes exist to
say "Ghost BN" in a model's printout and to make the option mandatory.
"""

from __future__ import annotations

from batchnorm.ghost import ghost_batch_norm, ghost_batch_sizes
from batchnorm.variants._core import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostMixin",
           "ghost_batch_norm", "ghost_batch_sizes"]


class GhostMixin:
    """Ghost BN over our BN modules: ``ghost_batch_size`` (keyword-only) is required. It applies
    whenever the layer normalizes with batch statistics (training, or no running statistics);
    evaluation with running statistics is BN's inference map."""

    def __init__(self, *args, ghost_batch_size: int, **kwargs):
        super().__init__(*args, ghost_batch_size=ghost_batch_size, **kwargs)

    def variant_kwargs(self) -> dict:
        return dict(ghost_batch_size=self.ghost_batch_size)


class GhostBatchNorm1d(GhostMixin, BatchNorm1d):
    """:class:`batchnorm.BatchNorm1d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training (``(N, C)`` or ``(N, C, L)`` input)."""


class GhostBatchNorm2d(GhostMixin, BatchNorm2d):
    """:class:`batchnorm.BatchNorm2d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training."""


class GhostBatchNorm3d(GhostMixin, BatchNorm3d):
    """:class:`batchnorm.BatchNorm3d` with statistics per virtual batch of ``ghost_batch_size``
    samples in training."""
