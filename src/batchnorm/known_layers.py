"""The BN layers whose forward :func:`batchnorm.convert` and :func:`batchnorm.fold` know.

Known means known by *exact type*: a subclass may override ``forward`` (add an activation,
split the batch, standardize a weight), so the tools report a subclass they do not know instead
of guessing what it computes. Three families are known:

- plain BN: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, ours
  (:class:`batchnorm.BatchNorm1d/2d/3d`, :class:`batchnorm.SyncBatchNorm`), which apply our
  fused ``activation`` (if any) after the affine map;
- timm's BN subclasses with a built-in activation, ``BatchNormAct2d`` and ``SyncBatchNormAct``
  (``timm.layers.norm_act``): BN, then their ``drop`` module, then their ``act`` module.
  Recognized by class name, so timm is never imported;
- our BN family (:mod:`batchnorm.variants`): Batch Renorm and Ghost BN, whose eval-mode map is
  BN's (they differ only in training), and frozen BN and in-place activated BN, which state
  their eval-mode map themselves with ``fold_parts() -> (scale, shift, activation)``.

:func:`inference_affine` gives any known layer's eval-mode map as float64 ``(scale, shift)``.

:func:`activation_name` says which of our fused activations (``batchnorm.activations``) a
``torch.nn`` activation module computes exactly, if any.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import variants
from batchnorm.activations import MODULES as ACTIVATION_MODULES
from batchnorm.distributed import SyncBatchNorm
from batchnorm.modules import TORCH_BATCHNORMS, TORCH_TO_OURS

#: BN classes computing BN (and, for ours, their ``activation``) and nothing else
PLAIN_BATCHNORMS = (*TORCH_BATCHNORMS, nn.SyncBatchNorm, *TORCH_TO_OURS.values(), SyncBatchNorm)

#: timm's BN + activation classes (qualified name) -> the torch BN class of the same input rank
#: (``None``: any rank, as ``SyncBatchNorm``)
NORM_ACT_CLASSES = {
    "timm.layers.norm_act.BatchNormAct2d": nn.BatchNorm2d,
    "timm.layers.norm_act.SyncBatchNormAct": None,
}

#: our variants whose eval-mode map is BN's and our fused ``activation``
SAME_INFERENCE = (variants.BatchRenorm1d, variants.BatchRenorm2d, variants.BatchRenorm3d,
                  variants.GhostBatchNorm1d, variants.GhostBatchNorm2d, variants.GhostBatchNorm3d)
#: our variants that state their eval-mode map with ``fold_parts()``
OWN_INFERENCE = (variants.FrozenBatchNorm1d, variants.FrozenBatchNorm2d,
                 variants.FrozenBatchNorm3d, variants.InPlaceABN1d, variants.InPlaceABN2d,
                 variants.InPlaceABN3d)
#: every BN-like class the tools look at (frozen BN is no ``_BatchNorm``: it has no training)
BATCHNORM_LIKE = (_BatchNorm, variants.FrozenBatchNorm)

_ACTIVATION_NAMES = {cls: name for name, cls in ACTIVATION_MODULES.items()}


def qualified_name(cls: type) -> str:
    """``torch.nn.BatchNorm2d``, ``batchnorm.BatchNorm2d``, else module and class name."""
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if cls.__module__.startswith("batchnorm.") and cls in PLAIN_BATCHNORMS:
        return f"batchnorm.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def is_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's BN + activation layers."""
    return qualified_name(type(module)) in NORM_ACT_CLASSES


def norm_act_parts(module: nn.Module) -> list[nn.Module]:
    """The modules a timm BN + activation layer applies after BN, in order (``drop``, then
    ``act``; ``SyncBatchNormAct`` applies each only if present)."""
    return [part for part in (getattr(module, "drop", None), getattr(module, "act", None))
            if part is not None]


def modules_after_affine(bn: _BatchNorm) -> list[nn.Module] | None:
    """What a known BN layer applies after its (eval-mode) affine map, in order, without
    identities; ``None`` when the class is not known, so what it computes is not either."""
    if type(bn) in PLAIN_BATCHNORMS or type(bn) in SAME_INFERENCE:
        activation = getattr(bn, "activation", None)
        return [ACTIVATION_MODULES[activation]()] if activation is not None else []
    if type(bn) in OWN_INFERENCE:
        activation = bn.fold_parts()[2]
        if isinstance(activation, str):
            activation = ACTIVATION_MODULES[activation]()
        return [] if activation is None else [activation]
    if is_norm_act(bn):
        return [part for part in norm_act_parts(bn) if type(part) is not nn.Identity]
    return None


def inference_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` in float64 with ``BN(x) = scale * x + shift`` per channel in eval mode
    (Algorithm 2), before what :func:`modules_after_affine` lists."""
    if type(bn) in OWN_INFERENCE:
        scale, shift, _ = bn.fold_parts()
        return scale.detach().double(), shift.detach().double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def unknown_class_reason(bn: nn.Module) -> str:
    """Why a BN layer of an unknown class is left alone."""
    base = next((c for c in type(bn).__mro__[1:] if c in PLAIN_BATCHNORMS), _BatchNorm)
    return (f"its class {qualified_name(type(bn))} subclasses {qualified_name(base)} and may "
            f"compute something else in its forward (only exact types are known: "
            f"{', '.join(sorted({c.__name__ for c in PLAIN_BATCHNORMS}))} of torch.nn or "
            f"batchnorm, timm's {', '.join(n.rpartition('.')[2] for n in NORM_ACT_CLASSES)})")


def _settings(module: nn.Module) -> dict:
    """A module's public attributes other than its mode and ``inplace`` (which does not change
    the result): e.g. ``negative_slope`` of a LeakyReLU."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k not in ("training", "inplace")}


def activation_name(module: nn.Module) -> str | None:
    """Our fused activation computing exactly what ``module`` computes: ``None`` for
    ``nn.Identity``, a name of :data:`batchnorm.activations.ACTIVATIONS`; ``KeyError`` when
    none does (another class, a subclass, other arguments such as a LeakyReLU slope)."""
    if type(module) is nn.Identity:
        return None
    name = _ACTIVATION_NAMES.get(type(module))
    if name is None or _settings(module) != _settings(ACTIVATION_MODULES[name]()):
        raise KeyError(type(module).__name__)
    return name
