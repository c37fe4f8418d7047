"""The paper's Inception network (section 4.2 and its appendix table), with and without BN.

Layer table (output sizes for a 224x224 input; branch widths ``#1x1 | #3x3 reduce | #3x3 |
double #3x3 reduce | double #3x3 | pool + proj``)::

    conv 7x7/2, separable, depth multiplier 8   -> 112x112x64;  max pool 3x3/2 -> 56x56x64
    conv 1x1 (64), conv 3x3/1                   -> 56x56x192;   max pool 3x3/2 -> 28x28x192
    3a  64 |  64 | 64  |  64 |  96 | avg + 32         -> 28x28x256
    3b  64 |  64 | 96  |  64 |  96 | avg + 64         -> 28x28x320
    3c   0 | 128 | 160 |  64 |  96 | max + pass-thru  -> 14x14x576   (stride 2)
    4a 224 |  64 | 96  |  96 | 128 | avg + 128        -> 14x14x576
    4b 192 |  96 | 128 |  96 | 128 | avg + 128        -> 14x14x576
    4c 160 | 128 | 160 | 128 | 160 | avg + 128        -> 14x14x608
    4d  96 | 128 | 192 | 160 | 192 | avg + 128        -> 14x14x608
    4e   0 | 128 | 192 | 192 | 256 | max + pass-thru  -> 7x7x1056    (stride 2)
    5a 352 | 192 | 320 | 160 | 224 | avg + 128        -> 7x7x1024
    5b 352 | 192 | 320 | 192 | 224 | max + 128        -> 7x7x1024
    global avg pool -> 1x1x1024, dropout, linear, softmax (in the loss)

A module's output depth is the sum of its branches (``#1x1 + #3x3 + double #3x3 + proj``, or
the input depth for the pass-through). The paper's appendix prints 576 for 4c/4d and 1024 for 4e
and prints 3c/4e at their input resolution; those entries contradict its own branch widths, so
this implementation follows the widths (608, 608, 1056, the stride-2 resolutions), as the
reference Caffe re-implementations of BN-Inception do. "Double 3x3" is two stacked 3x3
convolutions with the same number of filters (replacing GoogLeNet's 5x5); in the stride-2
modules the last convolution of each branch has stride 2.

Every convolution is ``z = g(BN(W u))`` with ``bn=True`` (the bias is dropped: BN's beta
subsumes it) and ``z = g(W u + b)`` with ``bn=False``. ``g`` is ReLU or sigmoid; with BN it is
fused into :class:`batchnorm.BatchNorm2d` (``activation=``). The stem's separable convolution
is a depthwise 7x7/2 convolution producing 8 maps per input channel followed by a 1x1
convolution, with no nonlinearity between the two (one linear map, factored).

Local Response Normalization (``lrn=True``, GoogLeNet's size 5, alpha 1e-4, beta 0.75) sits
where GoogLeNet has it: after the first max pool (the small stem: after its first convolution)
and after the stem's 3x3 convolution.

Small images (``stem="small"``, e.g. 28x28 Fashion-MNIST or 32x32 CIFAR-10): only the stem
changes. Its first convolution becomes a separable 3x3/1 (same depth multiplier) and both max
pools are dropped, so a 28x28 input reaches module 3a at 28x28, exactly the resolution the
ImageNet stem gives it, and every module from 3a on is unchanged (32x32 inputs give 32, 16, 8).

``width`` multiplies every layer's filter count (``max(1, round(width * n))``) for cheap runs; at
``width=1`` the network is the paper's.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from batchnorm.models.blocks import (
    NONLINEARITIES,
    ConvUnit,
    NormAct,
    check_choice,
    check_positive_int,
    init_weights,
)

STEMS = ("imagenet", "small")
DEPTH_MULTIPLIER = 8


@dataclass(frozen=True)
class ModuleSpec:
    """One row of the layer table. ``proj == 0`` means the max-pool pass-through branch."""

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double_3x3: int
    pool: str
    proj: int
    stride: int = 1

    def out_channels(self, in_channels: int) -> int:
        return self.n1x1 + self.n3x3 + self.double_3x3 + (self.proj or in_channels)


MODULES: tuple[ModuleSpec, ...] = (
    ModuleSpec("3a", 64, 64, 64, 64, 96, "avg", 32),
    ModuleSpec("3b", 64, 64, 96, 64, 96, "avg", 64),
    ModuleSpec("3c", 0, 128, 160, 64, 96, "max", 0, stride=2),
    ModuleSpec("4a", 224, 64, 96, 96, 128, "avg", 128),
    ModuleSpec("4b", 192, 96, 128, 96, 128, "avg", 128),
    ModuleSpec("4c", 160, 128, 160, 128, 160, "avg", 128),
    ModuleSpec("4d", 96, 128, 192, 160, 192, "avg", 128),
    ModuleSpec("4e", 0, 128, 192, 192, 256, "max", 0, stride=2),
    ModuleSpec("5a", 352, 192, 320, 160, 224, "avg", 128),
    ModuleSpec("5b", 352, 192, 320, 192, 224, "max", 128),
)
STEM_WIDTHS = (64, 64, 192)  # conv1, conv2 reduce (1x1), conv2 (3x3)
PAPER_PARAMETERS = 13.6e6


class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3;
    pool (-> 1x1 projection). Branches with zero width are omitted (3c, 4e have no 1x1)."""

    def __init__(self, in_channels: int, spec: ModuleSpec, *, bn: bool, activation: str,
                 width: float = 1.0, norm: NormAct | None = None):
        super().__init__()
        w = _scaler(width)
        unit = dict(bn=bn, activation=activation, norm=norm)
        s = spec.stride
        self.spec = spec
        self.in_channels = in_channels
        branches: OrderedDict[str, nn.Module] = OrderedDict()
        if spec.n1x1:
            branches["b1x1"] = ConvUnit(in_channels, w(spec.n1x1), 1, **unit)
        branches["b3x3"] = nn.Sequential(
            ConvUnit(in_channels, w(spec.n3x3_reduce), 1, **unit),
            ConvUnit(w(spec.n3x3_reduce), w(spec.n3x3), 3, s, **unit),
        )
        branches["b3x3dbl"] = nn.Sequential(
            ConvUnit(in_channels, w(spec.double_reduce), 1, **unit),
            ConvUnit(w(spec.double_reduce), w(spec.double_3x3), 3, **unit),
            ConvUnit(w(spec.double_3x3), w(spec.double_3x3), 3, s, **unit),
        )
        if spec.pool == "avg":
            pool = nn.AvgPool2d(3, s, padding=1, count_include_pad=False)
        else:
            pool = nn.MaxPool2d(3, s, padding=1)
        if spec.proj:
            branches["pool"] = nn.Sequential(pool, ConvUnit(in_channels, w(spec.proj), 1, **unit))
        else:
            branches["pool"] = pool  # pass-through: the pooled input itself
        self.branches = nn.ModuleDict(branches)
        self.out_channels = (w(spec.n1x1) + w(spec.n3x3) + w(spec.double_3x3)
                             + (w(spec.proj) if spec.proj else in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches.values()], dim=1)


