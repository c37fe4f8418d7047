"""Swapping modules in a model: rebuild a BN layer as another class, replace a submodule.

A rebuilt layer *shares* the old one's parameters and buffers (the same tensor objects), so
an optimizer built before the swap keeps updating the model and no statistics are copied or
rounded. :func:`batchnorm.convert`, ``SyncBatchNorm.from_batchnorm``/``to_batchnorm`` and
:func:`batchnorm.fold` use these; the module depends on nothing else in the package.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def rebuild(old: _BatchNorm, new_cls: type, **extra) -> _BatchNorm:
    """A ``new_cls`` module that shares ``old``'s parameters and buffers (same objects, so an
    optimizer built before the swap keeps working) and its train/eval mode.

    ``new_cls`` takes torch's BN constructor arguments; ``extra`` adds keyword arguments (e.g.
    ``activation=``, ``process_group=``). The new module is built on the meta device, so
    nothing is allocated before the old tensors are attached.
    """
    new = new_cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
                  device="meta", **extra)
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def replace_submodule(model: nn.Module, qualname: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(qualname)`` is (``qualname`` non-empty)."""
    parent_name, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
