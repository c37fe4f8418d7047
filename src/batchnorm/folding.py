"""``fold``: Algorithm 2 step 11. BN at inference is a fixed affine map ``y = scale * x + shift``
per channel, which merges into the Linear or Conv layer before it.

Folding edits that layer's weight and bias, so it is exact only when the layer's forward is
known to be a plain affine map of the weight being edited, and when nothing else sees the
layer's output. :func:`fold` checks both and reports every BN layer it leaves in place with
the reason (its docstring states the rule).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from batchnorm.known_layers import (
    BATCHNORM_LIKE,
    inference_affine,
    modules_after_affine,
    qualified_name,
    unknown_class_reason,
)
from batchnorm.swap import FORWARD_HOOK_DICTS, has_hooks, replace_submodule
from batchnorm.variants import FrozenBatchNorm1d

logger = logging.getLogger("batchnorm")

#: the layers BN folds into: exactly these classes, whose forward is ``x @ W.T + b`` or a
#: convolution with ``W`` plus ``b``
FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: subclasses from the model zoos whose forward is also a plain affine map of ``weight`` and
#: ``bias`` (read in their source; each is folded in ``tests/test_zoo.py``): torchvision's
#: video convolutions only change ``__init__``, timm's "same" convolution pads the input first
KNOWN_SUBCLASSES = frozenset({
    "torchvision.models.video.resnet.Conv3DSimple",
    "torchvision.models.video.resnet.Conv3DNoTemporal",
    "timm.layers.conv2d_same.Conv2dSame",
})


@dataclass
class FoldReport:
    """Which BN layers were folded into which layer, and which stayed, with the reason.

    ``method`` says how the order of the layers was found: ``"torch.fx"`` (symbolic tracing)
    or ``"nn.Sequential"`` (tracing failed: neighbours inside ``nn.Sequential`` only).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, bn)
    unfolded: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)
    method: str = "torch.fx"


class _LeafTracer(torch.fx.Tracer):
    """Keeps every BN layer (ours included) and every Linear or Conv layer (subclasses too)
    opaque, so the graph shows which module feeds a BN."""

    def is_leaf_module(self, module, qualname):
        return (isinstance(module, (*BATCHNORM_LIKE, *FOLDABLE_LAYERS))
                or super().is_leaf_module(module, qualname))


class _ModelIndex:
    """The model's modules by name, and how often each module and parameter is registered
    (a module or weight registered twice is used in two places)."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.bns = [name for name, m in self.modules.items() if isinstance(m, BATCHNORM_LIKE)]
        self.registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))


def _describe_node(node) -> str:
    """What computes ``node``, in words: ``the function cat``, ``the model's input``."""
    if not isinstance(node, torch.fx.Node):
        return f"the constant {node!r}"
    target = getattr(node.target, "__name__", node.target)
    return {"call_function": f"the function {target}", "call_method": f"the method .{target}()",
            "placeholder": "the model's input", "get_attr": f"the attribute {target}"
            }.get(node.op, str(target))


def _pairs_from_graph(graph: torch.fx.Graph, index: _ModelIndex) -> dict[str, tuple]:
    """``{bn: (layer or None, reason)}`` from the traced graph: the module computing BN's only
    input, when its output goes to BN only and both are called once."""
    calls: dict[str, list[torch.fx.Node]] = {}
    read_directly = set()  # modules whose parameters forward reads as attributes
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            read_directly.add(node.target.rpartition(".")[0])
    pairs = {}
    for name in index.bns:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            pairs[name] = (None, f"it is called {len(nodes)} times in forward, not once")
            continue
        node = nodes[0]
        source = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs:
            reason = "it takes a residual or extra arguments"
        elif not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
            reason = ("its input is not the output of a Linear or Conv layer (but of "
                      f"{_describe_node(source)})")
        elif len(calls[source.target]) != 1:
            reason = f"{source.target} is called {len(calls[source.target])} times in forward"
        elif len(source.users) != 1:
            reason = f"the output of {source.target} is also used elsewhere"
        elif source.target in read_directly:
            reason = f"forward also reads the parameters of {source.target} directly"
        else:
            reason = ""
        pairs[name] = (None, reason) if reason else (source.target, "")
    return pairs


