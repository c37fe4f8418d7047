"""Tools around Algorithm 2: swap BN modules, compute population statistics, fold BN away.

- :func:`convert` swaps ``torch.nn.BatchNorm*d`` and ours (or synchronized ones) in a model.
- :func:`recalibrate` is Algorithm 2 step 10 ("precise BN"): exact population statistics.
- :func:`fold` is Algorithm 2 step 11: BN at inference is a fixed affine map
  ``y = scale * x + shift``, which merges into the preceding Linear or Conv layer.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from batchnorm.activations import MODULES as ACTIVATION_MODULES
from batchnorm.distributed import SyncBatchNorm, merge_across_processes
from batchnorm.modules import TORCH_BATCHNORMS, TORCH_TO_OURS, BatchNormBase
from batchnorm.process_group import is_distributed, is_main_process
from batchnorm.statistics import mean_and_variance
from batchnorm.swap import rebuild, replace_submodule

logger = logging.getLogger("batchnorm")


# --------------------------------------------------------------------------------------------
# convert


def _torch_class_of(module: nn.Module) -> type | None:
    """The ``torch.nn.BatchNorm*d`` that ``module`` is a drop-in for, if it is one of ours
    (``SyncBatchNorm`` is not: it stays what it is under ``to="torch"``)."""
    if isinstance(module, BatchNormBase):
        return next((c for c in TORCH_BATCHNORMS if isinstance(module, c)), None)
    return None


def _swap(module: nn.Module, to: str, sync: bool, process_group) -> nn.Module:
    """``module`` as ``convert`` wants it, or ``module`` itself when it stays."""
    if sync:
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            return SyncBatchNorm.from_batchnorm(module, process_group)
        return module
    if to == "batchnorm" and type(module) in TORCH_BATCHNORMS:
        return rebuild(module, TORCH_TO_OURS[type(module)])
    if to == "torch" and (torch_cls := _torch_class_of(module)) is not None:
        return rebuild(module, torch_cls)
    if hasattr(module, "to_batchnorm") and to == "batchnorm":  # our SyncBatchNorm, unsynced
        return module.to_batchnorm()
    return module


def convert(
    model: nn.Module, to: str = "batchnorm", *, sync: bool = False, process_group=None
) -> nn.Module:
    """Replace every BN layer of ``model`` in place and return the model.

    ``to="batchnorm"`` turns ``torch.nn.BatchNorm1d/2d/3d`` into ours; ``to="torch"`` turns ours
    back. ``sync=True`` turns every BN layer (torch's or ours) into
    :class:`batchnorm.distributed.SyncBatchNorm` over ``process_group`` (default: the world).
    Parameters and buffers are shared, not copied, and each layer keeps its mode and device.
    If ``model`` itself is a BN layer, the replacement is returned.
    """
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"convert: to must be 'batchnorm' or 'torch', got {to!r}")
    if sync and to != "batchnorm":
        raise ValueError("convert: sync=True converts to batchnorm.SyncBatchNorm; use "
                         "to='batchnorm'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if to == "torch":
        # torch's BN cannot hold a fused nonlinearity; dropping it would change the model
        fused = [name or "model" for name, m in model.named_modules()
                 if _torch_class_of(m) is not None and m.activation is not None]
        if fused:
            raise ValueError(f"convert(to='torch'): BN layer(s) {', '.join(fused)} fuse an "
                             "activation, which torch.nn.BatchNorm*d cannot hold; rebuild them "
                             "with activation=None followed by the nonlinearity first")
    swapped = _swap(model, to, sync, process_group)
    if swapped is not model:
        return swapped
    for name, child in model.named_children():
        new_child = convert(child, to, sync=sync, process_group=process_group)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


# --------------------------------------------------------------------------------------------
# recalibrate


@dataclass
class _PopulationAccumulator:
    """Sums over mini-batches b of m_b * mu_b, m_b * var_b, m_b and m_b - 1 (float64)."""

    weighted_mean: torch.Tensor
    weighted_var: torch.Tensor
    count: float = 0.0
    dof: float = 0.0

    def add(self, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
        self.weighted_mean += m * mean.double()
        self.weighted_var += m * var.double()
        self.count += m
        self.dof += m - 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Paper: E[x] = avg mu_B, Var[x] = m/(m-1) avg var_B; uneven sizes weighted by m_b."""
        return self.weighted_mean / self.count, self.weighted_var / self.dof


def _first_tensor(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _is_synchronized(module: nn.Module) -> bool:
    """Whether this layer normalizes with statistics of a batch spread over processes."""
    return is_distributed() and isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))


