"""Run a function in a gloo world of N processes on the CPU and collect what each returns.

Shared by the tests that need several processes (synchronized BN, DDP training). Spawning is
slow, so a world should run many checks and hand its results back to the test process.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, out_dir, target, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.save(target(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world, target, *args) -> list:
    """Run ``target(rank, world, *args)`` in ``world`` gloo processes (file:// rendezvous in
    ``tmp_path``); their return values, by rank. ``target`` must be importable (module level)."""
    out = tmp_path / f"out{world}"
    out.mkdir()
    mp.spawn(_entry, args=(world, str(tmp_path / f"init{world}"), str(out), target, args),
             nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