class InceptionBN(nn.Module):
    """The paper's Inception ("BN-Inception" with ``bn=True``); see the module docstring.

    Args:
        num_classes: outputs of the final linear layer (1000 for ImageNet).
        in_channels: input image channels (3 RGB, 1 grayscale).
        bn: BN before every nonlinearity (convolutions then have no bias).
        activation: ``"relu"`` or ``"sigmoid"`` for every hidden nonlinearity.
        dropout: dropout rate before the final linear layer (GoogLeNet used 0.4).
        lrn: Local Response Normalization in the stem (GoogLeNet's; the paper removes it in the
            accelerated BN networks).
        stem: ``"imagenet"`` (224x224 inputs, the table's stem) or ``"small"`` (28x28/32x32).
        width: filter-count multiplier (1 = the paper's network).
        norm: with ``bn``, a factory ``(channels, activation) -> BN + activation layer``
            (:data:`~batchnorm.models.blocks.NormAct`, e.g. in-place activated BN) used for
            every unit instead of ``BatchNorm2d(channels, activation=activation)``.
    """

    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, *, bn: bool = True,
        activation: str = "relu", dropout: float = 0.0, lrn: bool = False,
        stem: str = "imagenet", width: float = 1.0, norm: NormAct | None = None,
    ):
        super().__init__()
        check_choice("InceptionBN", "activation", activation, NONLINEARITIES)
        check_choice("InceptionBN", "stem", stem, STEMS)
        check_positive_int("InceptionBN", "num_classes", num_classes)
        check_positive_int("InceptionBN", "in_channels", in_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"InceptionBN: dropout must be in [0, 1), got {dropout!r}")
        if not width > 0:
            raise ValueError(f"InceptionBN: width must be > 0, got {width!r}")
        self.config = dict(num_classes=num_classes, in_channels=in_channels, bn=bn,
                           activation=activation, dropout=dropout, lrn=lrn, stem=stem,
                           width=width)
        w = _scaler(width)
        unit = dict(bn=bn, activation=activation, norm=norm)
        c1, c2r, c2 = (w(c) for c in STEM_WIDTHS)
        imagenet = stem == "imagenet"
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = ConvUnit(in_channels, c1, 7 if imagenet else 3, 2 if imagenet else 1,
                                   depth_multiplier=DEPTH_MULTIPLIER, **unit)
        if imagenet:
            layers["pool1"] = nn.MaxPool2d(3, 2, padding=1)
        if lrn:
            layers["lrn1"] = _lrn()
        layers["conv2_reduce"] = ConvUnit(c1, c2r, 1, **unit)
        layers["conv2"] = ConvUnit(c2r, c2, 3, **unit)
        if lrn:
            layers["lrn2"] = _lrn()
        if imagenet:
            layers["pool2"] = nn.MaxPool2d(3, 2, padding=1)
        self.stem = nn.Sequential(layers)

        modules: OrderedDict[str, nn.Module] = OrderedDict()
        channels = c2
        for spec in MODULES:
            module = InceptionModule(channels, spec, width=width, **unit)
            modules[f"inception_{spec.name}"] = module
            channels = module.out_channels
        self.inception = nn.Sequential(modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config["activation"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


def module_output_shapes(model: InceptionBN, image_size: int | tuple[int, int]
                         ) -> OrderedDict[str, tuple[int, int, int]]:
    """(C, H, W) after every stem layer and Inception module for one input of ``image_size``,
    computed by running the model (eval mode, no gradients) with forward hooks."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    shapes: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
    named = [(f"stem.{n}", m) for n, m in model.stem.named_children()]
    named += [(n.removeprefix("inception_"), m) for n, m in model.inception.named_children()]
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(
        n, tuple(out.shape[1:]))) for n, m in named]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, model.config["in_channels"], h, w, dtype=param.dtype,
                              device=param.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return shapes


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scaler(width: float):
    return lambda n: 0 if n == 0 else max(1, round(width * n))


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)


def __getattr__(name: str):
    """Deprecated names: ``ACTIVATIONS`` was this module's list of model nonlinearities."""
    if name == "ACTIVATIONS":
        import warnings

        warnings.warn("batchnorm.models.inception.ACTIVATIONS is deprecated: use "
                      "batchnorm.models.blocks.NONLINEARITIES (the activations a BN layer can "
                      "fuse are batchnorm.activations.ACTIVATIONS)", DeprecationWarning,
                      stacklevel=2)
        return NONLINEARITIES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
