"""PyTorch ``.bin`` checkpoints (``pytorch_model.bin``, or shards with ``pytorch_model.bin.index.json``).

A ``.bin`` file is a pickle, and unpickling can run arbitrary code, so every file is loaded with
``torch.load(weights_only=True)``: tensors, dicts, lists and plain values only. A file that needs
anything else (a custom class, a function call) is refused with the reason, never loaded. Files in
torch's zip format are memory-mapped (``mmap=True``), so a shard costs address space, not memory,
until its tensors are read; the legacy format cannot be mapped and is loaded whole.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.checkpoint.dtypes import from_torch
from workbench.checkpoint.folder import folder_config
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

SINGLE = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"


def find_bin(path: Path) -> list[Path]:
    """The ``.bin`` files of a model folder (from its index when sharded), or the file itself."""
    if path.is_file():
        return [path] if path.suffix == ".bin" else []
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid PyTorch checkpoint index ({exc}).") from exc
    return [path / SINGLE] if (path / SINGLE).is_file() else []


def load_weights_only(file: Path) -> dict[str, "torch.Tensor"]:
    """A state dict from one ``.bin`` file, refusing whatever needs more than plain unpickling."""
    import torch

    if not file.is_file():
        raise CheckpointError(f"{file} does not exist (named by the checkpoint index).")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "zip" not in str(exc).lower() and "mmap" not in str(exc).lower():
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format: not mappable
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{file}: refused to load: it needs more than tensors and plain values to unpickle ({reason}). "
            "Unpickling such a file can run arbitrary code; convert it to safetensors where you trust it."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint ({exc}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{file} does not hold a state dict (a mapping of names to tensors).")
    return state


class TorchBinFolder(CheckpointReader):
    """A ``.bin`` model, every file loaded weights-only (and mapped) when the reader opens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model path {self.path} does not exist.")
        self._files = find_bin(self.path)
        if not self._files:
            raise CheckpointError(f"{self.path} has no {SINGLE}, no {INDEX} and is not a .bin file.")
        self._tensors: dict[str, torch.Tensor] = {}
        self._file_of: dict[str, Path] = {}
        for file in self._files:
            for name, tensor in load_weights_only(file).items():
                if name in self._tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor '{name}' is stored twice ({self._file_of[name].name} and {file.name})."
                    )
                self._tensors[name] = tensor
                self._file_of[name] = file

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._get(name)
        return TensorInfo(name, from_torch(tensor.dtype), tuple(tensor.shape), self._file_of[name])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        tensor = self._get(name)
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def _get(self, name: str) -> "torch.Tensor":
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'.")
        return self._tensors[name]

    def config(self) -> dict[str, Any] | None:
        return folder_config(self.path)

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        self._tensors.clear()
