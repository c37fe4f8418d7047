"""Test accuracy of a network held in memory, and the three ways a BN network can normalize
at test time (Algorithm 2): with the moving averages kept during training, with exact
population statistics (:func:`batchnorm.recalibrate`), and with each test batch's own
statistics."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

import batchnorm
from batchnorm.repro.common import shard, world_size


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 10_000) -> float:
    """Test accuracy of ``model`` as it is (eval mode for population statistics)."""
    correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
                  for i in range(0, len(y), chunk))
    return correct / len(y)


@contextmanager
def batch_statistics(model: nn.Module):
    """Within this block every BN layer normalizes with the statistics of the batch it is
    given (train mode, no gradients); running statistics and the model's mode are restored
    afterwards, so the block leaves no trace."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)


def batch_statistics_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              batch_size: int) -> float:
    """Accuracy when BN normalizes each test mini-batch (consecutive batches of
    ``batch_size``, split across processes) with its own statistics."""
    correct = torch.zeros((), dtype=torch.float64)
    with batch_statistics(model):
        for i in range(0, len(y), batch_size):
            local = shard(torch.arange(i, min(i + batch_size, len(y))))
            correct += (model(x[local]).argmax(1) == y[local]).sum()
    if world_size() > 1:
        torch.distributed.all_reduce(correct)
    return float(correct) / len(y)


def three_ways(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
               x_train: torch.Tensor, batch_size: int) -> dict:
    """Test accuracy of the trained BN ``model`` with its moving averages, with test batches
    of ``batch_size`` normalized by their own statistics, and (last, as it replaces the moving
    averages) with the population statistics of ``x_train`` in batches of ``batch_size``."""
    model.eval()
    result = dict(moving_average=accuracy(model, x_test, y_test),
                  batch_statistics=batch_statistics_accuracy(model, x_test, y_test, batch_size))
    batches = [shard(x_train[i:i + batch_size])
               for i in range(0, len(x_train) - batch_size + 1, batch_size)]
    batchnorm.recalibrate(model, batches, progress=False)
    result["recalibrated"] = accuracy(model, x_test, y_test)
    result["recalibration_batches"] = len(batches)
    return result
