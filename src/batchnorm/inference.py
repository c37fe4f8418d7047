"""Tools around Algorithm 2: swap BN modules, compute population statistics, fold BN away.

- :func:`convert` swaps ``torch.nn.BatchNorm*d`` and ours (or synchronized ones) in a model
  (:mod:`batchnorm.conversion`).
- :func:`recalibrate` is Algorithm 2 step 10 ("precise BN"): exact population statistics
  (here).
- :func:`fold` is Algorithm 2 step 11: BN at inference is a fixed affine map
  ``y = scale * x + shift``, which merges into the preceding Linear or Conv layer
  (:mod:`batchnorm.folding`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from batchnorm.conversion import ConvertReport, convert
from batchnorm.distributed import SyncBatchNorm, merge_across_processes
from batchnorm.folding import FOLDABLE_LAYERS, FoldReport, fold
from batchnorm.process_group import is_distributed, is_main_process
from batchnorm.statistics import mean_and_variance

__all__ = ["FOLDABLE_LAYERS", "ConvertReport", "FoldReport", "convert", "fold", "recalibrate"]

logger = logging.getLogger("batchnorm")


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
    main process); return how many went through.

    No batch beyond ``num_batches`` is drawn, and ``batches`` is never closed: an iterator or
    generator the caller passed in yields the rest afterwards.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if total is None else min(total, len(batches))
    seen = 0
    with tqdm(total=total, desc="recalibrate", unit="batch",
              disable=not (progress and is_main_process())) as bar:
        for batch in itertools.islice(batches, num_batches):
            if forward is not None:
                forward(model, batch)
            else:
                model(_first_tensor(batch).to(device))
            seen += 1
            bar.update()
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
