"""Swapping modules in a model: rebuild a BN layer as another class, replace a submodule.

A rebuilt layer *shares* the old one's parameters and buffers (the same tensor objects), so
an optimizer built before the swap keeps updating the model and no statistics are copied or
rounded; it shares the old layer's hooks too. :func:`batchnorm.convert`,
``SyncBatchNorm.from_batchnorm``/``to_batchnorm`` and :func:`batchnorm.fold` use these; the
module depends on nothing else in the package.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: the ``nn.Module`` attributes holding hooks (``register_forward_hook`` and the like)
HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)

#: the ones that run in ``forward`` (the ``with_kwargs``/``always_called`` dicts only flag
#: entries of these two)
FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def has_hooks(module: nn.Module, kinds: tuple[str, ...] = HOOK_DICTS) -> bool:
    """Whether any hook of the given ``kinds`` (names from :data:`HOOK_DICTS`) is on
    ``module`` (hooks registered globally for all modules are not counted)."""
    return any(getattr(module, name, None) for name in kinds)


def share_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` ``old``'s hooks: the same hook dictionaries (hooks ``new`` already had are
    added to them), so the handles ``old.register_forward_hook`` & co. returned remove a hook
    from both, and a module replaced by ``new`` keeps its hooks running.
    """
    for name in HOOK_DICTS:
        hooks = getattr(old, name, None)
        if hooks is None:  # an older torch without this kind of hook
            continue
        hooks.update(getattr(new, name))
        object.__setattr__(new, name, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        object.__setattr__(new, "_is_full_backward_hook", old._is_full_backward_hook)


def rebuild(old: _BatchNorm, new_cls: type, **extra) -> _BatchNorm:
    """A ``new_cls`` module that shares ``old``'s parameters and buffers (same objects, so an
    optimizer built before the swap keeps working), its train/eval mode and its hooks
    (:func:`share_hooks`).

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
    share_hooks(old, new)
    return new


def replace_submodule(model: nn.Module, qualname: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(qualname)`` is (``qualname`` non-empty)."""
    parent_name, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
