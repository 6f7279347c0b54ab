"""Hugging Face model folders: one ``model.safetensors`` or shards listed in an index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, OutputFile, TensorInfo, TensorSpec
from workbench.checkpoint.safetensors_io import MAX_HEADER_BYTES, SafetensorsFile, loads_json
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def find_safetensors(path: Path) -> tuple[Path | None, list[Path]]:
    """The index file (if any) and the data files of a folder or single file."""
    if path.is_file():
        return None, [path] if path.suffix == ".safetensors" else []
    index = path / INDEX_NAME
    if index.is_file():
        return index, []
    single = path / SINGLE_NAME
    if single.is_file():
        return None, [single]
    return None, sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))


def folder_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` beside a model (``path``: its folder or one of its files), if any."""
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(_read_small(config))
    except RecursionError:
        raise CheckpointError(f"{config} is not valid JSON (nested too deeply).") from None
    except ValueError as exc:
        raise CheckpointError(f"{config} is not valid JSON ({exc}).") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {config}: {exc.strerror}.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{config} holds a JSON {type(data).__name__} where a config object ({{...}}) is expected."
        )
    return data


def _read_small(path: Path) -> bytes:
    """A JSON side file's bytes; refused (``ValueError``) past the header cap, so a huge or endless
    file is never read whole (real indexes and configs are kilobytes)."""
    with path.open("rb") as handle:
        raw = handle.read(MAX_HEADER_BYTES + 1)
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"larger than {MAX_HEADER_BYTES} bytes")
    return raw


def _shard_name_problem(file: object) -> str | None:
    """Why an index entry cannot name a shard: only relative paths inside the model folder are read,
    never an absolute path or one climbing out with '..' (an index may come from anyone)."""
    if not isinstance(file, str) or not file:
        return "is not a file name"
    if "\0" in file or Path(file).is_absolute() or ".." in Path(file).parts:
        return "is not a file inside the model folder"
    return None


class SafetensorsFolder(CheckpointReader):
    """A lazily opened safetensors checkpoint: a folder (single file or sharded) or one file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model path {self.path} does not exist.")
        index, files = find_safetensors(self.path)
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, tuple[SafetensorsFile, int]] = {}
        try:
            if index is not None:
                self._open_index(index)
            elif files:
                for file in files:
                    self._add(self._open(file))
            else:
                raise CheckpointError(
                    f"{self.path} is not a model folder: it has no model.safetensors, no {INDEX_NAME} and no"
                    " *.safetensors file."
                )
        except BaseException:
            self.close()
            raise
        self._order = list(self._where)

    def _open(self, file: Path) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(file)
        return self._files[file]

    def _add(self, st: SafetensorsFile, only: set[str] | None = None) -> None:
        for name, (_info, begin) in st.tensors.items():
            if only is not None and name not in only:
                continue
            if name in self._where and self._where[name][0] is not st:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' is stored twice ({self._where[name][0].path.name} and "
                    f"{st.path.name})."
                )
            self._where[name] = (st, begin)

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = loads_json(_read_small(index))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc}).") from exc
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            problem = _shard_name_problem(file)
            if problem:
                raise CheckpointError(
                    f"{index} places tensor '{name}' in {json.dumps(file)}, which {problem}."
                )
            by_file.setdefault(file, set()).add(name)
        for file, names in by_file.items():
            shard = self.path / file
            try:
                present = shard.is_file()
            except OSError:  # a name the file system refuses (too long): no such shard either
                present = False
            if not present:
                raise CheckpointError(f"{index} lists shard '{file}', which is missing from {self.path}.")
            st = self._open(shard)
            missing = sorted(names - set(st.tensors))
            if missing:
                raise CheckpointError(
                    f"{index} places tensor '{missing[0]}' in {file}, but that shard does not hold it"
                    f" ({len(missing)} such tensor(s))."
                )
            self._add(st, names)
        # Keep storage order: by shard, then by offset.
        self._where = dict(sorted(self._where.items(), key=lambda kv: (str(kv[1][0].path), kv[1][1])))

    def tensor_names(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        try:
            st, _ = self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from model {self.path}.") from None
        return st.tensors[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        info = self.info(name)
        st, begin = self._where[name]
        return st.read(info, begin, rows)

    def config(self) -> dict[str, Any] | None:
        return folder_config(self.path)

    def files(self) -> list[Path]:
        return list(self._files)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for st in self._files.values():
            merged.update(st.metadata)
        return merged

    def close(self) -> None:
        for st in self._files.values():
            st.close()


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[OutputFile]:
    """Split tensors, in order, into HF-named shards of at most ``shard_size`` bytes.

    A tensor larger than ``shard_size`` gets a shard of its own.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [OutputFile(SINGLE_NAME, tuple(groups[0]))]
    n = len(groups)
    return [OutputFile(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)]


def write_index(directory: Path, files: list[OutputFile]) -> list[Path]:
    """Write ``model.safetensors.index.json`` when the output has more than one shard."""
    if len(files) < 2:
        return []
    weight_map = {spec.name: f.name for f in files for spec in f.tensors}
    index = {"metadata": {"total_size": sum(f.nbytes for f in files)}, "weight_map": weight_map}
    path = directory / INDEX_NAME
    path.write_text(json.dumps(index, indent=2) + "\n")
    return [path]
