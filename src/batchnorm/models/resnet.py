"""A small pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks",
2016) for 28x28 / 32x32 images: the residual family the in-place activated BN paper trains
(its WideResNet and ResNeXt are pre-activation networks).

Every BN is directly followed by its activation, so BN + activation is one layer (``norm``),
which is where in-place activated BN plugs in::

    conv 3x3 (w)
    stage s = 1..stages, width w 2^(s-1), the first block of stages 2.. with stride 2:
        [norm -> conv 3x3 (stride) -> norm -> conv 3x3] + shortcut      x blocks
    norm -> global average pool -> linear

The shortcut is the identity, or where the width or resolution changes a 1x1 convolution
(with the stride) of the block's pre-activated input, as in He et al. Convolutions have no
bias (every one feeds a BN, or the residual sum that the next BN normalizes).

``norm`` is a factory ``(channels, activation) -> BN + activation layer``
(:data:`~batchnorm.models.blocks.NormAct`); the default is
``batchnorm.BatchNorm2d(c, activation="relu")``. A ``norm`` layer must not write over its
input: the block's shortcut still reads it (so in-place ABN with ``inplace=False``).
Weights: :func:`~batchnorm.models.blocks.init_weights` (He-normal for ReLU).
"""

from __future__ import annotations

from torch import nn

from batchnorm.models.blocks import NormAct, check_positive_int, init_weights
from batchnorm.modules import BatchNorm2d


def _bn_act(channels: int, activation: str) -> nn.Module:
    return BatchNorm2d(channels, activation=activation)


class PreActBlock(nn.Module):
    """``conv(norm(conv(norm(x)))) + shortcut``, the shortcut the identity or a strided 1x1
    convolution of ``norm(x)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormAct):
        super().__init__()
        self.norm1 = norm(in_channels, "relu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm2 = norm(out_channels, "relu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (None if stride == 1 and in_channels == out_channels else
                         nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward(self, x):
        a = self.norm1(x)
        skip = x if self.shortcut is None else self.shortcut(a)
        return self.conv2(self.norm2(self.conv1(a))) + skip


class PreActResNet(nn.Module):
    """Args: ``num_classes``, ``in_channels``, ``width`` (channels of the first stage),
    ``blocks`` (residual blocks per stage), ``stages`` (each after the first halves the
    resolution and doubles the width), ``norm`` (BN + activation factory, see the module
    docstring)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 16,
                 blocks: int = 2, stages: int = 3, norm: NormAct | None = None):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("width", width), ("blocks", blocks), ("stages", stages)):
            check_positive_int("PreActResNet", name, value)
        norm = _bn_act if norm is None else norm
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, channels = [], width
        for stage in range(stages):
            out = width * 2 ** stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, out, stride, norm))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(norm(channels, "relu"), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self, "relu")

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))))
