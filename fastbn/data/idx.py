"""The IDX file format of MNIST and Fashion-MNIST, read and written with checks.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian
uint32 dimension sizes, then the values in C order, big-endian. MNIST images are type 0x08
(unsigned byte) with 3 dimensions (magic 2051), labels 0x08 with 1 dimension (magic 2049).
Files may be gzip-compressed; compression is recognised by its own magic bytes, not the name.
"""
import gzip
import os
import zlib
from math import prod

import numpy as np

#: IDX type code -> big-endian NumPy dtype
IDX_TYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_TYPE_CODES = {dtype.newbyteorder(">") if dtype.itemsize > 1 else dtype: code
               for code, dtype in IDX_TYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """A file is not a valid IDX file (wrong magic, truncated, corrupt, wrong shape)."""


def _read_bytes(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({err})") from None


def parse_idx(data, name="<bytes>"):
    """Parse the bytes of an (uncompressed) IDX file into a NumPy array in native byte order."""
    if len(data) < 4:
        raise IdxError(f"{name}: truncated: expected at least a 4-byte IDX header, got "
                       f"{len(data)} bytes")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise IdxError(f"{name}: not an IDX file: expected magic bytes 00 00 <type in "
                       f"{sorted(hex(c) for c in IDX_TYPES)}> <ndim >= 1>, got "
                       f"{data[:4].hex(' ')}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxError(f"{name}: truncated: expected a {header_size}-byte header for {ndim} "
                       f"dimensions, got {len(data)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = header_size + prod(shape) * dtype.itemsize
    if len(data) < expected:
        raise IdxError(f"{name}: truncated: shape {shape} of {dtype.name} needs {expected} "
                       f"bytes, got {len(data)}")
    if len(data) > expected:
        raise IdxError(f"{name}: corrupt: shape {shape} of {dtype.name} needs {expected} "
                       f"bytes, got {len(data)} ({len(data) - expected} unexpected trailing)")
    values = np.frombuffer(data, dtype=dtype, count=prod(shape), offset=header_size)
    return values.reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file, raw or gzip-compressed, into a NumPy array.

    Raises
    ------
    IdxError
        When the magic number is wrong, the file is shorter or longer than its header says,
        or the gzip stream is corrupt.
    FileNotFoundError
        When ``path`` does not exist.
    """
    path = os.fspath(path)
    return parse_idx(_read_bytes(path), name=path)


def idx_bytes(array):
    """The bytes of ``array`` as an IDX file (the inverse of :func:`parse_idx`)."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    code = _TYPE_CODES.get(dtype)
    if code is None:
        raise TypeError(f"array: expected one of the IDX dtypes "
                        f"{[d.name for d in IDX_TYPES.values()]}, got {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array: expected 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path, array, *, compress=None):
    """Write ``array`` as an IDX file; gzip-compressed when ``compress`` is true (default: when
    the name ends in ``.gz``)."""
    path = os.fspath(path)
    data = idx_bytes(array)
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path
