"""The BN family beyond the paper: one module per variant, each with its paper's equations.

- :mod:`~batchnorm.variants.renorm`: Batch Renormalization (Ioffe 2017): :class:`BatchRenorm2d`,
  :func:`batch_renorm`, :func:`renorm_schedule`, :func:`to_renorm`; synchronized across
  processes: :class:`~batchnorm.variants.renorm_sync.SyncBatchRenorm` (in the distributed
  layer above this package; ``batchnorm.SyncBatchRenorm``).
- :mod:`~batchnorm.variants.ghost`: Ghost BN (Hoffer, Hubara & Soudry 2017):
  :class:`GhostBatchNorm2d`, :func:`ghost_batch_norm`.
- :mod:`~batchnorm.variants.frozen`: frozen BN (torchvision-compatible
  :class:`FrozenBatchNorm2d`), :func:`freeze`, :func:`unfreeze`.
- :mod:`~batchnorm.variants.inplace_abn`: in-place activated BN (Rota Bulo et al. 2018):
  :class:`InPlaceABN2d`, :func:`inplace_activated_batch_norm`.
- :mod:`~batchnorm.variants.reference`: the float64 NumPy oracle of all of them.
"""

from batchnorm.variants.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
    unfreeze,
)
from batchnorm.variants.ghost import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    ghost_batch_norm,
    ghost_batch_sizes,
)
from batchnorm.variants.inplace_abn import (
    InPlaceABN1d,
    InPlaceABN2d,
    InPlaceABN3d,
    inplace_activated_batch_norm,
)
from batchnorm.variants.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
    renorm_schedule,
    to_renorm,
)

__all__ = [
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "FrozenBatchNorm", "FrozenBatchNorm1d",
    "FrozenBatchNorm2d", "FrozenBatchNorm3d", "GhostBatchNorm1d", "GhostBatchNorm2d",
    "GhostBatchNorm3d", "InPlaceABN1d", "InPlaceABN2d", "InPlaceABN3d",
    "batch_renorm", "freeze", "ghost_batch_norm", "ghost_batch_sizes",
    "inplace_activated_batch_norm", "renorm_schedule", "to_renorm", "unfreeze",
]