def _pairs_from_sequentials(index: _ModelIndex, error: Exception) -> dict[str, tuple]:
    """``{bn: (layer or None, reason)}`` without a graph: a BN directly after a module in an
    ``nn.Sequential`` whose forward is ``nn.Sequential``'s (children called in order)."""
    pairs = {name: (None, f"torch.fx could not trace the model ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''}); without a "
                          "graph a BN folds only right after a Linear/Conv layer inside an "
                          "nn.Sequential, and this one is not")
             for name in index.bns}
    for name, module in index.modules.items():
        if not isinstance(module, nn.Sequential):
            continue
        children = [(k, m) for k, m in module._modules.items() if m is not None]
        for (prev_name, prev), (child_name, _) in zip(children, children[1:], strict=False):
            full = f"{name}.{child_name}" if name else child_name
            if full not in pairs or not isinstance(prev, FOLDABLE_LAYERS):
                continue
            if type(module).forward is not nn.Sequential.forward:
                pairs[full] = (None, f"its container {name} ({qualified_name(type(module))}) "
                                     "has a forward of its own")
            else:
                pairs[full] = (f"{name}.{prev_name}" if name else prev_name, "")
    return pairs


def _candidate_pairs(model: nn.Module, index: _ModelIndex) -> tuple[dict[str, tuple], str]:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # untraceable forward: fall back to nn.Sequential neighbours
        logger.info("fold: symbolic tracing failed (%s); using nn.Sequential order", error)
        return _pairs_from_sequentials(index, error), "nn.Sequential"
    return _pairs_from_graph(graph, index), "torch.fx"


def _bn_reason(bn: _BatchNorm, index: _ModelIndex) -> str:
    if modules_after_affine(bn) is None:
        return unknown_class_reason(bn)
    if not getattr(bn, "track_running_stats", True) or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    if has_hooks(bn, FORWARD_HOOK_DICTS):
        return "forward hooks are registered on it, which folding would remove"
    if index.registrations[id(bn)] > 1:
        return "it is registered in several places of the model"
    return ""


def _layer_reason(name: str, layer: nn.Module, index: _ModelIndex) -> str:
    """Why ``layer`` is not known to be a plain affine map of the weight fold would edit."""
    kind = qualified_name(type(layer))
    if not isinstance(layer, FOLDABLE_LAYERS):
        return f"its input is not the output of a Linear or Conv layer (but of {name}, a {kind})"
    if parametrize.is_parametrized(layer):
        return (f"{name} is parametrized ({', '.join(layer.parametrizations)} recomputed on "
                "every call), so a folded weight would be lost; remove the parametrization "
                "first: torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')")
    if type(layer) not in FOLDABLE_LAYERS and kind not in KNOWN_SUBCLASSES:
        return (f"{name} is a {kind}, not exactly {', '.join(c.__name__ for c in FOLDABLE_LAYERS)}"
                ": a subclass may transform its weight (e.g. weight standardization), so "
                "folding into it is not known to be exact (batchnorm.folding.KNOWN_SUBCLASSES "
                "lists the subclasses known to be plain)")
    if has_hooks(layer, FORWARD_HOOK_DICTS):
        return (f"{name} has forward hooks (e.g. torch.nn.utils.weight_norm or spectral_norm, "
                "which recompute the weight), which would see or undo the folded weight")
    if index.registrations[id(layer)] > 1:
        return f"{name} is registered in several places of the model"
    for pname in ("weight", "bias"):
        param = getattr(layer, pname)
        if param is not None and index.uses[id(param)] > 1:
            return f"the {pname} of {name} is shared with another module (tied weights)"
    if not layer.weight.is_floating_point():
        return f"the weight of {name} is {layer.weight.dtype}, not floating point"
    return ""


