"""The paper's MNIST network (section 4.1): fully connected sigmoid layers, with or without BN.

Without BN each hidden layer is ``z = sigmoid(W u + b)``; with BN it is ``z = sigmoid(BN(W u))``
(Algorithm 2: BN goes before the nonlinearity and its shift ``beta`` makes the bias ``b``
redundant, so the Linear has none). The output layer is a plain ``Linear`` (logits for the
cross-entropy loss). Modules are named ``fc1, bn1, sigmoid1, fc2, ..., out``, so the input of
the last hidden sigmoid is ``model.sigmoid<depth>``'s input (what Figure 1(b, c) follows).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from batchnorm.modules import BatchNorm1d


def sigmoid_mlp(
    in_features: int = 784,
    num_classes: int = 10,
    hidden: Sequence[int] = (100, 100, 100),
    *,
    bn: bool = False,
    init_std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``in_features -> hidden[0] -> ... -> num_classes`` with sigmoid hidden units.

    Args:
        bn: insert :class:`batchnorm.BatchNorm1d` before every sigmoid (hidden Linears lose
            their bias).
        init_std: every weight ~ N(0, init_std^2), biases 0; ``None`` uses
            ``1/sqrt(fan_in)`` per layer.
        generator: draws the initial weights (default: torch's global generator). The weights
            are drawn in the same order with and without BN, so with equal generator states
            both networks start from the same weight matrices.
    """
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"sigmoid_mlp: hidden must be a non-empty list of positive ints, got "
                         f"{hidden!r}")
    if init_std is not None and not init_std > 0:
        raise ValueError(f"sigmoid_mlp: init_std must be positive or None, got {init_std!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    sizes = [in_features, *hidden]
    for i, (fan_in, width) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
        layers[f"fc{i}"] = _init(nn.Linear(fan_in, width, bias=not bn), init_std, generator)
        if bn:
            layers[f"bn{i}"] = BatchNorm1d(width)
        layers[f"sigmoid{i}"] = nn.Sigmoid()
    layers["out"] = _init(nn.Linear(sizes[-1], num_classes), init_std, generator)
    return nn.Sequential(layers)


@torch.no_grad()
def _init(linear: nn.Linear, std: float | None, generator: torch.Generator | None) -> nn.Linear:
    std = 1.0 / math.sqrt(linear.in_features) if std is None else std
    linear.weight.normal_(0.0, std, generator=generator)
    if linear.bias is not None:
        linear.bias.zero_()
    return linear
