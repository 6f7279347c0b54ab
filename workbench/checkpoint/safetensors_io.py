"""Reading and writing the safetensors file format without loading whole files.

The header is parsed and checked here (offsets inside the file, sizes matching shapes) before any
allocation, so a truncated or lying file fails with a message naming the file and tensor instead of
an allocation or a crash. Each tensor (or row block) is mapped on its own, privately: its pages come
from the page cache without the copy a ``read`` makes, and are unmapped when the tensor is freed, so
resident memory stays bounded by the tensors in flight (one mapping per file, as safetensors'
``safe_open`` keeps, would hold every touched page for the whole merge).

Writing streams: the header of each output file is computed from the planned tensor specs, written
first, and tensor bytes follow in order as they are produced, so no shard is ever buffered whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import FileWriter, TensorInfo, TensorSpec
from workbench.checkpoint.dtypes import ITEMSIZE, to_torch
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: A header larger than this is refused (real headers are kilobytes; this bounds allocation).
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


class SafetensorsFile:
    """One ``.safetensors`` file with its header parsed and validated."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot open {self.path}: {exc.strerror}.") from exc
        try:
            self.tensors, self.metadata, self._data_start = _parse_header(self.path, self._fd)
        except BaseException:
            # Mark it closed: __del__ would otherwise close this fd number again later, when it may
            # belong to another open file.
            self.close()
            raise

    def read(self, info: TensorInfo, begin: int, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        """Read a tensor, or rows ``[start, stop)`` of it, from byte ``begin`` of the data section."""
        import torch

        shape = list(info.shape)
        offset = self._data_start + begin
        nbytes = info.nbytes
        if rows is not None:
            start, stop = rows
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            offset += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape[0] = stop - start
        if not nbytes:
            return torch.empty(shape, dtype=to_torch(info.dtype))
        if os.fstat(self._fd).st_size < offset + nbytes:
            raise CheckpointError(
                f"{self.path}: tensor '{info.name}' is cut short (its bytes end past the end of the file);"
                " the file is truncated or was modified while the merge ran."
            )
        return _mapped(self._fd, offset, nbytes).view(to_torch(info.dtype)).reshape(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass


def _mapped(fd: int, offset: int, nbytes: int) -> "torch.Tensor":
    """Bytes ``offset .. offset + nbytes`` of a file as a uint8 tensor over a private mapping of just
    that range: pages come from the page cache without a copy, writes stay private (copy on write),
    and the range is unmapped when the tensor is freed."""
    import mmap

    import torch

    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    mapping = mmap.mmap(fd, offset + nbytes - aligned, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - aligned)


def _parse_header(path: Path, fd: int) -> tuple[dict[str, tuple[TensorInfo, int]], dict[str, str], int]:
    size = os.fstat(fd).st_size
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes long: too short to be a safetensors file (truncated?).")
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header: it claims {header_len} header bytes but the file holds"
            f" {size - 8} after the length field (truncated or not a safetensors file)."
        )
    raw = os.pread(fd, header_len, 8)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has a corrupt safetensors header: not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: expected a JSON object.")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: '__metadata__' in the header must be an object of strings.")
    tensors: dict[str, tuple[TensorInfo, int]] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data_start


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[TensorInfo, int]:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} has a malformed header entry (expected an object).")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has a malformed shape {shape!r}.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where} has malformed data_offsets {offsets!r}.")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if not 0 <= begin <= end or end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} in {dtype} needs {expected}."
        )
    if end > data_size:
        raise CheckpointError(
            f"{where} ends at byte {end} of the data section, but the file holds only {data_size} data bytes"
            " (the file is truncated)."
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=path), begin


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed header of a file holding ``specs`` in order, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


class StreamingFileWriter(FileWriter):
    """Writes one safetensors file whose tensors arrive in planned order, in one or more row blocks."""

    def __init__(self, path: Path, specs: tuple[TensorSpec, ...], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.specs = specs
        self._file = open(path, "wb")
        header = build_header(specs, metadata)
        self._file.write(header)
        self._digest = hashlib.sha256(header)  # bytes are written in order, so hashed as they go
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far

    def write(self, name: str, data: "torch.Tensor") -> None:
        if self._index >= len(self.specs):
            raise RuntimeError(f"{self.path}: unexpected tensor '{name}' after the planned ones")
        spec = self.specs[self._index]
        if spec.name != name:
            raise RuntimeError(f"{self.path}: expected tensor '{spec.name}' next, got '{name}'")
        import torch

        flat = memoryview(data.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._file.write(flat)
        self._digest.update(flat)
        self._written += flat.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(f"{self.path}: tensor '{name}' got more bytes than its shape {spec.shape} holds")
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    @property
    def complete(self) -> bool:
        return self._index >= len(self.specs)

    @property
    def sha256(self) -> str | None:
        return self._digest.hexdigest() if self.complete else None

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
