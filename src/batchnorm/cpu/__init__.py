"""Fused CPU kernels for the ``"torch"`` backend's BN (float32 and float64).

Composed of ATen operations, training BN costs about a dozen passes over the tensor plus a
dozen per-channel operations; the C++ sources here (:data:`SOURCES`, :data:`HEADERS`; the list
of files and what each holds heads ``batchnorm_cpu.cpp``) do the same math (statistics and the
backward's sums in double, the closed-form backward) reading the tensors once per direction
where the layout allows (contiguous inputs: a channel is reduced, then rewritten from the
cache) and twice otherwise (channels-last), inside a C++ autograd Function (a Python one costs
more than the kernels on small layers). Eval mode is one pass, ``y = x * scale + shift``.
Double backward recomputes the statistics inside the graph with ATen operations, as the Python
Function does. It is compiled with the system's C++ compiler on first use
(``torch.utils.cpp_extension``, cached under ``~/.cache/torch_extensions``, about a minute
once).

When it cannot be used, :mod:`batchnorm.backends.torch_backend` computes the same formulas with ATen
operations: other dtypes or devices, no compiler (a warning says so once), or
``BATCHNORM_CPU_KERNELS=0`` in the environment.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

ENV_VAR = "BATCHNORM_CPU_KERNELS"
_HERE = Path(__file__).parent
#: compiled into one extension; batchnorm_cpu.cpp holds the bindings
SOURCES = tuple(_HERE / name for name in ("batchnorm_cpu.cpp", "train.cpp", "train_contiguous.cpp",
                                          "train_channels_last.cpp", "eval.cpp"))
#: included by the sources: part of the extension's name, not compiled on their own
HEADERS = (_HERE / "kernels.h", _HERE / "contiguous.h", _HERE / "rows.h",
           _HERE / "batchnorm_cpu.h")
_DTYPES = (torch.float32, torch.float64)
_state: dict = {"module": None, "failed": False}


def _paths(files: Path | Sequence[Path]) -> list[Path]:
    return [files] if isinstance(files, Path) else list(files)


def extension_name(base: str, files: Path | Sequence[Path], flags: list[str]) -> str:
    """``base`` and a hash of the files (sources and the headers they include: their text and
    their paths), the flags and the torch version: two checkouts or versions on one machine
    (they share ``~/.cache/torch_extensions``) each keep their own build instead of rebuilding
    each other's (torch's build files name the sources' paths, so ninja would see other inputs);
    torch's build lock means a process never loads a half-written library. One file hashes as
    it did when the loader took only one."""
    paths = _paths(files)
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        digest.update((b"\0" if i else b"") + path.read_bytes())
    digest.update(" ".join([*flags, torch.__version__, *(str(p.resolve()) for p in paths)])
                  .encode())
    return f"{base}_{digest.hexdigest()[:12]}"


def compile_extension(base: str, sources: Path | Sequence[Path], flags: list[str], who: str,
                      headers: Sequence[Path] = ()):
    """The extension built from ``sources`` (one path or several; compiled on first use, then
    cached), named by :func:`extension_name` of the sources and ``headers``; or ``None`` after a
    warning naming ``who`` when it cannot be compiled (no compiler, no headers, ...): the callers
    then compute the same formulas with ATen operations."""
    sources = _paths(sources)
    try:
        from torch.utils.cpp_extension import load

        return load(name=extension_name(base, [*sources, *headers], flags),
                    sources=[str(p) for p in sources], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers, ...: the ATen path still works
        warnings.warn(f"{who}: the fused CPU kernels could not be compiled ({error}); using "
                      f"ATen operations instead (slower, same results). Set {ENV_VAR}=0 to "
                      "silence this.", RuntimeWarning, stacklevel=4)
        return None


def _base_and_flags() -> tuple[str, list[str]]:
    """With AVX2 (which torch reports for AVX-512 machines too) the kernels use 32-byte vectors;
    otherwise the compiler's baseline. Fused multiply-adds are off, so that both builds round
    every operation alike and give the same bits."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "batchnorm_cpu_avx2", [*flags, "-mavx2", "-mfma"]
    return "batchnorm_cpu", flags


def build_options() -> tuple[str, list[str]]:
    """The extension's name (:func:`extension_name`) and compiler flags for this CPU."""
    base, flags = _base_and_flags()
    return extension_name(base, [*SOURCES, *HEADERS], flags), flags


def extension():
    """The compiled extension, or ``None`` (disabled, or compilation failed: warned once)."""
    if _state["module"] is not None or _state["failed"]:
        return _state["module"]
    if os.environ.get(ENV_VAR, "1") == "0":
        return None
    base, flags = _base_and_flags()
    _state["module"] = compile_extension(base, SOURCES, flags, "batchnorm", HEADERS)
    _state["failed"] = _state["module"] is None
    return _state["module"]


def train(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float,
          eps: float):
    """Training-mode BN of ``x`` through the kernels and their C++ autograd Function (the
    running statistics are updated in place when given), or ``None`` when the kernels cannot
    take ``x``: then the caller uses :class:`batchnorm.backends.function.BatchNormFunction`."""
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


def fixed_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """Frozen BN's map ``x * scale + shift`` with fixed per-channel ``scale`` and ``shift`` (no
    gradient to them; cast to ``x``'s dtype), one pass each way (``dx = dy * scale``), multiply
    and add rounded apart like the eval kernel's; or ``None`` when the kernels cannot take the
    call: then the caller uses ATen operations."""
    if x.dtype not in _DTYPES or not x.is_cpu or x.numel() == 0 or (module := extension()) is None:
        return None
    return module.fixed_affine(x, scale, shift)
