"""``convert``: swap a model's BN layers between ``torch.nn.BatchNorm*d`` and ours (or our
synchronized ones), and say which layers were converted and which were left as they were, why.

Only BN layers whose forward is known (:mod:`batchnorm.known_layers`) are converted, so the
converted model computes what the original did. A subclass with a forward of its own is left
alone and reported; timm's BN subclasses with a built-in activation are converted, with
``fused=True``, into ours with the same ``activation=`` when it is one of ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.activations import ACTIVATIONS
from batchnorm.distributed import SyncBatchNorm
from batchnorm.known_layers import (
    NORM_ACT_CLASSES,
    PLAIN_BATCHNORMS,
    activation_name,
    is_norm_act,
    norm_act_parts,
    qualified_name,
    unknown_class_reason,
)
from batchnorm.modules import TORCH_BATCHNORMS, TORCH_TO_OURS, BatchNormBase
from batchnorm.swap import has_hooks, rebuild, replace_submodule

logger = logging.getLogger("batchnorm")

OURS_TO_TORCH = {ours: torch_cls for torch_cls, ours in TORCH_TO_OURS.items()}


@dataclass
class ConvertReport:
    """The BN layers :func:`convert` replaced and the ones it left as they were, with the reason.

    Layers already of the kind asked for (ours under ``to="batchnorm"``, torch's under
    ``to="torch"``) appear in neither list.
    """

    converted: list[tuple[str, str]] = field(default_factory=list)  # (layer, "old -> new")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)


def _from_norm_act(module: _BatchNorm, fused: bool) -> tuple[nn.Module | None, str]:
    """Ours with the same fused activation in place of a timm BN + activation layer."""
    name = type(module).__name__
    act = getattr(module, "act", None) or nn.Identity()
    if not fused:
        return None, (f"timm's {name} applies {type(act).__name__} after BN; "
                      "convert(..., fused=True) turns it into ours with that activation= when "
                      "it is one of ours")
    torch_cls = NORM_ACT_CLASSES[qualified_name(type(module))]
    if torch_cls is None:
        return None, (f"timm's {name} does not fix the input rank; convert the model before "
                      "timm.layers.convert_sync_batchnorm, then convert(..., sync=True)")
    drop = getattr(module, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return None, (f"its drop layer {type(drop).__name__} (applied between BN and the "
                      "activation) has no counterpart in ours")
    try:
        activation = activation_name(act)
    except KeyError:
        return None, (f"its activation {act!r} is none of ours exactly ({', '.join(ACTIVATIONS)}"
                      "; leaky_relu with slope 0.01)")
    if any(has_hooks(part) for part in norm_act_parts(module)):
        return None, "hooks are registered on its act or drop module, which ours does not have"
    return rebuild(module, TORCH_TO_OURS[torch_cls], activation=activation), ""


def _to_batchnorm(module: _BatchNorm, fused: bool) -> tuple[nn.Module | None, str]:
    kind = type(module)
    if kind in TORCH_BATCHNORMS:
        return rebuild(module, TORCH_TO_OURS[kind]), ""
    if kind is SyncBatchNorm:
        try:
            return module.to_batchnorm(), ""
        except ValueError as error:
            return None, str(error)
    if kind is nn.SyncBatchNorm:
        return None, ("torch.nn.SyncBatchNorm stays synchronized; convert(..., sync=True) turns "
                      "it into batchnorm.SyncBatchNorm")
    if is_norm_act(module):
        return _from_norm_act(module, fused)
    if isinstance(module, BatchNormBase):
        return None, ""  # ours already
    return None, unknown_class_reason(module)


def _to_sync(module: _BatchNorm, fused: bool, process_group) -> tuple[nn.Module | None, str]:
    if isinstance(module, SyncBatchNorm):
        return None, ""  # synchronized already
    if is_norm_act(module):
        module, reason = _from_norm_act(module, fused)
        if module is None:
            return None, reason
    if type(module) in PLAIN_BATCHNORMS:
        try:
            return SyncBatchNorm.from_batchnorm(module, process_group), ""
        except ValueError as error:  # ghost batches, which synchronization would drop
            return None, str(error)
    return None, unknown_class_reason(module)


def _to_torch(module: _BatchNorm) -> tuple[nn.Module | None, str]:
    kind = type(module)
    if kind in OURS_TO_TORCH:
        return rebuild(module, OURS_TO_TORCH[kind]), ""
    if kind is SyncBatchNorm:
        return None, ("batchnorm.SyncBatchNorm stays synchronized; convert(model) first turns it "
                      "into ours, then to='torch' into torch's")
    if isinstance(module, BatchNormBase):
        return None, unknown_class_reason(module)
    return None, ""  # torch's, or another library's layer: not ours


#: options of ours that torch's BN layers lack: (attribute, what a layer with it does, the fix)
_TORCH_CANNOT = (
    ("activation", "fuse an activation", "rebuild them with activation=None followed by the "
     "nonlinearity"),
    ("ghost_batch_size", "normalize ghost batches (ghost_batch_size)",
     "set ghost_batch_size=None"),
)


def _describe(old: nn.Module, new: nn.Module) -> str:
    text = f"{qualified_name(type(old))} -> {qualified_name(type(new))}"
    activation = getattr(new, "activation", None)
    return text + (f"(activation={activation!r})" if activation is not None else "")


def convert(
    model: nn.Module, to: str = "batchnorm", *, sync: bool = False, process_group=None,
    fused: bool = False, report: bool = False, **renorm_options,
):
    """Replace the BN layers of ``model`` in place; return the model (or ``(model, report)``).

    ``to="renorm"`` turns every plain ``BatchNorm1d/2d/3d`` (torch's or ours) into Batch
    Renormalization (:func:`batchnorm.variants.to_renorm`, whose keyword arguments ``r_max``,
    ``d_max``, ``running_average`` and ``momentum`` it passes on); it takes neither ``sync``
    nor ``fused`` nor ``report`` (use :class:`batchnorm.SyncBatchRenorm` directly).

    ``to="batchnorm"`` turns ``torch.nn.BatchNorm1d/2d/3d`` into ours; ``to="torch"`` turns ours
    back. ``sync=True`` turns every BN layer (torch's or ours) into
    :class:`batchnorm.distributed.SyncBatchNorm` over ``process_group`` (default: the world).
    Parameters, buffers and hooks are shared, not copied, and each layer keeps its mode and
    device. If ``model`` itself is a BN layer, the replacement is returned.

    Only layers whose forward is known are converted (:mod:`batchnorm.known_layers`: exact
    types), so the model computes the same function afterwards. Any other BN layer stays as it
    was, is listed in the report with the reason, and a warning counts them. ``fused=True``
    also converts timm's ``BatchNormAct2d`` (BN with a built-in activation) into ours with that
    ``activation=``, when it is one of ours exactly and there is no drop layer; it is opt-in
    because the layer then is no ``BatchNormAct2d`` and has no ``act``/``drop`` submodules
    (which timm's own helpers look for); the state_dict keys stay the same.

    Args:
        to: ``"batchnorm"`` or ``"torch"``.
        sync: convert to :class:`batchnorm.SyncBatchNorm` (with ``to="batchnorm"``).
        process_group: the group a synchronized layer pools over.
        fused: convert BN subclasses with a built-in activation too (see above).
        report: return ``(model, ConvertReport)`` instead of the model.
    """
    if to == "renorm":
        if sync or fused or report:
            raise ValueError("convert(to='renorm') takes none of sync, fused, report; build "
                             "batchnorm.SyncBatchRenorm layers for synchronized renorm")
        from batchnorm.variants import to_renorm

        return to_renorm(model, **renorm_options)
    if renorm_options:
        raise TypeError(f"convert: {sorted(renorm_options)} are options of to='renorm' only")
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: to must be 'batchnorm', 'torch' or 'renorm', got {to!r}")
    if sync and to != "batchnorm":
        raise ValueError("convert: sync=True converts to batchnorm.SyncBatchNorm; use "
                         "to='batchnorm'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if to == "torch":
        # torch's BN can hold neither a fused nonlinearity nor ghost batches; dropping either
        # would change the model
        for option, what, fix in _TORCH_CANNOT:
            layers = [name or "model" for name, m in model.named_modules()
                      if type(m) in OURS_TO_TORCH and getattr(m, option) is not None]
            if layers:
                raise ValueError(f"convert(to='torch'): BN layer(s) {', '.join(layers)} {what}, "
                                 f"which torch.nn.BatchNorm*d cannot; {fix} first")
    result = ConvertReport()
    replacements: dict[int, nn.Module | None] = {}  # a layer registered twice is one layer
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, _BatchNorm):
            continue
        if id(module) not in replacements:
            if sync:
                new, reason = _to_sync(module, fused, process_group)
            elif to == "batchnorm":
                new, reason = _to_batchnorm(module, fused)
            else:
                new, reason = _to_torch(module)
            replacements[id(module)] = new
            if reason:
                result.skipped.append((name or "model", reason))
            elif new is not None:
                result.converted.append((name or "model", _describe(module, new)))
        new = replacements[id(module)]
        if new is not None:
            if name:
                replace_submodule(model, name, new)
            else:
                model = new
    if result.skipped:
        logger.warning("convert: %d BN layer(s) left as they were, e.g. %s: %s "
                       "(convert(..., report=True) lists them all)", len(result.skipped),
                       *result.skipped[0])
    return (model, result) if report else model
