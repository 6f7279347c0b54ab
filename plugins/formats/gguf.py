"""GGUF inputs (llama.cpp's format; read-only): a ``.gguf`` file, or a folder holding exactly one.
Llama-family models are mapped to Hugging Face names and dequantised as they are read (see
:mod:`workbench.checkpoint.gguf`). A folder that also has safetensors or ``.bin`` weights is left to
those formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.checkpoint import CheckpointFormat, CheckpointReader
from workbench.checkpoint.folder import find_safetensors
from workbench.checkpoint.gguf import GGUFCheckpoint, find_gguf
from workbench.checkpoint.torch_bin import find_bin
from workbench.hookspecs import hookimpl


class GGUFFormat(CheckpointFormat):
    name = "gguf"
    description = "llama.cpp .gguf file, or a folder with one (Llama family; dequantised as read; read only)"
    can_write = False

    def detect(self, path: Path) -> bool:
        if not find_gguf(path):
            return False
        if path.is_dir():
            index, files = find_safetensors(path)
            return index is None and not files and not find_bin(path)
        return True

    def open(self, path: Path) -> CheckpointReader:
        return GGUFCheckpoint(path)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(GGUFFormat())
