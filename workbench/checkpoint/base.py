"""Contracts of checkpoint formats: lazy readers and streaming writers."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from workbench.checkpoint.dtypes import FLOAT_CODES, ITEMSIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor; known without reading its data."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


class CheckpointReader(ABC):
    """A model opened lazily: headers are parsed up front, tensor data is read on request."""

    path: Path

    @abstractmethod
    def tensor_names(self) -> list[str]:
        """Names in storage order."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Header facts of one tensor; raises ``CheckpointError`` naming the tensor if absent."""

    @abstractmethod
    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        """Read one tensor (or rows ``[start, stop)`` of its first dimension) into memory."""

    def config(self) -> dict[str, Any] | None:
        """The model's ``config.json``, if it has one."""
        return None

    @abstractmethod
    def files(self) -> list[Path]:
        """The files holding tensor data."""

    def embedded_tokenizer(self, dest: Path) -> list[str]:
        """Write tokenizer files that the checkpoint carries inside itself (a GGUF's metadata) into
        ``dest``; returns the names written. Most formats keep them beside the weights, where they
        are copied from instead: none here."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook: readers without handles keep the no-op
        """Release file handles."""

    def __contains__(self, name: str) -> bool:
        return name in set(self.tensor_names())

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as planned before it is computed."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class OutputFile:
    """One file of the output and the tensors it holds, in order: a unit of work an executor can run."""

    name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class FileWriter(ABC):
    """Receives the tensors of one output file in planned order, possibly as consecutive row blocks."""

    @abstractmethod
    def write(self, name: str, data: "torch.Tensor") -> None:
        """Append ``data`` (the whole tensor or its next row block) to tensor ``name``."""

    @property
    @abstractmethod
    def complete(self) -> bool:
        """Whether every planned byte has been written."""

    @abstractmethod
    def close(self) -> None:
        """Close the file (also after a failure)."""

    @property
    def sha256(self) -> str | None:
        """The hex sha256 of the finished file, if the writer hashed the bytes as it wrote them
        (sequential writers can; otherwise the engine reads the file back to hash it)."""
        return None


class CheckpointFormat(ABC):
    """A format plugin: detects and opens checkpoints, and optionally writes them.

    Writing is split so that output files are independent jobs: ``plan_output`` assigns tensors to
    files, ``open_file`` streams one file, ``finish_output`` writes whatever ties the files together
    (an index) once all exist.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds a checkpoint in this format (cheap: file names and headers only)."""

    @abstractmethod
    def open(self, path: Path) -> CheckpointReader:
        """Open ``path`` lazily; raise ``CheckpointError`` naming the file on bad input."""

    can_write: ClassVar[bool] = False

    def plan_output(self, tensors: list[TensorSpec], shard_size: int) -> list[OutputFile]:
        raise NotImplementedError(f"format '{self.name}' cannot write checkpoints")

    def open_file(self, path: Path, tensors: tuple[TensorSpec, ...]) -> FileWriter:
        raise NotImplementedError(f"format '{self.name}' cannot write checkpoints")

    def finish_output(self, directory: Path, files: list[OutputFile]) -> list[Path]:
        """Write index files after every output file exists; returns the extra files written."""
        return []
