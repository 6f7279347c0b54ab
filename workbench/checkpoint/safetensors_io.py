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
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import FileWriter, TensorInfo, TensorSpec
from workbench.checkpoint.dtypes import ITEMSIZE, to_torch
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

#: A header larger than this is refused (real headers are kilobytes; this bounds allocation).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: No tensor dimension product (zero dimensions counted as one) may reach this: torch computes
#: strides in int64, so even an empty tensor with larger dimensions cannot be created.
_MAX_ELEMENTS = 2**63
ALIGNMENT = 8


class SafetensorsFile:
    """One ``.safetensors`` file with its header parsed and validated."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            # Non-blocking: opening a pipe named *.safetensors must not wait for a writer (it is refused next).
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
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
    mapping = mmap.mmap(
        fd,
        offset + nbytes - aligned,
        flags=mmap.MAP_PRIVATE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=aligned,
    )
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset - aligned)


def _parse_header(path: Path, fd: int) -> tuple[dict[str, tuple[TensorInfo, int]], dict[str, str], int]:
    info = os.fstat(fd)
    # A folder or pipe named *.safetensors (the folder reader globs for them) is not a checkpoint.
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(
            f"{path} is not a regular file (a folder, pipe or device named like a safetensors file)."
        )

    def read_at(offset: int, n: int) -> bytes:
        try:
            return os.pread(fd, n, offset)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}.") from exc

    return parse_header(path, info.st_size, read_at)


def loads_json(raw: bytes) -> Any:
    """Strict JSON for headers and indexes: UTF-8 only, no key given twice (readers disagree on
    which one wins), no lone surrogate escapes (they cannot be printed). Every refusal, including
    nesting too deep for the parser, is a ``ValueError``."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {json.dumps(key)} is given twice in one object")
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"the string {json.dumps(text)} is not valid Unicode (a lone surrogate escape)"
                ) from None
        out[key] = value
    return out


def parse_header(
    path: Path, size: int, read_at: Callable[[int, int], bytes]
) -> tuple[dict[str, tuple[TensorInfo, int]], dict[str, str], int]:
    """Parse and check the header of a safetensors file of ``size`` bytes whose bytes ``read_at(offset,
    n)`` returns: a local file, or one on the Hub read by byte ranges (``workbench validate``)."""
    if size < 8:
        raise CheckpointError(
            f"{path} is {size} bytes long: too short to be a safetensors file (truncated?)."
        )
    (header_len,) = struct.unpack("<Q", read_at(0, 8))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header: it claims {header_len} header bytes but the file holds"
            f" {size - 8} after the length field (truncated or not a safetensors file)."
        )
    raw = read_at(8, header_len)
    try:
        header = loads_json(raw)
    except ValueError as exc:  # also UnicodeDecodeError, JSONDecodeError and too many digits
        raise CheckpointError(f"{path} has a corrupt safetensors header: not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: expected a JSON object.")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: '__metadata__' in the header must be an object of strings.")
    tensors: dict[str, tuple[TensorInfo, int]] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_size)
    # Two tensors sharing bytes would let a small file stand for many large tensors.
    spans = sorted((begin, info.nbytes, name) for name, (info, begin) in tensors.items() if info.nbytes)
    for (begin, nbytes, name), (next_begin, _, next_name) in zip(spans, spans[1:]):
        if next_begin < begin + nbytes:
            raise CheckpointError(
                f"{path}: tensors '{name}' and '{next_name}' overlap in the data section (bytes {next_begin} to"
                f" {begin + nbytes}); each tensor must have bytes of its own."
            )
    return tensors, metadata, data_start


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[TensorInfo, int]:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} has a malformed header entry (expected an object).")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where} has a malformed shape {shape!r}.")
    product = 1
    for d in shape:  # stops early: a product of many huge dimensions is itself costly to compute
        product *= max(d, 1)
        if product >= _MAX_ELEMENTS:
            raise CheckpointError(f"{where} has a shape {shape} too large for any tensor.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where} has malformed data_offsets {offsets!r}.")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if begin < 0 or end < 0:
        raise CheckpointError(f"{where} has negative data_offsets {offsets}: no byte lies before the data.")
    if begin > end:
        raise CheckpointError(f"{where} has data_offsets {offsets} that end before they begin.")
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} in {dtype} needs {expected}."
        )
    if end > data_size:
        raise CheckpointError(
            f"{where} ends at byte {end} of the data section, but the file holds only {data_size} data bytes"
            " (the file is truncated)."
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=path), begin


def build_header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed header of a file holding ``specs`` in order, padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


class StreamingFileWriter(FileWriter):
    """Writes one safetensors file whose tensors arrive in planned order, in one or more row blocks."""

    def __init__(
        self, path: Path, specs: tuple[TensorSpec, ...], metadata: dict[str, str] | None = None
    ) -> None:
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

        flat = (
            data.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
        )  # a memoryview of the bytes
        self._file.write(flat)
        self._digest.update(flat)
        self._written += flat.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(
                f"{self.path}: tensor '{name}' got more bytes than its shape {spec.shape} holds"
            )
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
