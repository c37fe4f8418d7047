"""Building blocks shared by the convolutional models: the convolution unit ``g(BN(W u))`` /
``g(W u + b)``, the initialization, and the list of model nonlinearities.

:class:`~batchnorm.models.inception.InceptionBN` and :class:`~batchnorm.models.convnet.
SmallConvNet` are both made of :class:`ConvUnit` s and initialized by :func:`init_weights`, so
"with BN" and "without BN" mean exactly the same thing in both.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from batchnorm.modules import BatchNorm2d

#: A factory ``(channels, activation) -> module`` for BN with its activation fused: what the
#: models' ``norm`` argument takes in place of their default
#: ``batchnorm.BatchNorm2d(channels, activation=activation)``, e.g. a BN-family variant
#: (``lambda c, act: batchnorm.BatchRenorm2d(c, activation=act)``) or a layer that fixes its own
#: activation (``lambda c, act: batchnorm.InPlaceABN2d(c, negative_slope=0.01)``); the model
#: passes the nonlinearity it was built with.
NormAct = Callable[[int, str], nn.Module]

#: The hidden nonlinearities the models offer (the paper's ReLU and sigmoid). Not to be
#: confused with :data:`batchnorm.activations.ACTIVATIONS`, what a BN layer can fuse.
NONLINEARITIES = ("relu", "sigmoid")


def check_choice(who: str, name: str, value, choices) -> None:
    """Raise ``ValueError`` naming ``who``, the argument and the choices unless ``value`` is one
    of ``choices``."""
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(who: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")


class ConvUnit(nn.Sequential):
    """``g(BN(W u))`` or ``g(W u + b)``; ``depth_multiplier`` makes ``W`` depthwise-separable.

    A ``Sequential`` of [conv (, pointwise conv), BN with fused activation | activation] so that
    tools that look for a convolution directly followed by BN (``batchnorm.fold``) find it.
    With ``bn``, ``norm`` (a :data:`NormAct` factory) makes the BN + activation layer,
    ``norm(out_channels, activation)``, instead of ``BatchNorm2d(out_channels,
    activation=activation)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
        bn: bool, activation: str, depth_multiplier: int | None = None,
        norm: NormAct | None = None,
    ):
        padding = kernel_size // 2
        layers: list[nn.Module] = []
        if depth_multiplier is None:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                    bias=not bn))
        else:
            mid = in_channels * depth_multiplier
            layers.append(nn.Conv2d(in_channels, mid, kernel_size, stride, padding,
                                    groups=in_channels, bias=False))
            layers.append(nn.Conv2d(mid, out_channels, 1, bias=not bn))
        if bn:
            layers.append(BatchNorm2d(out_channels, activation=activation) if norm is None
                          else norm(out_channels, activation))
        else:
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else nn.Sigmoid())
        super().__init__(*layers)


def init_weights(model: nn.Module, activation: str) -> None:
    """He-normal (fan-in) convolutions with the gain of the nonlinearity that follows; zero
    biases; BN at gamma = 1, beta = 0; linear layers at torch's default.

    The paper does not state its initialization. Variance-preserving fan-in scaling is the
    fair choice for the networks without BN (with BN the scale of ``W`` does not matter:
    BN(aWu) = BN(Wu)). A depthwise convolution (the first half of a separable one) feeds the
    pointwise convolution, not a nonlinearity, so it gets gain 1.
    """
    gain = "relu" if activation == "relu" else "sigmoid"
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            linear = module.groups > 1
            nn.init.kaiming_normal_(module.weight, mode="fan_in",
                                    nonlinearity="linear" if linear else gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.Linear)):
            module.reset_parameters()

