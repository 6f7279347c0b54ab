"""Learned task-vector coefficients (aTLAS, AdaMerging): the table and the files it is kept in.

A data-driven method such as ``atlas`` learns one coefficient per task vector, parameter block and
partition, λ[t, b, k]. The table records which block every tensor belongs to, so the same values
can be read back as fixed per-tensor weights by any task-vector recipe (``{file: ...}`` values),
and drawn as a heatmap by ``workbench analyze``. It lives in ``<output>/coefficients/``:

- ``coefficients.json``: the whole table (this module reads and writes it);
- ``coefficients.csv``: one row per (model, block, partition), for spreadsheets;
- ``weights.model<i>.json``: tensor name -> λ of model i, loadable as ``weight: {file: ...}``
  (only without partitions: a partitioned block has several values per tensor);
- ``task_arithmetic.yaml``: a task-arithmetic recipe that reproduces the merge from those files.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

FOLDER = "coefficients"
TABLE_FILE = "coefficients.json"
CSV_FILE = "coefficients.csv"
RECIPE_FILE = "task_arithmetic.yaml"
Granularity = Literal["tensor", "layer", "module", "model"]


def weights_file(model_index: int) -> str:
    return f"weights.model{model_index}.json"


def block_of(name: str, granularity: Granularity) -> str:
    """The block a tensor belongs to: itself, its layer, its module kind across layers, or the model.

    Tensors outside the transformer layers (embeddings, final norm, head) are their own block
    under ``layer`` and ``module``, as each is a module of its own.
    """
    from workbench import architecture

    if granularity == "tensor":
        return name
    if granularity == "model":
        return "model"
    place = architecture.place(name)
    if place.layer_index is None:
        return name
    return f"layers.{place.layer_index}" if granularity == "layer" else place.module


@dataclass
class CoefficientTable:
    """λ[model][block][partition], with the block of every tensor it covers."""

    models: list[str]  # the task-vector sources, as the recipe names them, in recipe order
    granularity: Granularity
    partitions: int
    blocks: list[str]
    values: list[list[list[float]]]
    tensor_blocks: dict[str, str]  # tensor name -> block name
    #: The recipe seed: partition k of tensor n holds the elements where
    #: ``partition_assignment(n, shape, partitions, seed) == k``.
    seed: int = 0

    @functools.cached_property
    def _block_index(self) -> dict[str, int]:
        return {block: i for i, block in enumerate(self.blocks)}

    def value(self, model: int, tensor: str) -> list[float]:
        """λ of every partition of the block ``tensor`` belongs to, for one model."""
        return self.values[model][self._block_index[self.tensor_blocks[tensor]]]

    def per_tensor(self, model: int) -> dict[str, float]:
        """Tensor name -> λ of one model, the form ``{file: ...}`` parameter values take."""
        if self.partitions != 1:
            raise WorkbenchError(
                f"the coefficients have {self.partitions} partitions per block, so a tensor has no single λ;"
                " only the method that learned them (atlas) can apply them."
            )
        return {name: self.value(model, name)[0] for name in self.tensor_blocks}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: Path, base: str, final_folder: Path) -> list[Path]:
        """Write every file of the table into ``folder`` (which becomes ``final_folder`` once the
        output is published: the recipe names the weight files there)."""
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / TABLE_FILE, folder / CSV_FILE]
        (folder / TABLE_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (folder / CSV_FILE).write_text(self.csv_text())
        if self.partitions == 1:
            for i in range(len(self.models)):
                (folder / weights_file(i)).write_text(json.dumps(self.per_tensor(i), indent=1) + "\n")
                written.append(folder / weights_file(i))
            (folder / RECIPE_FILE).write_text(self.recipe_yaml(base, final_folder))
            written.append(folder / RECIPE_FILE)
        return written

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "block", "partition", "lambda"])
        for model, rows in zip(self.models, self.values):
            for block, values in zip(self.blocks, rows):
                for k, value in enumerate(values):
                    writer.writerow([model, block, k, repr(value)])
        return out.getvalue()

    def recipe_yaml(self, base: str, folder: Path) -> str:
        import yaml

        recipe = {
            "method": "task_arithmetic",
            "base": base,
            "models": [
                {"model": m, "parameters": {"weight": {"file": str(folder / weights_file(i))}}}
                for i, m in enumerate(self.models)
            ],
            "parameters": {"lambda": 1.0},
        }
        header = (
            "# The learned coefficients as fixed per-tensor task-arithmetic weights: reproduces the merge.\n"
        )
        return header + yaml.safe_dump(recipe, sort_keys=False)


def partition_assignment(shape: tuple[int, ...], partitions: int, seed: int) -> "torch.Tensor":
    """The partition of every element of a tensor (uint8): fixed random groups, as aTLAS × K uses,
    drawn from the tensor's own seed so that learning and merging see the same groups."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        partitions, shape, generator=generator, dtype=torch.uint8
    )  # atlas allows at most 256


def find_table(path: Path) -> Path | None:
    """The table file of ``path``: the file itself, or inside a merged output or its coefficients folder."""
    for candidate in (path, path / FOLDER / TABLE_FILE, path / TABLE_FILE):
        if candidate.is_file() and candidate.name == TABLE_FILE:
            return candidate
    return None


def load_table(path: Path) -> CoefficientTable:
    found = find_table(path)
    if found is None:
        raise WorkbenchError(f"{path} holds no learned coefficients ({FOLDER}/{TABLE_FILE}).")
    try:
        data = json.loads(found.read_text())
        table = CoefficientTable(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise WorkbenchError(f"{found} is not a coefficient table ({type(exc).__name__}: {exc}).") from None
    shape_ok = len(table.values) == len(table.models) and all(
        len(rows) == len(table.blocks) and all(len(v) == table.partitions for v in rows)
        for rows in table.values
    )
    if not shape_ok or not set(table.tensor_blocks.values()) <= set(table.blocks):
        raise WorkbenchError(
            f"{found}: the values do not match the models × blocks × partitions the table declares."
        )
    return table
