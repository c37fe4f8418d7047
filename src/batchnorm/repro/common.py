"""Small utilities shared by the experiments: seeding, devices, rank-0 output, result files."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - code that uses the global NumPy state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """Only rank 0 writes files and shows progress in a distributed run."""
    return rank() == 0


def log(message: str) -> None:
    if is_main_process():
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_out_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: str | os.PathLike, data) -> None:
    if is_main_process():
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write a list of dicts (same keys) as CSV."""
    if not is_main_process() or not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def init_distributed() -> bool:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); return whether we did.

    gloo on the CPU, NCCL on CUDA; each process uses the GPU named by LOCAL_RANK.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = torch.distributed
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's share of a global mini-batch (strided, so uneven sizes differ by <= 1)."""
    return batch[rank() :: world_size()]


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First evaluated step whose test accuracy is >= ``target`` (None if never)."""
    for point in history:
        if point["test_accuracy"] is not None and point["test_accuracy"] >= target:
            return point["step"]
    return None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--no-download``, as every experiment has them."""
    parser.add_argument("--data-dir", default=None,
                        help="folder with the data set's files, or the data root (default: "
                             "$BATCHNORM_DATA, else ~/.cache/batchnorm, then where a system "
                             "package installs the data set, e.g. Debian's Fashion-MNIST)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download; fail if the files are not on disk")


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero on the CPU inside the block, then restore the default.

    Saturated sigmoids produce denormals, which x86 CPUs process ~50x slower (an Inception step
    took seconds instead of 0.1 s); flushing them changes nothing else. The setting is global
    to the process, so it must not outlive the training loop (torch has no getter: the default,
    off, is restored)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
