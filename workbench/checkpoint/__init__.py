"""Lazy checkpoint readers, streaming writers and the files that travel with weights."""

from workbench.checkpoint.base import (
    CheckpointFormat,
    CheckpointReader,
    FileWriter,
    OutputFile,
    TensorInfo,
    TensorSpec,
)

__all__ = ["CheckpointFormat", "CheckpointReader", "FileWriter", "OutputFile", "TensorInfo", "TensorSpec"]
