"""The BN family's fused CPU kernels (``batchnorm/cpu/family_cpu.cpp``): Ghost BN, Batch
Renormalization and in-place ABN in training, each with its C++ autograd Function.

Compiled with the system's C++ compiler on first use (``torch.utils.cpp_extension``, cached
under ``~/.cache/torch_extensions`` by :func:`batchnorm.cpu.compile_extension`, which names and
builds the core kernels too). The entry points return ``None`` when the kernels cannot take a call
(other devices or dtypes, mixed dtypes, no compiler, ``BATCHNORM_CPU_KERNELS=0`` (the switch the
core kernels also obey), or anything but plain eager mode (under ``torch.compile``,
``torch.export``, ``torch.jit.trace``, ``torch.func`` or forward-mode AD the kernels'
raw-pointer writes would be invisible; the check is the core kernels',
:func:`batchnorm.backends.plain_eager`); the callers then use their ATen implementations,
which compute the same formulas.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from batchnorm.backends import plain_eager

SOURCE = Path(__file__).parent.parent / "cpu" / "family_cpu.cpp"
#: the core's headers it includes (part of the extension's name)
HEADERS = tuple(SOURCE.parent / name for name in ("kernels.h", "contiguous.h", "rows.h"))
ACTIVATION_CODES = {"identity": 0, "leaky_relu": 1, "elu": 2}
_loaded: dict = {}


def _load():
    # imported on first use: importing batchnorm loads no backend
    from batchnorm.cpu import compile_extension

    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]  # selects may compute both sides
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    _loaded["module"] = compile_extension("batchnorm_family", SOURCE, flags,
                                          "batchnorm.variants", HEADERS)
    return _loaded["module"]


def _extension():
    from batchnorm.cpu import ENV_VAR

    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    return _loaded["module"] if "module" in _loaded else _load()


def grouped_train(x, weight, bias, running_mean, running_var, sizes: list[int],
                  factors: list[float], eps: float, renorm: bool = False, r_max: float = 1.0,
                  d_max: float = 0.0, sigma_average: bool = True):
    """Training BN with statistics per group of samples (``sizes`` along dim 0; running
    statistics updated once per group with ``factors``), or, with ``renorm``, Batch
    Renormalization (one group). ``None`` when the kernels cannot take the call (the extension
    checks devices, dtypes and layouts)."""
    ext = _extension()
    if ext is None or not plain_eager(x, weight, bias):
        return None
    return ext.grouped_train(x, weight, bias, running_mean, running_var, sizes, factors, eps,
                             renorm, r_max, d_max, sigma_average)


def abn_train(x, weight, bias, running_mean, running_var, momentum: float, eps: float,
              activation: str, negative_slope: float, alpha: float, inplace: bool):
    """In-place ABN in training, ``weight`` the raw gamma (the kernels use ``|gamma| + eps``):
    the output ``z``, or ``None`` when the kernels cannot take the call."""
    ext = _extension()
    if ext is None or not plain_eager(x, weight, bias):
        return None
    return ext.abn_train(x, weight, bias, running_mean, running_var, momentum, eps,
                         ACTIVATION_CODES[activation], negative_slope, alpha, inplace)
