"""A small convolutional network for CPU-feasible sweeps (the learning-rate sweep).

Three 3x3 convolution units ``g(BN(W u))`` (or ``g(W u + b)`` without BN), the first two followed
by 2x2 max pooling, then global average pooling and one linear layer::

    conv 3x3 (c) -> pool 2 -> conv 3x3 (2c) -> pool 2 -> conv 3x3 (4c) -> avg pool -> linear

It is built from the same blocks as :class:`~batchnorm.models.inception.InceptionBN`
(:mod:`batchnorm.models.blocks`), so "with BN" and "without BN" mean exactly what they mean there.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from batchnorm.models.blocks import (
    NONLINEARITIES,
    ConvUnit,
    check_choice,
    check_positive_int,
    init_weights,
)


class SmallConvNet(nn.Module):
    """Args: ``num_classes``, ``in_channels``, ``bn`` (BN before every nonlinearity),
    ``activation`` (``"relu"`` or ``"sigmoid"``), ``channels`` (c, the first layer's width),
    ``norm`` (with ``bn``: ``norm(channels, activation)`` builds each normalization layer, e.g. a
    Batch Renorm or Ghost BN layer; default :class:`batchnorm.BatchNorm2d`)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, bn: bool = True,
                 activation: str = "relu", channels: int = 16,
                 norm: Callable[[int, str], nn.Module] | None = None):
        super().__init__()
        check_choice("SmallConvNet", "activation", activation, NONLINEARITIES)
        check_positive_int("SmallConvNet", "channels", channels)
        unit = dict(bn=bn, activation=activation, norm=norm)
        c = channels
        self.features = nn.Sequential(
            ConvUnit(in_channels, c, 3, **unit), nn.MaxPool2d(2),
            ConvUnit(c, 2 * c, 3, **unit), nn.MaxPool2d(2),
            ConvUnit(2 * c, 4 * c, 3, **unit), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * c, num_classes)
        init_weights(self, activation)

    def forward(self, x):
        return self.fc(self.features(x))