def _shape_reason(layer: nn.Module, bn: _BatchNorm) -> str:
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"the preceding layer has {out} outputs but BN has {bn.num_features} features"
    if isinstance(layer, nn.Linear) and not isinstance(bn, (nn.BatchNorm1d, FrozenBatchNorm1d)):
        return "a Linear layer folds only into a BatchNorm1d"
    return ""


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """``W' = scale * W``, ``b' = scale * b + shift`` per output channel, computed in float64."""
    scale, shift = inference_affine(bn)
    weight = layer.weight
    new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    new_bias = old_bias * scale + shift
    layer.weight.copy_(new_weight.to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _what_remains(bn: _BatchNorm) -> nn.Module:
    """What replaces a folded BN: what it applied after the affine map, or ``nn.Identity``."""
    after = modules_after_affine(bn)
    if not after:
        return nn.Identity()
    return after[0] if len(after) == 1 else nn.Sequential(*after)


def fold(model: nn.Module, *, report: bool = False):
    """An eval-mode copy of ``model`` with each foldable BN merged into the layer before it.

    The rule: a BN layer folds into layer ``L`` only when

    1. ``L``'s forward is known to be a plain affine map of the weight being edited: ``L`` is
       exactly ``nn.Linear`` or ``nn.Conv1d/2d/3d``, or one of :data:`KNOWN_SUBCLASSES` (any
       other subclass may transform its weight, e.g. standardize it), has no parametrization
       and no forward hooks (``spectral_norm``, ``weight_norm`` recompute the weight on every
       call), is registered once, and its weight and bias are shared with no other module;
    2. BN's forward is known (exactly torch's or our ``BatchNorm1d/2d/3d``/``SyncBatchNorm``,
       or timm's ``BatchNormAct2d``/``SyncBatchNormAct``), it keeps running statistics, has no
       forward hooks and is registered once;
    3. BN's only input is ``L``'s output, which nothing else uses, and each is called once in
       ``forward``: read from the ``torch.fx`` graph, or, when the model cannot be traced,
       from ``nn.Sequential`` order (BN right after ``L`` in a container whose forward is
       ``nn.Sequential``'s; this assumes the container is called as a whole);
    4. ``L`` has ``num_features`` outputs, and a ``Linear`` is followed by a ``BatchNorm1d``
       (on ``(N, F)``: the Linear's features are BN's channels).

    The merge ``W' = scale * W``, ``b' = scale * b + shift`` is computed in float64. A folded
    BN is replaced by what it applies after its affine map: our fused ``activation``'s module,
    timm's ``drop`` and ``act`` modules, or ``nn.Identity``. Every other BN layer stays in
    place, is listed in the report with the reason and logged as a warning. The original model
    is not modified.

    Returns the folded model, or ``(model, FoldReport)`` with ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        folded = copy.deepcopy(model).eval()
    except RuntimeError as error:  # e.g. a weight computed in a graph, stored as an attribute
        raise RuntimeError(
            f"fold: copying the model with copy.deepcopy failed ({error}). A module attribute "
            "holding a tensor computed with autograd cannot be copied; the deprecated "
            "torch.nn.utils.weight_norm/spectral_norm leave one until a forward pass under "
            "torch.no_grad(): run one, or use torch.nn.utils.parametrizations instead"
        ) from error
    index = _ModelIndex(folded)
    pairs, method = _candidate_pairs(folded, index)
    result = FoldReport(method=method)
    for bn_name, (layer_name, reason) in pairs.items():
        bn = index.modules[bn_name]
        layer = index.modules.get(layer_name)
        reason = (_bn_reason(bn, index) or reason or _layer_reason(layer_name, layer, index)
                  or _shape_reason(layer, bn))
        if reason:
            result.unfolded.append((bn_name, reason))
            logger.warning("fold: BN layer %r stays unfolded: %s", bn_name, reason)
            continue
        _fold_into(layer, bn)
        replace_submodule(folded, bn_name, _what_remains(bn))
        result.folded.append((layer_name, bn_name))
    return (folded, result) if report else folded
