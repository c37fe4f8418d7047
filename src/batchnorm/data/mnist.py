"""MNIST and Fashion-MNIST: 28x28 grey-scale images in 10 classes, 60,000 training and 10,000
test examples, as IDX files (see :mod:`batchnorm.data.idx`).

Files expected in the data folder (the published names; Debian's ``dataset-fashion-mnist``
package uses the same names in ``/usr/share/datasets/fashion-mnist``)::

    train-images-idx3-ubyte.gz   train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz    t10k-labels-idx1-ubyte.gz

each either as published, recompressed (accepted by the md5 of its decompressed content) or
decompressed (same name without ``.gz``). MNIST goes in ``<root>/mnist``, Fashion-MNIST in
``<root>/fashion-mnist``, where the root is ``data_dir``, ``$BATCHNORM_DATA`` or
``~/.cache/batchnorm``; ``data_dir`` may also be the folder holding the files itself. With the
default root, Fashion-MNIST is also found where Debian's package puts it. Since
both data sets use the same file names, the checksums are what tells them apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from batchnorm.data.download import RemoteFile, fetch, mirror_urls
from batchnorm.data.idx import IdxFormatError, read_idx

SPLITS = {"train": "train", "test": "t10k"}
_SIZES = {"train": "60,000", "test": "10,000"}


@dataclass(frozen=True)
class IdxDataset:
    """An image-classification data set published as four IDX files."""

    name: str
    subdir: str
    mirrors: tuple[str, ...]
    # published file name -> (md5 of the published .gz, md5 of the decompressed content or None)
    checksums: dict
    # read-only folders where an OS package installs the files, searched with the default root
    system_dirs: tuple[str, ...] = ()

    def files(self, split: str) -> tuple[RemoteFile, RemoteFile]:
        """The (images, labels) files of ``split`` ("train" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {list(SPLITS)}, got {split!r}")
        prefix = SPLITS[split]
        return (self._file(f"{prefix}-images-idx3-ubyte.gz", f"{_SIZES[split]} {split} images"),
                self._file(f"{prefix}-labels-idx1-ubyte.gz", f"{_SIZES[split]} {split} labels"))

    def _file(self, name: str, description: str) -> RemoteFile:
        gz, content = self.checksums[name]
        return RemoteFile(name, mirror_urls(self.mirrors, name), md5=(gz,),
                          content_md5=(content,) if content else (), description=description)


# Published .gz md5s are the data sets' own; content md5s were computed from the decompressed
# files (MNIST: the published .gz files; Fashion-MNIST: Debian's recompressed copies, whose
# decompressed content is the data set). MNIST's training images' content md5 is not known to
# us, so that file is accepted as published (.gz) only.
MNIST = IdxDataset(
    name="MNIST",
    subdir="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    checksums={
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                       "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                      "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                      "27ae3e4e09519cfbb04c329615203637"),
    },
)

FASHION_MNIST = IdxDataset(
    name="Fashion-MNIST",
    subdir="fashion-mnist",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ),
    checksums={
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                       "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                      "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                      "15d484375f8d13e6eb1aabb0c3f46965"),
    },
    system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian: dataset-fashion-mnist
)

DATASETS = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}


def load_idx_dataset(
    dataset: IdxDataset | str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of one split: ``uint8`` images ``(N, 28, 28)`` with values 0-255 and
    ``int64`` labels ``(N,)`` in 0-9. Files are found, downloaded and verified by
    :func:`batchnorm.data.download.fetch`."""
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
        dataset = DATASETS[dataset]
    image_file, label_file = dataset.files(split)
    paths = fetch((image_file, label_file), dataset.subdir, data_dir, dataset=dataset.name,
                  system_dirs=dataset.system_dirs, download=download, progress=progress)
    images = read_idx(paths[image_file.name])
    labels = read_idx(paths[label_file.name])
    where = f"{dataset.name} {split}"
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype.name != "uint8":
        raise IdxFormatError(f"{where}: images should be uint8 of shape (N, 28, 28), got "
                             f"{images.dtype.name} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxFormatError(f"{where}: expected {len(images)} labels (one per image), got "
                             f"shape {labels.shape}")
    if labels.size and int(labels.max()) > 9:
        raise IdxFormatError(f"{where}: labels should be 0-9, found {int(labels.max())}")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, *,
               download: bool = True, progress: bool = True):
    """MNIST digits: ``(images uint8 (N, 28, 28), labels int64 (N,))``; see
    :func:`load_idx_dataset`."""
    return load_idx_dataset(MNIST, split, data_dir, download=download, progress=progress)


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None, *,
                       download: bool = True, progress: bool = True):
    """Fashion-MNIST (Zalando's clothing images, MNIST's format and sizes): ``(images uint8
    (N, 28, 28), labels int64 (N,))``; see :func:`load_idx_dataset`."""
    return load_idx_dataset(FASHION_MNIST, split, data_dir, download=download,
                            progress=progress)
