"""How much memory a training step keeps for the backward, and its peak: two measurements that
need nothing of this library (any ``nn.Module``).

**Saved bytes** (:class:`SavedTensors`): inside the context, every tensor autograd saves for
the backward passes ``torch.autograd.graph.saved_tensors_hooks``' pack hook (Python and C++
autograd Functions alike). What it keeps alive is the tensor's *storage*, so we count storages,
each distinct one once (keyed by its data pointer and device) at its full size
(``untyped_storage().nbytes()``): a view saved by one layer and its base saved by another cost
one storage; a tensor saved by two layers (a ReLU's output that the next convolution saves as
its input) is counted once; a small view of a large buffer costs the whole buffer, since it
keeps all of it alive. The keys are unambiguous because every saved tensor, kept by the pack
hook until the counter is closed, stays alive: no storage address is reused meanwhile.

Storages of the model's parameters and buffers (a convolution saves its weight) are counted
apart (``parameter_bytes``): they are resident anyway, not activations. A storage is
attributed to the *blocks* (``block_bytes``) when a module for which ``is_block(module)`` holds
saved it inside its forward (forward pre-/post-hooks mark the span); ``shared_bytes`` are the
block storages that something outside the blocks saved too (e.g. the activation's output the
next convolution keeps), so ``block_bytes - shared_bytes`` is what only the blocks keep.

**Peak memory** (:func:`peak_memory`): the most memory allocated at any moment while a function
runs, above what was allocated when it started. CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (the caching allocator's allocated bytes, not its reserved
pool). CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
of torch's CPU allocator; the running sum of those events in time order, maximized, is the
peak (allocations outside torch's allocator, e.g. a library's private workspace, are not
seen). The profiler's C++ side (kineto) prints ``USDT ... profiler_start`` / ``profiler_stop``
lines on the process's standard error that no setting turns off; file descriptor 2 is pointed
at ``/dev/null`` while it runs (Python's exceptions still propagate; anything else written to
the native stderr during the measured step is lost).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch
from torch import nn


class SavedTensors:
    """Context manager counting the storages saved for the backward while it is open (see the
    module docstring). After it closes: :attr:`total_bytes` (activations: every saved storage
    but the parameters'), :attr:`block_bytes`, :attr:`shared_bytes`, :attr:`parameter_bytes`,
    and :meth:`as_dict`. ``model``'s parameters and buffers are the "parameters"; ``is_block``
    (default: none) picks the modules whose saved storages are the blocks'."""

    def __init__(self, model: nn.Module,
                 is_block: Callable[[nn.Module], bool] = lambda module: False):
        self.model, self.is_block = model, is_block
        self._sizes: dict[tuple, int] = {}  # storage key -> bytes
        self._in_block: set[tuple] = set()
        self._outside: set[tuple] = set()
        self._kept: list[torch.Tensor] = []
        self._depth = 0
        self._handles: list = []
        self._hooks = None

    @staticmethod
    def key(tensor: torch.Tensor) -> tuple:
        return (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())

    def __enter__(self) -> SavedTensors:
        state = [*self.model.parameters(), *self.model.buffers()]
        self._parameters = {self.key(t) for t in state}
        for module in self.model.modules():
            if self.is_block(module):
                self._handles.append(module.register_forward_pre_hook(self._enter_block))
                self._handles.append(module.register_forward_hook(self._leave_block))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._kept.clear()

    def _enter_block(self, module, args) -> None:
        self._depth += 1

    def _leave_block(self, module, args, output) -> None:
        self._depth -= 1

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = self.key(tensor)
        self._sizes[key] = tensor.untyped_storage().nbytes()
        (self._in_block if self._depth > 0 else self._outside).add(key)
        self._kept.append(tensor)  # alive until the counter closes: addresses stay unique
        return tensor

    def _bytes(self, keys) -> int:
        return sum(self._sizes[k] for k in keys if k not in self._parameters)

    @property
    def total_bytes(self) -> int:
        return self._bytes(self._sizes)

    @property
    def block_bytes(self) -> int:
        return self._bytes(self._in_block)

    @property
    def shared_bytes(self) -> int:
        return self._bytes(self._in_block & self._outside)

    @property
    def parameter_bytes(self) -> int:
        return sum(size for k, size in self._sizes.items() if k in self._parameters)

    @property
    def storages(self) -> int:
        """Distinct activation storages saved."""
        return sum(1 for k in self._sizes if k not in self._parameters)

    def as_dict(self) -> dict:
        return dict(total_bytes=self.total_bytes, block_bytes=self.block_bytes,
                    shared_bytes=self.shared_bytes, parameter_bytes=self.parameter_bytes,
                    storages=self.storages)


def peak_memory(function: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated while ``function()`` runs on ``device``, above those allocated when
    it started (module docstring: CUDA's allocator statistics, the CPU's profiler events)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak_memory: measures cpu and cuda devices only, got {device}")
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_muted(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_muted():
    """File descriptor 2 to ``/dev/null`` inside the block (see the module docstring)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
