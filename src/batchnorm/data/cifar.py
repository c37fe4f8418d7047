"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 colour images, 10 classes.

Read from the published binary archive ``cifar-10-binary.tar.gz`` (md5-verified, downloaded
on demand through :func:`batchnorm.data.download.fetch`; same data root rules as the MNIST
loaders: ``data_dir``, ``$BATCHNORM_DATA``, ``~/.cache/batchnorm``, subfolder ``cifar10``).
The binary version is used rather than the Python one so that nothing downloaded is
unpickled. Members are read straight from the archive; nothing is extracted.

Record format (``data_batch_1..5.bin``, ``test_batch.bin``, 10,000 records each): one label
byte, then 3072 pixel bytes: the red, green and blue 32x32 planes, each row-major.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from batchnorm.data.download import RemoteFile, fetch

ARCHIVE = RemoteFile(
    name="cifar-10-binary.tar.gz",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
    md5=("c32a1d4ab5d03f1284b67883e8d87530",),
    description="CIFAR-10, binary version (162 MB)",
)
SPLITS = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
RECORD = 1 + 3 * 32 * 32


def load_cifar10(split: str = "train", data_dir: str | os.PathLike | None = None, *,
                 download: bool = True, progress: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a split: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Args:
        split: ``"train"`` (50,000) or ``"test"`` (10,000).
        data_dir: the data root or the folder holding the archive.
        download: fetch the archive when it is not found (verified by md5 either way).
        progress: show the download's progress bar.

    Raises:
        batchnorm.data.download.MissingDataError: the archive is missing (or corrupt) and
            could not be downloaded; the message says where to put it.
    """
    if split not in SPLITS:
        raise ValueError(f"load_cifar10: split must be one of {list(SPLITS)}, got {split!r}")
    paths = fetch([ARCHIVE], "cifar10", data_dir, dataset="CIFAR-10", download=download,
                  progress=progress)
    return read_archive(paths[ARCHIVE.name], split)


def read_archive(path: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse a split's record files from a CIFAR-10 binary archive (any folder inside it)."""
    wanted = SPLITS[split]
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            name = Path(member.name).name
            if member.isfile() and name in wanted:
                found[name] = archive.extractfile(member).read()
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"{path}: not a CIFAR-10 binary archive, {missing} not in it")
    images, labels = [], []
    for name in wanted:
        data = found[name]
        if len(data) % RECORD:
            raise ValueError(f"{path}: {name} has {len(data)} bytes, not a multiple of the "
                             f"{RECORD}-byte record")
        records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    labels_np = np.concatenate(labels)
    if labels_np.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{path}: label {labels_np.max()} out of range for {len(CLASSES)} "
                         "classes")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels_np)
