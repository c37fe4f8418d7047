"""Deprecated alias of :mod:`batchnorm.backends.torch_backend` (the ``"torch"`` backend).

``batchnorm.autograd`` was the torch backend's module name before it moved into the backends
package; the statistics helpers moved to :mod:`batchnorm.statistics` and the activation table
to :mod:`batchnorm.activations`. Importing this module warns once and re-exports the old names.
"""

from __future__ import annotations

import warnings

from batchnorm.activations import ACTIVATIONS
from batchnorm.backends.torch_backend import (
    BatchNormFunction,
    batch_norm,
    closed_form_backward,
    training_batch_norm,
)
from batchnorm.statistics import (
    cast,
    centered_statistics,
    compute_dtype,
    per_channel,
    reduce_dims,
)
from batchnorm.statistics import mean_and_variance as batch_statistics

__all__ = [
    "ACTIVATIONS",
    "BatchNormFunction",
    "batch_norm",
    "batch_statistics",
    "cast",
    "centered_statistics",
    "closed_form_backward",
    "compute_dtype",
    "per_channel",
    "reduce_dims",
    "training_batch_norm",
]

warnings.warn(
    "batchnorm.autograd is deprecated: import the torch backend from "
    "batchnorm.backends.torch_backend, the statistics helpers from batchnorm.statistics "
    "(batch_statistics is now mean_and_variance) and ACTIVATIONS from batchnorm.activations",
    DeprecationWarning,
    stacklevel=2,
)
