"""The backend seam: the one place where a batch-norm call is routed to an implementation.

A backend is a callable with the signature of :func:`batchnorm.functional.batch_norm`
(without ``backend``) that receives already-validated arguments, plus a ``supports``
predicate that says why it cannot take a given call (``None`` when it can).

Backends shipped with the package, each a module exposing ``batch_norm`` and ``supports``
that this seam imports on first use and registers (:data:`_LAZY`); the seam imports neither
of them, so importing :mod:`batchnorm.functional` loads neither (it loads only the plain ATen
form, :mod:`batchnorm.backends.composite`, for empty batches):

``"torch"``
    :mod:`batchnorm.backends.torch_backend`: our closed-form autograd Function written in
    PyTorch tensor ops (fused C++ kernels on the CPU in plain eager mode, plain ATen
    operations for compilers and tracers). Runs on every device and dtype,
    supports every activation and residual; the fallback for everything.
``"triton"``
    :mod:`batchnorm.kernels`: our Triton GPU kernels, available when Triton imports.

Other backends can be added at run time with :func:`register_backend`.

``backend="auto"`` picks ``"triton"`` for CUDA tensors when it is available and supports the
call, and ``"torch"`` otherwise. A backend that is not ``composable`` (a module constant
``COMPOSABLE``; only ``"torch"`` is) does not support calls under ``torch.func`` transforms,
forward-mode AD or ``torch.jit.trace`` (:func:`active_transform`). Naming a backend
explicitly never falls back silently: an unsupported call raises with the backend's reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad


@dataclass(frozen=True)
class Backend:
    name: str
    batch_norm: Callable[..., torch.Tensor]
    # supports(input, weight, training, activation, residual) -> None or a reason string
    supports: Callable[..., str | None]
    #: whether it works under torch.func transforms, forward-mode AD and torch.jit.trace; a
    #: backend that is not is only chosen (or accepted) when none of them is active
    composable: bool = False


_REGISTRY: dict[str, Backend] = {}
#: name -> the module implementing it (``batch_norm`` and ``supports``), imported on first use.
_LAZY = {"torch": "batchnorm.backends.torch_backend", "triton": "batchnorm.kernels"}
_IMPORT_ERRORS: dict[str, str] = {}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` callable as ``batch_norm(..., backend=backend.name)``."""
    _REGISTRY[backend.name] = backend


def available_backends() -> list[str]:
    for name in _LAZY:
        _load(name)
    return sorted(_REGISTRY)


@torch.compiler.assume_constant_result
def _import(name: str) -> bool:
    """Import and register backend ``name`` if it is one of ours and not yet loaded; return
    whether it is registered. Under ``torch.compile`` this runs as plain Python while the graph
    is traced, its result a constant of the graph: Dynamo cannot trace the import machinery,
    and a model compiled before its first eager call still loads its backend here."""
    if name not in _REGISTRY and name in _LAZY and name not in _IMPORT_ERRORS:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as error:  # e.g. Triton not installed
            _IMPORT_ERRORS[name] = f"{type(error).__name__}: {error}"
        else:
            register_backend(Backend(name, module.batch_norm, module.supports,
                                     getattr(module, "COMPOSABLE", False)))
    return name in _REGISTRY


def _load(name: str) -> Backend | None:
    return _REGISTRY.get(name) if _import(name) else None


def active_transform() -> str | None:
    """``None`` in plain eager mode, else which tool must see this call's operations, in
    words (for error messages).

    Kernels that write through raw pointers (our fused C++ CPU kernels, the Triton kernels'
    eager path) are invisible to ``torch.func`` transforms (their wrapped tensors have no
    storage), to forward-mode AD (no tangent rule) and to ``torch.jit.trace`` (which records
    only the output's allocation). A few hundred nanoseconds: the fused path calls it on every
    training call.
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (grad, vjp, jvp, vmap, ...) is active"
    if forward_ad._current_level >= 0:
        return "forward-mode AD (torch.autograd.forward_ad.dual_level) is active"
    if torch._C._get_tracing_state():
        return "torch.jit.trace is tracing"
    return None


_FUSED_DTYPES = (torch.float32, torch.float64)
#: the types of weight and bias that fused kernels read (no tensor subclasses)
_PLAIN = (type(None), torch.Tensor, torch.nn.Parameter)


def fused_candidate(x, weight, bias) -> bool:
    """The part of :func:`plain_eager` that only Python sees: plain CPU float32/64 tensors (no
    subclass, not even one with only ``__torch_function__``) and no compiler tracing this Python
    code. Our core C++ kernels check the rest themselves (functorch transforms, forward-mode AD
    tangents, dispatch modes, ``torch.jit.trace``; ``cpu/batchnorm_cpu.cpp``, ``plain_eager``),
    so the core's per-call price is this fraction of a microsecond."""
    return (
        type(x) is torch.Tensor and x.dtype in _FUSED_DTYPES and x.is_cpu
        and not torch.compiler.is_compiling()
        and type(weight) in _PLAIN and type(bias) in _PLAIN
    )


def plain_eager(x, weight, bias) -> bool:
    """Whether this call may take fused C++ kernels that do not check their context themselves
    (the BN family's, :mod:`batchnorm.backends.family`): :func:`fused_candidate`, and no
    dispatch mode, transform, tracer or forward-mode AD level active (each of those must see
    the operations, which the kernels hide). About half a microsecond of checks; the order puts
    the cheapest and most often failing first."""
    return (
        fused_candidate(x, weight, bias)
        and not torch._C._len_torch_dispatch_stack()
        and active_transform() is None
    )


def _reason(backend: Backend, input, weight, training, activation, residual) -> str | None:
    """Why ``backend`` cannot run this call, or None."""
    reason = backend.supports(input, weight, training, activation, residual)
    if reason is None and not backend.composable and not torch.compiler.is_compiling():
        reason = active_transform()
    return reason


def resolve(name: str, input: torch.Tensor, weight, training, activation, residual) -> Backend:
    """Return the backend that runs this call, or raise a clear error."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        if input.is_cuda:
            triton = _load("triton")
            if triton is not None and _reason(
                triton, input, weight, training, activation, residual
            ) is None:
                return triton
        return _load("torch")
    backend = _load(name)
    if backend is None:
        known = sorted(set(_LAZY) | set(_REGISTRY) | {"auto"})
        if name in _IMPORT_ERRORS:
            raise RuntimeError(f"backend={name!r} is not available: {_IMPORT_ERRORS[name]}")
        raise ValueError(f"backend must be one of {known}, got {name!r}")
    reason = _reason(backend, input, weight, training, activation, residual)
    if reason is not None:
        raise NotImplementedError(
            f"backend={name!r} does not support this call: {reason}. "
            "Use backend='torch' (any device) or backend='auto' (falls back to 'torch')."
        )
    return backend