class _StatisticsRecorder:
    """Forward pre-hooks that add each BN layer's mini-batch statistics to its accumulator.

    A synchronized layer in a distributed run normalizes with the statistics of the global
    batch, so it records those (every process gets the same numbers); every other layer records
    its own batch, and those sums are pooled over processes by :meth:`pool_across_processes`.
    """

    def __init__(self, layers: dict[str, _BatchNorm]):
        self.layers = layers
        self.accumulators = {name: _PopulationAccumulator(
            torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device),
            torch.zeros(m.num_features, dtype=torch.float64, device=m.running_mean.device))
            for name, m in layers.items()}
        self.synchronized = {name for name, m in layers.items() if _is_synchronized(m)}

    def _record(self, name: str, module: _BatchNorm, args) -> None:
        x = args[0]
        mean, var = mean_and_variance(x)
        m = x.numel() // x.shape[1]
        if name in self.synchronized:
            mean, var, m = merge_across_processes(mean, var, m,
                                                  getattr(module, "process_group", None))
        self.accumulators[name].add(mean, var, m)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The hooks are on the layers inside the ``with`` block only."""
        handles = [m.register_forward_pre_hook(functools.partial(self._record, name))
                   for name, m in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def pool_across_processes(self) -> None:
        """Sum the unsynchronized layers' accumulators over the processes of a data-parallel
        run (each process saw its own batches); nothing to do in a single process."""
        if not is_distributed():
            return
        for name, acc in self.accumulators.items():
            if name in self.synchronized:
                continue
            counts = torch.tensor([acc.count, acc.dof], dtype=torch.float64,
                                  device=acc.weighted_mean.device)
            for tensor in (acc.weighted_mean, acc.weighted_var, counts):
                torch.distributed.all_reduce(tensor)
            acc.count, acc.dof = counts.tolist()

    def write_population_statistics(self) -> None:
        for name, m in self.layers.items():
            mean, var = self.accumulators[name].result()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


def _layers_with_running_statistics(model: nn.Module) -> dict[str, _BatchNorm]:
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats
              and m.running_mean is not None}
    if not layers:
        raise ValueError("recalibrate: model has no BatchNorm layer with running statistics")
    return layers


@contextlib.contextmanager
def _measuring(model: nn.Module, layers: dict[str, _BatchNorm]) -> Iterator[None]:
    """The network frozen (eval mode) but its BN ``layers`` normalizing with batch statistics;
    afterwards every module's mode and every layer's buffers are as before."""
    modes = {m: m.training for m in model.modules()}
    saved = {name: (m.running_mean.clone(), m.running_var.clone(),
                    None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for name, m in layers.items()}
    try:
        model.eval()
        for m in layers.values():
            m.train()
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
        for name, m in layers.items():
            mean, var, tracked = saved[name]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _run_batches(model: nn.Module, batches: Iterable, num_batches: int | None,
                 forward: Callable | None, progress: bool) -> int:
    """Feed at most ``num_batches`` of ``batches`` through ``model`` (a progress bar on the
    main process); return how many went through."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    bar = tqdm(batches, total=total, desc="recalibrate", unit="batch",
               disable=not (progress and is_main_process()))
    seen = 0
    for batch in bar:
        if num_batches is not None and seen >= num_batches:
            break
        if forward is not None:
            forward(model, batch)
        else:
            model(_first_tensor(batch).to(device))
        seen += 1
    bar.close()
    return seen


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    *,
    progress: bool = True,
    forward: Callable[[nn.Module, object], object] | None = None,
) -> nn.Module:
    r"""Set every BN layer's running statistics to exact population statistics (Algorithm 2).

    With all weights frozen, the training mini-batches in ``batches`` go through the model once;
    every BN layer normalizes with its mini-batch statistics, as in training, and records them.
    Afterwards each layer holds, per channel,

    .. math:: \mathrm{E}[x] = \frac{\sum_b m_b \mu_b}{\sum_b m_b}, \qquad
              \mathrm{Var}[x] = \frac{\sum_b m_b \sigma^2_b}{\sum_b (m_b - 1)}

    which for equal batch sizes is the paper's ``E_B[mu_B]`` and ``m/(m-1) E_B[sigma^2_B]``,
    and weights a smaller last batch by its size. All BN layers are measured in one pass. The
    other modules run in eval mode (dropout off: the network is frozen). The model's modes,
    momenta, ``num_batches_tracked`` and gradients are as before; only ``running_mean`` and
    ``running_var`` change. In a distributed run the statistics are pooled over all processes.

    Args:
        model: any module containing BN layers (torch's, ours or synchronized ones) that keep
            running statistics.
        batches: an iterable of inputs; a tuple/list element's first item is the input
            (so a DataLoader of ``(x, y)`` works). Moved to the model's device.
        num_batches: use at most this many batches (default: all).
        progress: show a progress bar (rank 0 only).
        forward: ``forward(model, batch)`` to call the model differently.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got "
                         f"{num_batches!r}")
    layers = _layers_with_running_statistics(model)
    recorder = _StatisticsRecorder(layers)
    with _measuring(model, layers), recorder.attached():
        seen = _run_batches(model, batches, num_batches, forward, progress)
    if seen == 0:
        raise ValueError("recalibrate: batches is empty; population statistics need at least "
                         "one training mini-batch")
    recorder.pool_across_processes()
    recorder.write_population_statistics()
    logger.info("recalibrate: %d BN layers from %d batches", len(layers), seen)
    return model


# --------------------------------------------------------------------------------------------
# fold

FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldReport:
    """Which BN layers were folded into which layer, and which stayed, with the reason."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, bn)
    unfolded: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every BN layer (ours included) opaque, so the graph shows what feeds it."""

    def is_leaf_module(self, module, qualname):
        return isinstance(module, _BatchNorm) or super().is_leaf_module(module, qualname)


def _candidate_pairs(model: nn.Module) -> dict[str, tuple[str | None, str]]:
    """``{bn_name: (layer_name or None, reason)}`` for every BN layer in the model."""
    modules = dict(model.named_modules())
    bns = [name for name, m in modules.items() if isinstance(m, _BatchNorm)]
    pairs = {name: (None, "its input is not the output of a Linear or Conv layer") for name in bns}
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # untraceable forward: fall back to nn.Sequential neighbours
        logger.info("fold: symbolic tracing failed (%s); using nn.Sequential order", error)
        for name, module in modules.items():
            if isinstance(module, nn.Sequential):
                children = list(module.named_children())
                for (prev_name, prev), (bn_name, _) in zip(children, children[1:], strict=False):
                    full = f"{name}.{bn_name}" if name else bn_name
                    if full in pairs and isinstance(prev, FOLDABLE_LAYERS):
                        pairs[full] = (f"{name}.{prev_name}" if name else prev_name, "")
        return pairs
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for name in bns:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            pairs[name] = (None, f"it is called {len(nodes)} times in forward, not once")
            continue
        node = nodes[0]
        if len(node.args) != 1 or node.kwargs:
            pairs[name] = (None, "it takes a residual or extra arguments")
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], FOLDABLE_LAYERS)):
            continue
        if len(calls[source.target]) != 1 or len(source.users) != 1:
            pairs[name] = (None, f"the output of {source.target} is also used elsewhere")
            continue
        pairs[name] = (source.target, "")
    return pairs


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """``W' = scale * W``, ``b' = scale * b + shift`` per output channel, computed in float64."""
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight
    new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(shift)
    new_bias = old_bias * scale + shift
    layer.weight.copy_(new_weight.to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _why_not(layer: nn.Module, bn: _BatchNorm) -> str:
    if not bn.track_running_stats or bn.running_mean is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"the preceding layer has {out} outputs but BN has {bn.num_features} features"
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return "a Linear layer can only fold into BatchNorm1d"
    return ""


def fold(model: nn.Module, *, report: bool = False):
    """An eval-mode copy of ``model`` with each foldable BN merged into the layer before it.

    A BN layer folds when its input is the output of a ``Linear`` (BatchNorm1d on ``(N, F)``)
    or ``Conv1d/2d/3d`` used nowhere else, and it keeps running statistics. It is replaced by
    ``nn.Identity`` (or by its fused activation's module). Every other BN layer stays in place
    and is logged as a warning with the reason. The layers' order comes from symbolic tracing
    (``torch.fx``); a model that cannot be traced falls back to neighbours in ``nn.Sequential``.

    Returns the folded model, or ``(model, FoldReport)`` with ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    result = FoldReport()
    for bn_name, (layer_name, reason) in _candidate_pairs(folded).items():
        bn = folded.get_submodule(bn_name)
        if layer_name is not None:
            reason = _why_not(folded.get_submodule(layer_name), bn)
        if layer_name is None or reason:
            result.unfolded.append((bn_name, reason))
            logger.warning("fold: BN layer %r stays unfolded: %s", bn_name, reason)
            continue
        _fold_into(folded.get_submodule(layer_name), bn)
        activation = getattr(bn, "activation", None)
        replace_submodule(folded, bn_name,
                          ACTIVATION_MODULES[activation]() if activation else nn.Identity())
        result.folded.append((layer_name, bn_name))
    return (folded, result) if report else folded

