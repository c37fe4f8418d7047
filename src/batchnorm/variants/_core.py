"""Everything the variants take from the core package, imported in this one place.

When a helper of the core moves, only the imports below change.
"""

from __future__ import annotations

import numbers

from batchnorm.activations import ACTIVATIONS, check_activation, epilogue
from batchnorm.functional import batch_norm, check_arguments, check_as
from batchnorm.modules import (
    TORCH_BATCHNORMS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormBase,
    statistics_arguments,
)
from batchnorm.modules import TORCH_TO_OURS as OURS
from batchnorm.statistics import mean_and_variance as batch_statistics
from batchnorm.statistics import per_channel, reduce_dims
from batchnorm.swap import rebuild
from batchnorm.swap import replace_submodule as replace

__all__ = [
    "ACTIVATIONS", "OURS", "TORCH_BATCHNORMS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormBase", "batch_norm", "batch_statistics", "check_activation", "check_as",
    "check_arguments", "epilogue", "is_number", "per_channel", "rebuild", "reduce_dims",
    "replace", "averaging_factor", "statistics_arguments",
]


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def averaging_factor(module) -> float:
    """The running-average weight of this batch for a BN ``module``, as torch's
    ``_BatchNorm.forward`` decides it (counting the batch in ``num_batches_tracked``). The
    buffers are read from their dict, as ``BatchNorm._statistics_arguments`` does (each
    ``Module.__getattr__`` costs about half a microsecond, which shows on a small layer)."""
    buffers = module._buffers
    return statistics_arguments(module.training, module.track_running_stats, module.momentum,
                                buffers["running_mean"], buffers["running_var"],
                                buffers["num_batches_tracked"])[3]
