"""The one table of activations our BN layers can fuse, and the epilogue that applies them.

Every layer computes ``y = activation(BN(x) + residual)``. This module owns the names (what
users pass as ``activation=``), the ATen implementation of each (:func:`activate`), the integer
code the Triton kernels branch on, the ``torch.nn`` module of each (what :func:`batchnorm.fold`
leaves behind), and the check that turns a bad name into an error that lists the choices.
Backends, modules, ``SyncBatchNorm``, ``convert`` and the tests all read it from here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation(y)`` for a name of :data:`ACTIVATIONS` (``None``: ``y``). An ``if`` chain,
    not a table of callables, so that TorchScript compiles it (the scripted layers use it)."""
    if activation is None:
        return y
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y)  # torch's default negative slope 0.01
    if activation == "sigmoid":
        return torch.sigmoid(y)
    if activation == "tanh":
        return torch.tanh(y)
    if activation == "silu":
        return F.silu(y)
    raise ValueError("activation must be None or one of relu, leaky_relu, sigmoid, tanh, silu")


#: the activations' names, in the order of the kernels' codes
NAMES = ["relu", "leaky_relu", "sigmoid", "tanh", "silu"]
#: name -> the function computing it (:func:`activate` with that name)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    name: functools.partial(activate, activation=name) for name in NAMES
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


def epilogue(y: torch.Tensor, activation: str | None,
             residual: torch.Tensor | None) -> torch.Tensor:
    """``activation(y + residual)`` with either part optional (ATen ops, exact autograd;
    TorchScript compiles it)."""
    if residual is not None:
        y = y + residual
    return activate(y, activation)
