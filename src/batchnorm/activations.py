"""The one table of activations our BN layers can fuse, and the epilogue that applies them.

Every layer computes ``y = activation(BN(x) + residual)``. This module owns the names (what
users pass as ``activation=``), the ATen implementation of each, the integer code the Triton
kernels branch on, the ``torch.nn`` module of each (what :func:`batchnorm.fold` leaves behind),
and the check that turns a bad name into an error that lists the choices.
Backends, modules, ``SyncBatchNorm``, ``convert`` and the tests all read it from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: name -> ATen implementation. ``leaky_relu`` uses torch's default negative slope 0.01.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "silu": F.silu,
}

#: name (or ``None`` for no activation) -> the ``ACT`` constant the Triton kernels branch on.
KERNEL_CODES: dict[str | None, int] = {
    None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "silu": 5,
}
assert set(KERNEL_CODES) - {None} == set(ACTIVATIONS)

#: name -> the ``torch.nn`` module computing the same function (default arguments).
MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
assert set(MODULES) == set(ACTIVATIONS)


def check_activation(activation, who: str) -> None:
    """Raise ``ValueError`` naming ``who`` and the choices unless ``activation`` is one of
    ours or ``None``."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"{who}: activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )


def epilogue(y: torch.Tensor, activation: str | None, residual: torch.Tensor | None):
    """``activation(y + residual)`` with either part optional (ATen ops, exact autograd)."""
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y
