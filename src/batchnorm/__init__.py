"""Batch Normalization (Ioffe & Szegedy, 2015) for PyTorch.

- :mod:`batchnorm.reference`: the paper's Algorithms 1 and 2 in NumPy (float64 oracle).
- :func:`batchnorm.functional.batch_norm`: checks and routing to a backend
  (:mod:`batchnorm.backends`: ``"torch"`` in :mod:`batchnorm.backends.torch_backend`,
  ``"triton"`` GPU kernels in :mod:`batchnorm.kernels`).
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-ins for torch.nn's
  (:mod:`batchnorm.modules`); :class:`SyncBatchNorm` pools the statistics of a batch sharded
  over processes (:mod:`batchnorm.distributed`).
- :func:`convert`, :func:`recalibrate`, :func:`fold`: swap modules, population statistics,
  fold BN into the preceding layer (:mod:`batchnorm.inference`).

The library is layered, each module importing only from its own layer or lower ones:
foundations (:mod:`~batchnorm.activations`, :mod:`~batchnorm.statistics`,
:mod:`~batchnorm.process_group`, :mod:`~batchnorm.reference`, :mod:`~batchnorm.cpu`,
:mod:`~batchnorm.kernels`) -> backends -> functional -> modules (and :mod:`~batchnorm.swap`)
-> distributed -> inference and monitor -> models -> data -> the experiments
(:mod:`batchnorm.repro`, the command line). ``tests/test_layers.py`` holds the table.
"""

from batchnorm.distributed import SyncBatchNorm
from batchnorm.functional import batch_norm
from batchnorm.inference import ConvertReport, FoldReport, convert, fold, recalibrate
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    InPlaceABN1d,
    InPlaceABN2d,
    InPlaceABN3d,
    freeze,
    unfreeze,
)
from batchnorm.variants.renorm_sync import SyncBatchRenorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "InPlaceABN1d",
    "InPlaceABN2d",
    "InPlaceABN3d",
    "SyncBatchRenorm",
    "freeze",
    "unfreeze",
    "ConvertReport",
    "FoldReport",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "fold",
    "recalibrate",
]
