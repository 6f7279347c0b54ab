"""PyTorch ``.bin`` model folders as inputs (read-only; loaded weights-only, see
:mod:`workbench.checkpoint.torch_bin`). A folder that also has safetensors files is left to the
safetensors format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.checkpoint import CheckpointFormat, CheckpointReader
from workbench.checkpoint.folder import find_safetensors
from workbench.checkpoint.torch_bin import TorchBinFolder, find_bin
from workbench.hookspecs import hookimpl


class TorchBinFormat(CheckpointFormat):
    name = "torch_bin"
    description = (
        "PyTorch pytorch_model.bin, or shards + pytorch_model.bin.index.json (read only, weights only)"
    )
    can_write = False

    def detect(self, path: Path) -> bool:
        index, files = find_safetensors(path) if path.is_dir() else (None, [])
        return index is None and not files and bool(find_bin(path))

    def open(self, path: Path) -> CheckpointReader:
        return TorchBinFolder(path)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(TorchBinFormat())
