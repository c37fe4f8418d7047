"""A small VGG-style CNN for 28x28 grayscale images (MNIST, Fashion-MNIST).

Santurkar et al. (2018) study BN's mechanism on VGG networks; this is a CPU-sized member of
that family: ``stages`` blocks of ``depth`` 3x3 convolutions (padding 1) each followed by an
optional normalization layer and ReLU, a 2x2 max pool after every block, the width doubling
from block to block, then a VGG classifier (flatten, one hidden fully connected layer with
ReLU, the output layer)::

    [conv 3x3 (w) -> norm -> relu] x depth -> pool 2      28 -> 14
    [conv 3x3 (2w) -> norm -> relu] x depth -> pool 2     14 -> 7
    [conv 3x3 (4w) -> norm -> relu] x depth -> pool 2      7 -> 3
    flatten -> linear (hidden) -> relu -> linear (classes)

Normalization comes from ``norm``, a factory ``num_channels -> module``: the default is
:class:`batchnorm.BatchNorm2d`; ``torch.nn.BatchNorm2d`` or any other factory works; ``None``
gives the plain network. With a norm layer the convolutions have no bias (BN's beta subsumes
it, Ioffe & Szegedy's Algorithm 2); without one they have a bias. Modules are named
``features.block{b}.conv{k}``, ``.norm{k}``, ``.relu{k}``, ``.pool`` and ``classifier.fc``,
``.relu``, ``.out``.

Weights: convolutions and the hidden layer He-normal (fan-in, for ReLU), the output layer
``N(0, 1/fan_in)``, biases 0, drawn from ``generator`` (default torch's global one) in module
order, so with and without BN equal generator states give the same convolution weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from batchnorm.modules import BatchNorm2d

NormFactory = Callable[[int], nn.Module]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"VGGNet: {name} must be a positive int, got {value!r}")
    return value


class VGGNet(nn.Module):
    """Args: ``num_classes``, ``in_channels``, ``norm`` (factory or None), ``width`` (channels
    of the first block), ``depth`` (convolutions per block), ``stages`` (blocks, each halving
    the resolution), ``hidden`` (units of the hidden fully connected layer), ``image_size``
    (input height = width), ``generator`` (for the initial weights)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *,
                 norm: NormFactory | None = BatchNorm2d, width: int = 16, depth: int = 2,
                 stages: int = 3, hidden: int = 128, image_size: int = 28,
                 generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("width", width), ("depth", depth), ("stages", stages),
                            ("hidden", hidden), ("image_size", image_size)):
            _positive_int(name, value)
        if norm is not None and not callable(norm):
            raise TypeError(f"VGGNet: norm must be a factory num_channels -> module or None, "
                            f"got {type(norm).__name__}")
        size = image_size >> stages
        if size < 1:
            raise ValueError(f"VGGNet: {stages} stages of 2x2 pooling leave nothing of a "
                             f"{image_size}x{image_size} image")
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for b in range(1, stages + 1):
            out = width * 2 ** (b - 1)
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for k in range(1, depth + 1):
                layers[f"conv{k}"] = nn.Conv2d(channels, out, 3, padding=1, bias=norm is None)
                if norm is not None:
                    layers[f"norm{k}"] = norm(out)
                layers[f"relu{k}"] = nn.ReLU()
                channels = out
            layers["pool"] = nn.MaxPool2d(2)
            blocks[f"block{b}"] = nn.Sequential(layers)
        self.features = nn.Sequential(blocks)
        self.classifier = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(), fc=nn.Linear(channels * size * size, hidden), relu=nn.ReLU(),
            out=nn.Linear(hidden, num_classes)))
        self._init(generator)

    @torch.no_grad()
    def _init(self, generator: torch.Generator | None) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                gain = 1.0 if module is self.classifier.out else 2.0
                module.weight.normal_(0.0, math.sqrt(gain / fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
