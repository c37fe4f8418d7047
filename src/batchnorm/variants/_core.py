"""Everything the variants take from the core package, imported in this one place.

The core modules (``modules.py``, ``functional.py``, ``autograd.py``, ``inference.py``) are
being restructured; when a helper moves, only the imports below change.
"""

from __future__ import annotations

import numbers

from batchnorm.activations import ACTIVATIONS, check_activation, epilogue
from batchnorm.autograd import batch_statistics, per_channel, reduce_dims
from batchnorm.functional import batch_norm, check_arguments
from batchnorm.inference import _rebuild as rebuild
from batchnorm.inference import _replace as replace
from batchnorm.modules import OURS, TORCH_BATCHNORMS, BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules import _BatchNormMixin as BatchNormMixin

__all__ = [
    "ACTIVATIONS", "OURS", "TORCH_BATCHNORMS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "BatchNormMixin", "batch_norm", "batch_statistics", "check_activation", "check_as",
    "check_arguments", "epilogue", "is_number", "per_channel", "rebuild", "reduce_dims",
    "replace",
]


def check_as(who: str, *args) -> None:
    """:func:`batchnorm.functional.check_arguments`, with ``who`` naming the caller in the
    message instead of ``batch_norm``."""
    try:
        check_arguments(*args)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("batch_norm:", f"{who}:", 1)) from None


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
