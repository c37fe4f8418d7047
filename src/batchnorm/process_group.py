"""Where this process stands in ``torch.distributed``: the one home of rank, world size and
"am I the main process", safe to call whether or not a process group exists."""

from __future__ import annotations

import torch.distributed as dist


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is built in and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes in the default group, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def is_distributed() -> bool:
    """Whether more than one process takes part (statistics must then be pooled)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and shows progress."""
    return rank() == 0


def leave() -> None:
    """Destroy the default process group, if there is one. A command that joined one calls this
    when it is done: gloo's threads otherwise outlive the interpreter's teardown and can abort
    the process at exit ("terminate called without an active exception")."""
    if is_initialized():
        dist.destroy_process_group()
