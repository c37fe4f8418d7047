"""Fused CPU kernels for the ``"torch"`` backend's BN (float32 and float64).

Composed of ATen operations, training BN costs about a dozen passes over the tensor plus a
dozen per-channel operations; ``batchnorm_cpu.cpp`` does the same math (statistics and the
backward's sums in double, the closed-form backward) reading the tensors once per direction
where the layout allows (contiguous inputs: a channel is reduced, then rewritten from the
cache) and twice otherwise (channels-last), inside a C++ autograd Function (a Python one costs
more than the kernels on small layers). Eval mode is one pass, ``y = x * scale + shift``.
Double backward recomputes the statistics inside the graph with ATen operations, as the Python
Function does. It is compiled with the system's C++ compiler on first use
(``torch.utils.cpp_extension``, cached under ``~/.cache/torch_extensions``, about a minute
once).

When it cannot be used, :mod:`batchnorm.autograd` computes the same formulas with ATen
operations: other dtypes or devices, no compiler (a warning says so once), or
``BATCHNORM_CPU_KERNELS=0`` in the environment.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

ENV_VAR = "BATCHNORM_CPU_KERNELS"
SOURCE = Path(__file__).with_name("batchnorm_cpu.cpp")
_DTYPES = (torch.float32, torch.float64)
_state: dict = {"module": None, "failed": False}


def build_options() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this CPU.

    With AVX2 (which torch reports for AVX-512 machines too) the kernels use 32-byte vectors;
    otherwise the compiler's baseline. Fused multiply-adds are off, so that both builds round
    every operation alike and give the same bits. The name ends in a hash of the source, the
    flags and the torch version, so two checkouts or versions on one machine (they share
    ``~/.cache/torch_extensions``) each keep their own build instead of rebuilding each
    other's; torch's build lock means a process never loads a half-written library.
    """
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    base = "batchnorm_cpu"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        base, flags = "batchnorm_cpu_avx2", [*flags, "-mavx2", "-mfma"]
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([*flags, torch.__version__]).encode())
    return f"{base}_{digest.hexdigest()[:12]}", flags


def extension():
    """The compiled extension, or ``None`` (disabled, or compilation failed: warned once)."""
    if _state["module"] is not None or _state["failed"]:
        return _state["module"]
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        name, flags = build_options()
        _state["module"] = load(name=name, sources=[str(SOURCE)], extra_cflags=flags,
                                extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers, ...: the ATen path still works
        _state["failed"] = True
        warnings.warn(f"batchnorm: the fused CPU kernels could not be compiled ({error}); "
                      f"using ATen operations instead (slower, same results). Set "
                      f"{ENV_VAR}=0 to silence this.", RuntimeWarning, stacklevel=3)
    return _state["module"]


def train(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float,
          eps: float):
    """Training-mode BN of ``x`` through the kernels and their C++ autograd Function (the
    running statistics are updated in place when given), or ``None`` when the kernels cannot
    take ``x``: then the caller uses :class:`batchnorm.autograd.BatchNormFunction`."""
    if x.dtype not in _DTYPES or not x.is_cpu or (module := extension()) is None:
        return None
    return module.train(x, weight, bias, running_mean, running_var, momentum, eps)


def infer(x: torch.Tensor, weight, bias, running_mean, running_var, eps: float):
    """Eval-mode BN of ``x`` in one pass, ``x * scale + shift`` with the ATen path's rounding
    (differentiable in ``x``, ``weight`` and ``bias``), or ``None`` when the kernels cannot take
    the call: then the caller uses ATen operations."""
    if x.dtype not in _DTYPES or not x.is_cpu or (module := extension()) is None:
        return None
    return module.infer(x, weight, bias, running_mean, running_var, eps)
