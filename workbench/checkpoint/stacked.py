"""A model assembled from layer ranges of other models (mergekit's ``slices``), read lazily.

``StackedReader`` looks like any checkpoint to the planner and the engine: its layers are the
concatenation of the parts' layer ranges, renumbered from 0; the embeddings (and any other tensor
outside the layers) come from the first part's model, the final norm and the head from the last
part's, as in mergekit. Nothing is copied: each read goes to the
source model's file. Its ``config()`` is the first model's config with the new layer count, so
the output is a model transformers can load (depth up-scaling: a deeper model from a shallower
one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.architecture import LAYER_COUNT_KEYS, layer_count, place, renumber_layer
from workbench.checkpoint.base import CheckpointReader, TensorInfo
from workbench.errors import CheckpointError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerRange:
    """Layers ``[start, stop)`` of one model."""

    reader: CheckpointReader
    start: int
    stop: int
    label: str  # for messages: 'slices[1].sources[0] (path)'


def _per_layer(part: LayerRange, key: str, index: int) -> Any:
    """Entry ``index`` of the per-layer config list ``key`` of the part's own model."""
    values = (part.reader.config() or {}).get(key)
    if not isinstance(values, list) or index >= len(values):
        raise CheckpointError(
            f"{part.label}: config.json has no per-layer '{key}' entry for layer {index}, which the first "
            "model's config has."
        )
    return values[index]


class StackedReader(CheckpointReader):
    def __init__(self, parts: list[LayerRange]) -> None:
        if not parts:
            raise CheckpointError("a stacked model needs at least one layer range.")
        self.parts = parts
        self.path = parts[0].reader.path
        first = parts[0].reader
        self._source_layers = layer_count(first.tensor_names(), first.config())
        # output name -> (reader, source name)
        self._where: dict[str, tuple[CheckpointReader, str]] = {}
        self._order: list[str] = []
        layer_names: list[str] = []
        new_index = 0
        for part in parts:
            count = layer_count(part.reader.tensor_names(), part.reader.config())
            if not 0 <= part.start < part.stop <= count:
                raise CheckpointError(
                    f"{part.label}: layer_range [{part.start}, {part.stop}] does not fit the model's "
                    f"{count} layers (0..{count - 1}; the end is exclusive)."
                )
            by_layer: dict[int, list[str]] = {}
            for name in part.reader.tensor_names():
                index = place(name).layer_index
                if index is not None:
                    by_layer.setdefault(index, []).append(name)
            for index in range(part.start, part.stop):
                for name in by_layer.get(index, []):
                    out = renumber_layer(name, new_index)
                    self._where[out] = (part.reader, name)
                    layer_names.append(out)
                new_index += 1
        self.layers = new_index
        last = parts[-1].reader
        inserted = False
        for name in first.tensor_names():
            if place(name).layer_index is not None:
                if not inserted:  # the layers go where the first model keeps its own
                    self._order.extend(layer_names)
                    inserted = True
                continue
            # Like mergekit: the final norm and the head sit on top of the last slice's layers.
            owner = last if place(name).module_kind in ("final_norm", "head") and name in last else first
            self._where[name] = (owner, name)
            self._order.append(name)
        if not inserted:
            raise CheckpointError(
                f"{parts[0].label}: no tensor matches a known layer layout (model.layers.N., ...), so "
                "layers cannot be sliced."
            )

    def tensor_names(self) -> list[str]:
        return list(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _source(self, name: str) -> tuple[CheckpointReader, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(
                f"tensor '{name}' is missing from the stacked model built from {self.path}."
            ) from None

    def info(self, name: str) -> TensorInfo:
        reader, source = self._source(name)
        return reader.info(source)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        reader, source = self._source(name)
        return reader.read(source, rows)

    def config(self) -> dict[str, Any] | None:
        """The first model's config with the new layer count (and per-layer lists resliced)."""
        config = self.parts[0].reader.config()
        if config is None:
            return None
        config = dict(config)
        for key in LAYER_COUNT_KEYS:
            if key in config:
                config[key] = self.layers
        for key, value in list(config.items()):  # e.g. layer_types: one entry per layer
            if isinstance(value, list) and self._source_layers > 0 and len(value) == self._source_layers:
                config[key] = [
                    _per_layer(part, key, i) for part in self.parts for i in range(part.start, part.stop)
                ]
        return config

    def files(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for part in self.parts:
            for file in part.reader.files():
                seen.setdefault(file, None)
        return list(seen)

    def close(self) -> None:
        closed: set[int] = set()
        for part in self.parts:
            if id(part.reader) not in closed:
                closed.add(id(part.reader))
                part.reader.close()
