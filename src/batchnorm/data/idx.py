"""The IDX file format (MNIST, Fashion-MNIST), plain or gzip-compressed.

Layout (all integers big-endian):

    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte  3     number of dimensions d (>= 1)
    then        d uint32 sizes s_1 .. s_d
    then        s_1 * ... * s_d elements, row-major, big-endian

For MNIST, images are ``uint8`` of shape ``(N, 28, 28)`` and labels ``uint8`` of shape ``(N,)``.
Anything else (wrong magic, unknown type, too few or too many payload bytes) raises
:class:`IdxFormatError` naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """The bytes are not a well-formed IDX file."""


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX ``data`` into a NumPy array in native byte order (a fresh, writable copy).

    ``source`` names the file in error messages.
    """
    if len(data) < 4:
        raise IdxFormatError(f"{source}: {len(data)} bytes, too short for the 4-byte IDX header")
    if data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{source}: IDX files start with two zero bytes, got "
                             f"{data[:2].hex()} (not an IDX file, or still compressed?)")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _TYPES)
        raise IdxFormatError(f"{source}: unknown IDX element type 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares 0 dimensions, expected >= 1")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{source}: truncated header: {ndim} dimensions need {header} "
                             f"bytes, the file has {len(data)}")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing bytes"
        raise IdxFormatError(f"{source}: {problem}: shape {shape} of {dtype.name} needs "
                             f"{expected} payload bytes, the file has {actual}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told apart by content, not by name)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as error:
            raise IdxFormatError(f"{path}: broken or truncated gzip stream ({error})") from error
    return parse_idx(data, source=str(path))
