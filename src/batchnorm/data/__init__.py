"""Data sets for the reproductions: find, download (several mirrors), verify (md5) and load.

- :mod:`batchnorm.data.download`: the shared machinery (:class:`RemoteFile`, :func:`fetch`,
  :func:`data_root`, :class:`MissingDataError`), reusable by any data set's loader.
- :mod:`batchnorm.data.idx`: the IDX format.
- :mod:`batchnorm.data.mnist`: :func:`load_mnist`, :func:`load_fashion_mnist`.

Data root: ``data_dir`` argument (``--data-dir``), else ``$BATCHNORM_DATA``, else
``~/.cache/batchnorm``.
"""

from batchnorm.data.download import (
    MissingDataError,
    RemoteFile,
    data_root,
    fetch,
    verify,
)
from batchnorm.data.idx import IdxFormatError, parse_idx, read_idx
from batchnorm.data.mnist import load_fashion_mnist, load_idx_dataset, load_mnist

__all__ = [
    "IdxFormatError",
    "MissingDataError",
    "RemoteFile",
    "data_root",
    "fetch",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "parse_idx",
    "read_idx",
    "verify",
]
