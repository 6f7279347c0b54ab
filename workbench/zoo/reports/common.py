"""What the report's sections share: reading a zoo's manifest, scoring models on the zoo's tasks
(validation and test split) with the registered ``zoo_<task>`` evaluators, and the mean ± sd over
zoo seeds that the tables print."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.evaluation.running import evaluate, make_evaluators
from workbench.evaluator import load_model
from workbench.recipe.schema import EvaluatorSpec, Recipe
from workbench.registry import Registry

Log = Callable[[str], None]
Scores = dict[str, float]  # task -> accuracy


@dataclass
class Scored:
    """One model scored on both splits."""

    validation: Scores
    test: Scores
    recipe: dict[str, Any] | None = None


def read_manifest(zoo_dir: Path) -> dict[str, Any]:
    manifest = zoo_dir / "zoo.json"
    if not manifest.is_file():
        raise WorkbenchError(
            f"{zoo_dir} is not a zoo (no zoo.json); build one with `workbench zoo build {zoo_dir}`."
        )
    return json.loads(manifest.read_text())


class ZooScorer:
    """Scores models on the zoo's task experts' tasks with the registered ``zoo_<task>`` evaluators."""

    def __init__(
        self, zoo_dir: Path, registry: Registry, n: int, seed: int, tasks: list[str] | None = None
    ) -> None:
        """``tasks``: the tasks scored; by default those of the zoo's task experts."""
        self.zoo_dir = zoo_dir
        self.manifest = read_manifest(zoo_dir)
        self.tasks: list[str] = tasks or list(self.manifest["experts"])
        self.registry = registry
        self.evaluators = {
            split: make_evaluators(
                [
                    EvaluatorSpec(name=f"zoo_{t}", options={"n": n, "seed": seed, "split": split})
                    for t in self.tasks
                ],
                registry,
            )
            for split in ("validation", "test")
        }

    def path(self, relative: str) -> str:
        return str(self.zoo_dir / relative)

    @property
    def base(self) -> str:
        return self.path(self.manifest["base"])

    @property
    def experts(self) -> list[str]:
        return [self.path(self.manifest["experts"][task]) for task in self.tasks]

    def score(self, model: Path | str, recipe: dict[str, Any] | None = None) -> Scored:
        loaded = load_model(model)
        splits = {}
        for split, evaluators in self.evaluators.items():
            results = evaluate(loaded, evaluators)
            splits[split] = {task: float(results[f"zoo_{task}"]["accuracy"]) for task in self.tasks}
        return Scored(splits["validation"], splits["test"], recipe)

    def merge_and_score(self, recipe: dict[str, Any]) -> Scored:
        from workbench.engine.run import run_recipe

        with tempfile.TemporaryDirectory(prefix="workbench-zoo-") as tmp:
            result = run_recipe(
                Recipe.model_validate(recipe), out=Path(tmp) / "merged", registry=self.registry
            )
            return self.score(result.out_dir, recipe)


def spread(values: list[float]) -> str:
    """'mean ± sd' over zoo seeds (the mean alone for one seed)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"
