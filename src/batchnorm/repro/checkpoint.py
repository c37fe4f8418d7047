"""Checkpoint files: written so that no crash leaves a bad one, read without running code.

Writing (:func:`save`): the payload goes to ``NAME.tmp``, is flushed to the disk (``fsync``),
the current checkpoint becomes ``NAME.prev`` and the new file takes its name (``os.replace``,
atomic). A run killed at any moment leaves ``NAME`` or, for the instant between the two renames,
``NAME.prev`` holding a complete checkpoint (and perhaps a partial ``NAME.tmp``, which the next
save overwrites); a failed write (a full disk) removes the partial ``NAME.tmp``, leaves both
untouched and raises :class:`CheckpointError`. What loading would refuse is not saved either
(:func:`check_plain`: a ``TypeError``).

Reading (:func:`load`) refuses, with a :class:`CheckpointError` naming the file:

- a file that is cut short or altered: every record's CRC-32 in the file's zip container is
  checked first (``torch.load`` itself does not, and loads a flipped byte in a tensor
  silently);
- anything but tensors, numbers, strings and the containers of them: the file is unpickled
  with ``weights_only=True``, so a pickled object cannot run code, and is named in the error;
- a file that is not a checkpoint of this trainer (:data:`KEYS` missing).

:func:`load_for_resume` tries ``NAME`` and falls back to ``NAME.prev`` when ``NAME`` is missing
or unreadable (never when it is unsafe). Resuming from an older checkpoint of the same run only
repeats steps: the result is still bitwise that of an uninterrupted run.

Format :data:`FORMAT` (2): a ``torch.save`` zip of a dict of :data:`KEYS` and ``"format"``,
nothing but tensors and plain Python values. Format 1 (no ``"format"`` key, written before these
checks) has the same contents and loads the same way.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from batchnorm.repro.common import ArgumentError

FORMAT = 2
KEYS = ("model", "optimizer", "state", "fingerprint", "rng")


class CheckpointError(ArgumentError):
    """A checkpoint that cannot be read, or written: the message names the file and what to
    do. The command line prints it as one line and exits with status 2."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding a pickled object (which could run code when loaded)."""


def previous(path: Path) -> Path:
    """Where :func:`save` keeps the checkpoint before the current one."""
    return path.with_name(path.name + ".prev")


def save(payload: dict, path: Path, *, keep_previous: bool = True) -> None:
    """Write ``payload`` to ``path`` atomically (see the module); the file it replaces becomes
    :func:`previous` (unless ``keep_previous`` is false: then that one is left as it is).
    ``TypeError`` if ``payload`` holds anything :func:`load` would refuse."""
    check_plain(payload)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(dict(payload, format=FORMAT), handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = error.strerror or str(error)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason}; the checkpoints written before are "
            "intact: make room (or choose another --ckpt-dir) and rerun with --resume"
        ) from None
    except BaseException:  # interrupted mid-write: the partial file is of no use
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


_PLAIN = (str, int, float, bool, type(None))


def check_plain(value, where: str = "checkpoint") -> None:
    """``TypeError`` naming the first value in ``value`` that is not a tensor, a number, a
    string, None, or a list, tuple or dict of them (what :func:`load` accepts; a NumPy scalar
    or a dataclass is not: convert it first)."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            check_plain(key, f"{where} (a key)")
            check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    else:
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a "
                        "checkpoint holds only tensors, numbers, strings and lists, tuples and "
                        "dicts of them (loading refuses anything else)")


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    """The checkpoint at ``path``, checked (see the module); :class:`CheckpointError` (or
    :class:`UnsafeCheckpointError`) if it cannot be trusted."""
    path = Path(path)
    damaged = (f"checkpoint {path} is damaged (cut short or altered, e.g. by a full disk or an "
               "incomplete copy)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as error:  # noqa: BLE001 - zipfile raises many kinds on a bad header
        raise CheckpointError(f"{damaged}: {_first_line(error) or 'not a zip archive'}"
                              ) from None
    if bad is not None:
        raise CheckpointError(f"{damaged}: record {bad} fails its CRC check") from None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            found = re.search(r"unsupported GLOBAL:? ?(?:GLOBAL )?([\w.]+)", str(error),
                              re.IGNORECASE)
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"checkpoint {path} holds a pickled Python object{what}, which could run code "
                "when loaded; refusing it (checkpoints hold only tensors, numbers and "
                "strings): delete it, and do not resume from files you did not write"
            ) from None
        raise CheckpointError(f"{damaged}: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - whatever torch raises on a bad file
        raise CheckpointError(f"{damaged}: {_first_line(error)}") from None
    if not isinstance(payload, dict) or not all(key in payload for key in KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of batchnorm's trainer (no "
                              f"{', '.join(KEYS)}): delete it or choose another --ckpt-dir")
    version = payload.get("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version!r}, not one this "
                              f"version of batchnorm reads (1..{FORMAT}): resume it with the "
                              "version that wrote it")
    return payload


def load_for_resume(path: Path, device: torch.device | str = "cpu", log=print
                    ) -> tuple[dict, Path, bool] | None:
    """The newest good checkpoint of ``path``: ``(payload, file, fell_back)``, or None if there
    is none on disk. ``path`` itself when it is good; else :func:`previous` (``fell_back``,
    after a ``log`` line saying why). Raises :class:`UnsafeCheckpointError` for a file that
    holds a pickled object, and :class:`CheckpointError` when ``path`` is damaged and there is
    no good previous checkpoint."""
    path = Path(path)
    older = previous(path)
    if not path.exists():
        if not older.exists():
            return None
        return load(older, device), older, True  # killed between the two renames of save()
    try:
        return load(path, device), path, False
    except UnsafeCheckpointError:
        raise
    except CheckpointError as error:
        if not older.exists():
            raise CheckpointError(f"--resume: {error}; there is no earlier checkpoint "
                                  f"({older.name}) to fall back to: delete it to start this "
                                  "run over") from None
        try:
            payload = load(older, device)
        except CheckpointError as second:
            raise CheckpointError(f"--resume: {error}; the earlier one is no better: "
                                  f"{second}; delete both to start this run over") from None
        log(f"--resume: {error}; falling back to the previous checkpoint {older}")
        return payload, older, True


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
