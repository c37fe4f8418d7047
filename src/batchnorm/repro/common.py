"""Small utilities shared by the experiments: seeding, devices, the process group, rank-0
output, result files, command-line arguments and their errors, deprecated names."""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

# rank, world size and "am I the main process" have one home; these names stay importable from
# here (the experiments and older code use them)
from batchnorm.process_group import is_main_process, rank, world_size

__all__ = [
    "ArgumentError", "add_data_arguments", "check_arguments", "flush_denormals",
    "init_distributed", "is_main_process", "log", "moved_names", "parse_numbers", "pick_device",
    "prepare_out_dir", "rank", "seed_everything", "setup_run", "shard", "steps_to_reach",
    "world_size", "write_csv", "write_json",
]


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


def setup_run(args: argparse.Namespace) -> torch.device:
    """What a run does first: join the process group under ``torchrun``
    (:func:`init_distributed`), set torch's CPU threads to ``--threads`` (0: its default) and
    return ``--device`` (under ``torchrun``, this process's GPU: LOCAL_RANK)."""
    init_distributed()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda" and world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def log(message: str, bar=None) -> None:
    """Print ``message`` with the time, on the main process only; above the progress ``bar``
    when one is shown."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    if bar is not None and not bar.disable:
        bar.write(line)
    elif is_main_process():
        print(line, flush=True)


def prepare_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder ``path`` (main process) and check that files can be written
    in it; :class:`ArgumentError` naming ``option`` if not (under a file, read-only, ...)."""
    out = Path(path)
    if is_main_process():
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as error:
            reason = error.strerror or str(error)
            where = f" ({error.filename})" if error.filename not in (None, str(out)) else ""
            raise ArgumentError(f"{option} {out}: cannot create or write the folder: "
                                f"{reason}{where}") from None
    return out


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as JSON (main process), atomically: a crash or Ctrl-C while writing leaves the
    previous file, never half of one."""
    if is_main_process():
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)


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


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's share of a global mini-batch (strided, so uneven sizes differ by <= 1)."""
    return batch[rank() :: world_size()]


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First evaluated step whose test accuracy is >= ``target`` (None if never)."""
    for point in history:
        if point["test_accuracy"] is not None and point["test_accuracy"] >= target:
            return point["step"]
    return None


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


# --------------------------------------------------------------------------------------------
# command-line arguments


class ArgumentError(ValueError):
    """A bad command-line argument: the message names the option and what it must be. The
    command line prints it (no traceback) and exits with status 2."""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--no-download``, as every experiment has them."""
    parser.add_argument("--data-dir", default=None,
                        help="folder with the data set's files, or the data root (default: "
                             "$BATCHNORM_DATA, else ~/.cache/batchnorm, then where a system "
                             "package installs the data set, e.g. Debian's Fashion-MNIST)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download; fail if the files are not on disk")


def parse_numbers(text: str, option: str, kind=float) -> list:
    """``"1, 5,10"`` -> ``[1.0, 5.0, 10.0]`` (``kind`` int: whole numbers); every value must be
    positive, else :class:`ArgumentError` naming ``option``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        noun = "whole numbers" if kind is int else "numbers"
        raise ArgumentError(f"{option} must be comma-separated positive {noun}, got {text!r}")
    return values


def check_arguments(args: argparse.Namespace, *, at_least: dict[str, float] | None = None,
                    positive: tuple[str, ...] = ()) -> None:
    """:class:`ArgumentError` naming the option unless ``args.<name> >= low`` for every
    ``name: low`` of ``at_least`` and ``args.<name> > 0`` for every name of ``positive`` (a
    ``None`` value means "not given" and passes)."""
    for name, low in (at_least or {}).items():
        value = getattr(args, name)
        if value is not None and not value >= low:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be positive, got {value}")


# --------------------------------------------------------------------------------------------
# deprecated names


def moved_names(module: str, moved: dict[str, str]):
    """A module ``__getattr__`` that still answers names which moved (``{old name: "package.
    module.new_name"}``), with a ``DeprecationWarning`` that says where they live now."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, new_name = moved[name].rpartition(".")
        warnings.warn(f"{module}.{name} is deprecated: use {moved[name]}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(target), new_name)

    return __getattr__
