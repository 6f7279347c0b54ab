"""The walk over a GGUF header that must pass before the ``gguf`` package parses it.

Why the header is walked before ``GGUFReader`` sees it: GGUFReader trusts the counts in the file. It
loops ``n_kv``, ``n_tensors`` and array-length times (an array said to hold 2**63 one-byte items makes
it read past the end of the file for ever, growing lists as it goes) and raises whatever numpy raises
on a short file. :func:`check_header` walks the same structure
with ``struct``, checks every count and length against the bytes left and every tensor's extent
against the file size, and refuses nested arrays and unknown types. GGUFReader then only parses a
header whose loops are bounded by the file's size and whose tensors lie inside it.
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import CheckpointError, shown

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
#: Items of one metadata array: 16x the largest vocabulary in use. GGUFReader keeps numpy views per
#: item, so this also bounds what a (truthful but absurd) header costs to parse.
MAX_ARRAY = 1 << 22
DEFAULT_ALIGNMENT = 32
_UINT32, _STRING, _ARRAY = 4, 8, 9
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, dimension count, one dimension, type, offset


class _Cursor:
    """Little-endian fields of a buffer, refusing any that would run past its end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left():
            raise CheckpointError(
                f"{self.path}: GGUF header cut short or lying: {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {self.left()} left."
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return int(struct.unpack_from("<I", self.buf, self.skip(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack_from("<Q", self.buf, self.skip(8, what))[0])

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        start = self.skip(n, what)
        return bytes(self.buf[start : start + n])


def _skip_value(cur: _Cursor, vtype: int, key: str) -> None:
    what = f"value of metadata {shown(key)}"
    if vtype in _SCALAR_SIZE:
        cur.skip(_SCALAR_SIZE[vtype], what)
    elif vtype == _STRING:
        cur.skip(cur.u64(what), what)
    elif vtype == _ARRAY:
        item, count = cur.u32(what), cur.u64(what)
        if count > MAX_ARRAY:
            raise CheckpointError(
                f"{cur.path}: metadata {shown(key)} claims an array of {count} items (at most {MAX_ARRAY} are read)."
            )
        if item == _STRING:
            if count * 8 > cur.left():
                raise CheckpointError(
                    f"{cur.path}: metadata {shown(key)} claims {count} strings; the file has {cur.left()} bytes left."
                )
            for _ in range(count):
                cur.skip(cur.u64(what), what)
        elif item in _SCALAR_SIZE:
            cur.skip(count * _SCALAR_SIZE[item], what)
        else:
            raise CheckpointError(
                f"{cur.path}: metadata {shown(key)} is an array of value type {item}, which GGUF readers refuse "
                "(nested or unknown)."
            )
    else:
        raise CheckpointError(f"{cur.path}: metadata {shown(key)} has unknown value type {vtype}.")


@dataclass(frozen=True)
class _TensorHeader:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (the row) first
    qtype: int
    offset: int


def check_header(path: Path) -> None:
    """Refuse ``path`` unless its header is self-consistent and every tensor lies inside the file.

    Checked: magic, version (2 or 3, little-endian), the key and tensor counts against the bytes left,
    every string and array length (arrays: at most ``MAX_ARRAY`` items, none nested), value and tensor
    types, 1 to 4 non-zero dimensions, rows whole quantisation blocks, the alignment, and each
    tensor's byte range (aligned, inside the file, not overlapping another).
    """
    with path.open("rb") as fh:
        size = path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{path} is not a GGUF file: {size} bytes is shorter than a GGUF header.")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Cursor(buf, path))


def _walk(cur: _Cursor) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = cur.path
    if cur.buf[:4] != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    cur.skip(4, "magic")
    version = cur.u32("version")
    if version not in VERSIONS:
        hint = " (a big-endian file? only little-endian GGUF is read)" if version & 0xFFFF == 0 else ""
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are){hint}.")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    if n_kv * _MIN_KV + n_tensors * _MIN_TENSOR_INFO > cur.left():
        raise CheckpointError(
            f"{path}: the GGUF header claims {n_tensors} tensors and {n_kv} metadata entries; the file "
            f"({cur.size} bytes) is too short to describe them."
        )
    alignment, keys = DEFAULT_ALIGNMENT, set()
    for i in range(n_kv):
        raw = cur.string(f"key of metadata entry {i}")
        key = raw.decode("utf-8", "replace")
        if raw in keys:
            raise CheckpointError(f"{path}: metadata {shown(key)} appears twice.")
        keys.add(raw)
        vtype = cur.u32(f"type of metadata {shown(key)}")
        if raw == b"general.alignment":
            alignment = cur.u32("value of general.alignment") if vtype == _UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise CheckpointError(f"{path}: general.alignment must be a uint32 power of two.")
        else:
            _skip_value(cur, vtype, key)
    tensors, names = [], set()
    for i in range(n_tensors):
        raw = cur.string(f"name of tensor {i}")
        name = raw.decode("utf-8", "replace")
        if raw in names:
            raise CheckpointError(f"{path}: tensor {shown(name)} is stored twice.")
        names.add(raw)
        n_dims = cur.u32(f"dimension count of tensor {shown(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(
                f"{path}: tensor {shown(name)} claims {n_dims} dimensions (1 to {MAX_DIMS} are valid)."
            )
        dims = tuple(cur.u64(f"shape of tensor {shown(name)}") for _ in range(n_dims))
        tensors.append(
            _TensorHeader(
                name,
                dims,
                cur.u32(f"type of tensor {shown(name)}"),
                cur.u64(f"offset of tensor {shown(name)}"),
            )
        )
    data_start = -(-cur.pos // alignment) * alignment
    known = {int(t): (GGMLQuantizationType(t).name, *GGML_QUANT_SIZES[t]) for t in GGML_QUANT_SIZES}
    extents = []
    for t in tensors:
        if t.qtype not in known:
            raise CheckpointError(f"{path}: tensor {shown(t.name)} has unknown GGML type {t.qtype}.")
        type_name, block, type_size = known[t.qtype]
        if 0 in t.dims or t.dims[0] % block:
            raise CheckpointError(
                f"{path}: tensor {shown(t.name)} has shape {list(t.dims)}, not whole {type_name} blocks of "
                f"{block} (or a zero dimension)."
            )
        nbytes = math.prod(t.dims) // block * type_size
        start = data_start + t.offset
        if t.offset % alignment == 0 and start + nbytes > cur.size:
            raise CheckpointError(
                f"{path}: tensor {shown(t.name)} ({type_name}, shape {list(t.dims)}, {math.prod(t.dims)} "
                f"elements) claims bytes "
                f"[{start}, {start + nbytes}), past the end of the file ({cur.size} bytes): the file is "
                "truncated, or its header lies."
            )
        if t.offset % alignment:
            raise CheckpointError(
                f"{path}: tensor {shown(t.name)} ({type_name}, shape {list(t.dims)}, {math.prod(t.dims)} "
                f"elements) claims bytes [{start}, {start + nbytes}), which are not {alignment}-aligned "
                f"inside the file ({cur.size} bytes)."
            )
        extents.append((start, start + nbytes, t.name))
    extents.sort()
    for (_, end, before), (start, _, after) in itertools.pairwise(extents):
        if start < end:
            raise CheckpointError(f"{path}: the data of tensors {shown(before)} and {shown(after)} overlap.")
