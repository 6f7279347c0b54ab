"""Hugging Face safetensors model folders (single file or sharded with an index)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.checkpoint import CheckpointFormat, CheckpointReader, FileWriter, OutputFile, TensorSpec
from workbench.checkpoint.folder import SafetensorsFolder, find_safetensors, plan_shards, write_index
from workbench.checkpoint.safetensors_io import StreamingFileWriter
from workbench.hookspecs import hookimpl


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    description = (
        "Hugging Face folder with model.safetensors, or shards model-0000k-of-0000n.safetensors + index"
    )
    can_write = True

    def detect(self, path: Path) -> bool:
        index, files = find_safetensors(path)
        return index is not None or bool(files)

    def open(self, path: Path) -> CheckpointReader:
        return SafetensorsFolder(path)

    def plan_output(self, tensors: list[TensorSpec], shard_size: int) -> list[OutputFile]:
        return plan_shards(tensors, shard_size)

    def open_file(self, path: Path, tensors: tuple[TensorSpec, ...]) -> FileWriter:
        return StreamingFileWriter(path, tensors)

    def finish_output(self, directory: Path, files: list[OutputFile]) -> list[Path]:
        return write_index(directory, files)


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_formats(register: Callable[[CheckpointFormat], None]) -> None:
    register(SafetensorsFormat())
