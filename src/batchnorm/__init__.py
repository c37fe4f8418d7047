"""Batch Normalization (Ioffe & Szegedy, 2015) for PyTorch.

- :mod:`batchnorm.reference`: the paper's Algorithms 1 and 2 in NumPy (float64 oracle).
- :func:`batchnorm.functional.batch_norm`: checks and routing to a backend
  (:mod:`batchnorm.backends`: ``"torch"`` closed-form autograd, ``"triton"`` GPU kernels).
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-ins for torch.nn's.
- :func:`convert`, :func:`recalibrate`, :func:`fold`: swap modules, population statistics,
  fold BN into the preceding layer (:mod:`batchnorm.inference`).
"""

from batchnorm.functional import batch_norm
from batchnorm.inference import FoldReport, convert, fold, recalibrate
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FoldReport",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "fold",
    "recalibrate",
]


def __getattr__(name):
    # SyncBatchNorm pulls in torch.distributed; import it on first use only.
    if name == "SyncBatchNorm":
        from batchnorm.distributed import SyncBatchNorm

        return SyncBatchNorm
    raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
