"""``workbench zoo report``: the miniature counterparts of the papers' headline tables.

Every number is measured on a zoo built by ``workbench zoo build``: each row is a model (an input
of the zoo, or a merge made by running a recipe through the engine) scored by the zoo's task
evaluators on held-out examples. The report states the zoo's scale and seed, the evaluation seed
and size, and the command, so each figure can be reproduced.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.evaluation import evaluate, make_evaluators
from workbench.recipe import EvaluatorSpec, Recipe
from workbench.registry import Registry

LAMBDAS = (0.3, 0.5, 0.7, 1.0)


@dataclass
class Row:
    label: str
    accuracy: dict[str, float]
    recipe: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def read_manifest(zoo_dir: Path) -> dict[str, Any]:
    manifest = zoo_dir / "zoo.json"
    if not manifest.is_file():
        raise WorkbenchError(f"{zoo_dir} is not a zoo (no zoo.json); build one with `workbench zoo build {zoo_dir}`.")
    return json.loads(manifest.read_text())


class ZooScorer:
    """Scores models on the zoo's task experts' tasks with the registered ``zoo_<task>`` evaluators."""

    def __init__(self, zoo_dir: Path, registry: Registry, n: int, seed: int) -> None:
        self.zoo_dir = zoo_dir
        self.manifest = read_manifest(zoo_dir)
        self.tasks: list[str] = list(self.manifest["experts"])
        specs = [EvaluatorSpec(name=f"zoo_{task}", options={"n": n, "seed": seed}) for task in self.tasks]
        self.evaluators = make_evaluators(specs, registry)
        self.registry = registry

    def path(self, relative: str) -> Path:
        return self.zoo_dir / relative

    def score(self, model: Path) -> dict[str, float]:
        results = evaluate(model, self.evaluators)
        return {task: float(results[f"zoo_{task}"]["accuracy"]) for task in self.tasks}

    def merge_and_score(self, recipe: dict[str, Any]) -> dict[str, float]:
        from workbench.engine import run_recipe

        with tempfile.TemporaryDirectory(prefix="workbench-zoo-") as tmp:
            result = run_recipe(Recipe.model_validate(recipe), out=Path(tmp) / "merged", registry=self.registry)
            return self.score(result.out_dir)


def baseline_rows(scorer: ZooScorer, lambdas: tuple[float, ...] = LAMBDAS, log: Callable[[str], None] = print) -> list[Row]:
    """Base, every expert, their uniform average, and task arithmetic at several lambdas."""
    base = str(scorer.path(scorer.manifest["base"]))
    experts = [str(scorer.path(scorer.manifest["experts"][task])) for task in scorer.tasks]
    rows = [Row("base", scorer.score(Path(base)))]
    for task, expert in zip(scorer.tasks, experts):
        log(f"scoring expert {task}")
        rows.append(Row(f"expert: {task}", scorer.score(Path(expert))))
    average = {"method": "linear", "models": experts}
    log("merging: uniform average")
    rows.append(Row("uniform average (linear)", scorer.merge_and_score(average), average))
    for lam in lambdas:
        recipe = {"method": "task_arithmetic", "base": base, "models": experts, "parameters": {"lambda": lam}}
        log(f"merging: task arithmetic lambda={lam}")
        rows.append(Row(f"task arithmetic, λ = {lam}", scorer.merge_and_score(recipe), recipe))
    return rows


def method_rows(scorer: ZooScorer, log: Callable[[str], None] = print) -> list[Row]:
    """The task-vector methods of issue 4 on the same experts, at their papers' usual settings."""
    base = str(scorer.path(scorer.manifest["base"]))
    experts = [str(scorer.path(scorer.manifest["experts"][task])) for task in scorer.tasks]
    density = [{"model": e, "parameters": {"density": 0.2}} for e in experts]
    recipes = {
        "TIES, k = 20%, λ = 1": {"method": "ties", "models": density, "parameters": {"lambda": 1.0}},
        "TIES, k = 20%, λ = 1, model-wide top-k": {"method": "ties", "models": density, "parameters": {"lambda": 1.0, "scope": "model"}},
        "DARE-TIES, density 0.2, λ = 1": {"method": "dare_ties", "models": density, "parameters": {"lambda": 1.0}},
        "PCB, r = 0.1, λ = 1": {"method": "pcb", "models": experts, "parameters": {"lambda": 1.0}},
        "LiNeS on task arithmetic, α = 1/T, β = 0.5": {"method": "lines", "models": experts, "parameters": {"beta": 0.5}},
    }
    rows = []
    for label, recipe in recipes.items():
        log(f"merging: {label}")
        full = {"base": base, **recipe}
        rows.append(Row(label, scorer.merge_and_score(full), full))
    return rows


def normalized(row: Row, experts: dict[str, float]) -> float:
    """Mean over tasks of accuracy / the task's own expert's accuracy."""
    values = [row.accuracy[t] / experts[t] for t in experts if experts[t] > 0]
    return sum(values) / len(values) if values else float("nan")


def _table(rows: list[Row], tasks: list[str], experts: dict[str, float]) -> list[str]:
    lines = [
        "| model | " + " | ".join(tasks) + " | mean accuracy | mean normalised accuracy |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for row in rows:
        mean = sum(row.accuracy.values()) / len(row.accuracy)
        cells = " | ".join(f"{row.accuracy[t]:.3f}" for t in tasks)
        lines.append(f"| {row.label} | {cells} | {mean:.3f} | {normalized(row, experts):.3f} |")
    return lines


def render(rows: list[Row], method_table: list[Row], scorer: ZooScorer, command: str, n: int, seed: int) -> str:
    tasks = scorer.tasks
    experts = {t: next(r.accuracy[t] for r in rows if r.label == f"expert: {t}") for t in tasks}
    manifest = scorer.manifest
    lines = [
        "# Reproductions",
        "",
        "Miniature counterparts of the papers' headline tables, measured on the model zoo",
        "(`workbench zoo build`; see `workbench/zoo/__init__.py` for the synthetic languages and tasks).",
        f"Generated {date.today().isoformat()} by `{command}`.",
        "",
        f"- zoo: scale `{manifest.get('scale')}`, seed {manifest.get('seed')}, built by `{manifest.get('command', 'workbench zoo build')}`",
        f"- evaluation: exact-match accuracy on {n} held-out examples per task, evaluation seed {seed}",
        "- normalised accuracy: accuracy divided by the accuracy of that task's own expert, averaged over tasks",
        "",
        "## Baselines: task-vector merging of the task experts",
        "",
        *_table(rows, tasks, experts),
        "",
        "## Task-vector methods (TIES, DARE-TIES, PCB, LiNeS) on the same experts",
        "",
        *_table(method_table, tasks, experts),
    ]
    lines += [
        "",
        "Merged rows are recipes run through the engine on the experts above (float32 compute, output in",
        "the experts' dtype); the uniform average is `linear` with equal weights, task arithmetic adds",
        "λ · Σ τ_t to the base.",
        "",
    ]
    return "\n".join(lines)


def write_report(zoo_dir: Path, out_file: Path, registry: Registry, n: int, seed: int, command: str, log: Callable[[str], None] = print) -> str:
    scorer = ZooScorer(zoo_dir, registry, n, seed)
    text = render(baseline_rows(scorer, log=log), method_rows(scorer, log=log), scorer, command, n, seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    return text
