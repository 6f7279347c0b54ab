"""``workbench zoo report``: the miniature counterparts of the papers' headline tables.

Every number is measured on zoos built by ``workbench zoo build``: each row is a model (an input
of the zoo, or a merge made by running a recipe through the engine) scored by the zoo's task
evaluators. As in the papers, each method's one hyperparameter (λ, or β for LiNeS) is chosen on
the validation split, by mean normalised accuracy, and the chosen merge is scored on the test
split; the whole test grid is printed too, so nothing hides behind the selection. Several zoos
(built with different seeds) give a mean and a spread. The report states the zoos, the
evaluation seed and size, and the command, so each figure can be reproduced.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

from workbench.errors import WorkbenchError
from workbench.evaluation.running import evaluate, make_evaluators
from workbench.evaluator import load_model
from workbench.recipe.schema import EvaluatorSpec, Recipe
from workbench.registry import Registry

Log = Callable[[str], None]
Scores = dict[str, float]  # task -> accuracy


@dataclass(frozen=True)
class GridMethod:
    """One method of the comparison and the grid its hyperparameter is searched on."""

    label: str
    knob: str  # the name of the searched hyperparameter in the report ("λ", "β")
    grid: tuple[float, ...]
    recipe: Callable[[list[str], float], dict[str, Any]]  # (expert paths, value) -> recipe without base


def _density(experts: list[str], density: float) -> list[dict[str, Any]]:
    return [{"model": e, "parameters": {"density": density}} for e in experts]


# Grids follow the papers' searches, widened until the zoo's best values lie inside them: task
# arithmetic sums the task vectors (0.1..1.0 in the papers); TIES and PCB average them disjointly,
# so their λ runs higher (TIES 0.8..2.5 for T5, PCB 0.8..2.2); DARE-TIES, as in mergekit, sums the
# agreeing entries of vectors rescaled by about 1/density, so its λ runs lower; LiNeS tunes β on
# its baseline's grid (0.1..1.0).
METHODS: tuple[GridMethod, ...] = (
    GridMethod("task arithmetic", "λ", (0.2, 0.3, 0.5, 0.7, 1.0, 1.5), lambda ex, v: {"method": "task_arithmetic", "models": ex, "parameters": {"lambda": v}}),
    GridMethod("TIES, k = 20%", "λ", (0.5, 1.0, 1.5, 2.0, 2.5, 3.0), lambda ex, v: {"method": "ties", "models": _density(ex, 0.2), "parameters": {"lambda": v}}),
    GridMethod("DARE-TIES, density 0.2", "λ", (0.1, 0.2, 0.3, 0.5, 0.75, 1.0), lambda ex, v: {"method": "dare_ties", "models": _density(ex, 0.2), "parameters": {"lambda": v}}),
    GridMethod("PCB, r = 0.1", "λ", (0.5, 1.0, 1.5, 2.0, 2.5, 3.0), lambda ex, v: {"method": "pcb", "models": ex, "parameters": {"lambda": v}}),
    GridMethod("LiNeS on task arithmetic, α = 1/T", "β", (0.1, 0.25, 0.5, 0.75, 1.0), lambda ex, v: {"method": "lines", "models": ex, "parameters": {"beta": v}}),
)


@dataclass
class Scored:
    """One model scored on both splits."""

    validation: Scores
    test: Scores
    recipe: dict[str, Any] | None = None


@dataclass
class ZooResult:
    """Everything measured on one zoo."""

    manifest: dict[str, Any]
    tasks: list[str]
    base: Scored
    experts: dict[str, Scored]
    average: Scored
    grid: dict[str, dict[float, Scored]] = field(default_factory=dict)  # method label -> value -> scores

    def normalised(self, scores: Scores, split: str) -> float:
        """Mean over tasks of accuracy / the task's own expert's accuracy on the same split."""
        values = []
        for task in self.tasks:
            reference = getattr(self.experts[task], split)[task]
            if reference > 0:
                values.append(scores[task] / reference)
        return sum(values) / len(values) if values else float("nan")

    def chosen(self, method: str) -> tuple[float, Scored]:
        """The grid value with the best validation score (the smaller value on a tie)."""
        grid = self.grid[method]
        return max(grid.items(), key=lambda item: (self.normalised(item[1].validation, "validation"), -item[0]))


def read_manifest(zoo_dir: Path) -> dict[str, Any]:
    manifest = zoo_dir / "zoo.json"
    if not manifest.is_file():
        raise WorkbenchError(f"{zoo_dir} is not a zoo (no zoo.json); build one with `workbench zoo build {zoo_dir}`.")
    return json.loads(manifest.read_text())


class ZooScorer:
    """Scores models on the zoo's task experts' tasks with the registered ``zoo_<task>`` evaluators."""

    def __init__(self, zoo_dir: Path, registry: Registry, n: int, seed: int, tasks: list[str] | None = None) -> None:
        """``tasks``: the tasks scored; by default those of the zoo's task experts."""
        self.zoo_dir = zoo_dir
        self.manifest = read_manifest(zoo_dir)
        self.tasks: list[str] = tasks or list(self.manifest["experts"])
        self.registry = registry
        self.evaluators = {
            split: make_evaluators([EvaluatorSpec(name=f"zoo_{t}", options={"n": n, "seed": seed, "split": split}) for t in self.tasks], registry)
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
        from workbench.engine.runner import run_recipe

        with tempfile.TemporaryDirectory(prefix="workbench-zoo-") as tmp:
            result = run_recipe(Recipe.model_validate(recipe), out=Path(tmp) / "merged", registry=self.registry)
            return self.score(result.out_dir, recipe)


def measure_zoo(scorer: ZooScorer, methods: tuple[GridMethod, ...] = METHODS, log: Log = print) -> ZooResult:
    """Base, experts, their uniform average, and every method at every grid value, on one zoo."""
    seed = scorer.manifest.get("seed")
    log(f"zoo seed {seed}: scoring the base and the experts")
    experts = {task: scorer.score(path) for task, path in zip(scorer.tasks, scorer.experts)}
    average = {"method": "linear", "models": scorer.experts}
    log(f"zoo seed {seed}: merging the uniform average")
    result = ZooResult(scorer.manifest, scorer.tasks, scorer.score(scorer.base), experts, scorer.merge_and_score(average))
    for method in methods:
        result.grid[method.label] = {}
        for value in method.grid:
            log(f"zoo seed {seed}: {method.label}, {method.knob} = {value}")
            recipe = {"base": scorer.base, **method.recipe(scorer.experts, value)}
            result.grid[method.label][value] = scorer.merge_and_score(recipe)
    return result


def spread(values: list[float]) -> str:
    """'mean ± sd' over zoo seeds (the mean alone for one seed)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def _task_table(first: ZooResult, methods: tuple[GridMethod, ...]) -> list[str]:
    tasks = first.tasks
    lines = [
        "| model | " + " | ".join(tasks) + " | mean accuracy | mean normalised accuracy |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]

    def row(label: str, scored: Scored) -> str:
        mean = sum(scored.test.values()) / len(scored.test)
        cells = " | ".join(f"{scored.test[t]:.3f}" for t in tasks)
        return f"| {label} | {cells} | {mean:.3f} | {first.normalised(scored.test, 'test'):.3f} |"

    lines.append(row("base", first.base))
    lines += [row(f"expert: {task}", first.experts[task]) for task in tasks]
    lines.append(row("uniform average (linear)", first.average))
    for method in methods:
        value, scored = first.chosen(method.label)
        lines.append(row(f"{method.label}, {method.knob} = {value} (chosen on validation)", scored))
    return lines


def _comparison_table(results: list[ZooResult], methods: tuple[GridMethod, ...]) -> list[str]:
    seeds = [r.manifest.get("seed") for r in results]
    lines = [
        "| method | grid | " + " | ".join(f"zoo seed {s}" for s in seeds) + " | mean ± sd over seeds |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    average = [r.normalised(r.average.test, "test") for r in results]
    lines.append("| uniform average (linear) | none | " + " | ".join(f"{v:.3f}" for v in average) + f" | {spread(average)} |")
    for method in methods:
        cells, values = [], []
        for r in results:
            value, scored = r.chosen(method.label)
            values.append(r.normalised(scored.test, "test"))
            cells.append(f"{values[-1]:.3f} ({method.knob} = {value})")
        grid = ", ".join(f"{v:g}" for v in method.grid)
        lines.append(f"| {method.label} | {method.knob} ∈ {{{grid}}} | " + " | ".join(cells) + f" | {spread(values)} |")
    return lines


def _grid_table(results: list[ZooResult], methods: tuple[GridMethod, ...]) -> list[str]:
    seeds = [r.manifest.get("seed") for r in results]
    lines = [
        "| method | value | " + " | ".join(f"seed {s}: validation / test" for s in seeds) + " | test mean ± sd |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for method in methods:
        for value in method.grid:
            tests = [r.normalised(r.grid[method.label][value].test, "test") for r in results]
            cells = [f"{r.normalised(r.grid[method.label][value].validation, 'validation'):.3f} / {t:.3f}" for r, t in zip(results, tests)]
            lines.append(f"| {method.label} | {method.knob} = {value} | " + " | ".join(cells) + f" | {spread(tests)} |")
    return lines


def render(results: list[ZooResult], methods: tuple[GridMethod, ...], command: str, n: int, seed: int) -> str:
    first = results[0]
    zoos = "; ".join(f"seed {r.manifest.get('seed')} (`{r.manifest.get('command', 'workbench zoo build')}`)" for r in results)
    return "\n".join(
        [
            "# Reproductions",
            "",
            "Miniature counterparts of the papers' headline tables, measured on the model zoo",
            "(`workbench zoo build`; see `workbench/zoo/__init__.py` for the synthetic languages and tasks).",
            f"Generated {date.today().isoformat()} by `{command}`.",
            "",
            f"- zoos: scale `{first.manifest.get('scale')}`, {len(results)} build(s): {zoos}",
            (
                f"- evaluation: exact-match accuracy on {n} held-out examples per task and split, evaluation seed {seed};"
                " validation and test splits are disjoint by content, and no model was trained on either"
            ),
            "- normalised accuracy: accuracy divided by the accuracy of that task's own expert (on the same split), averaged over tasks",
            (
                "- each method's hyperparameter is chosen per zoo on the validation split (best mean normalised accuracy)"
                " and reported on the test split, as the papers do"
            ),
            "",
            "## Task-vector methods compared over zoo seeds (test split, mean normalised accuracy)",
            "",
            *_comparison_table(results, methods),
            "",
            f"## Per task, zoo seed {first.manifest.get('seed')} (test split accuracy)",
            "",
            *_task_table(first, methods),
            "",
            "## The whole grid (mean normalised accuracy, validation / test)",
            "",
            *_grid_table(results, methods),
            "",
            "Merged rows are recipes run through the engine on the experts above (float32 compute, output in",
            "the experts' dtype); the uniform average is `linear` with equal weights; task arithmetic adds",
            "λ · Σ τ_t to the base; TIES and PCB add λ times their disjoint (weighted) mean; DARE-TIES",
            "(mergekit's defaults) adds λ times the sum of the agreeing entries of its rescaled vectors;",
            "LiNeS scales task arithmetic's summed vector by α + β·ℓ/(L−1) per layer ℓ, α = 1/T.",
            "",
        ]
    )


SECTIONS = ("task_vectors", "learned", "layer_swap", "ot_fusion", "lora_experts")


def write_report(zoo_dirs: list[Path], out_file: Path, registry: Registry, n: int, seed: int, command: str, log: Log = print, methods: tuple[GridMethod, ...] = METHODS, sections: tuple[str, ...] = SECTIONS) -> str:
    """Measure every zoo (all are checked first, so a typo fails before any work) and write the
    report (the chosen sections only, in the usual order)."""
    from workbench.zoo.reports.atlas import measure_learned, render_learned
    from workbench.zoo.reports.mola import measure_mola, mola_note, render_mola
    from workbench.zoo.reports.ot_fusion import measure_fusions, render_fusions
    from workbench.zoo.reports.layer_swap import measure_swaps, render_swaps

    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise WorkbenchError(f"unknown report section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}.")
    scorers = [ZooScorer(zoo_dir, registry, n, seed) for zoo_dir in zoo_dirs]
    tasks = {tuple(s.tasks) for s in scorers}
    if len(tasks) > 1:
        raise WorkbenchError(f"the zoos have different task experts ({sorted(tasks)}); build them with the same workbench version.")
    parts = []
    if "task_vectors" in sections:
        parts.append(render([measure_zoo(scorer, methods, log) for scorer in scorers], methods, command, n, seed))
    if "learned" in sections:
        parts.append("\n".join(render_learned([measure_learned(scorer, n, seed, log) for scorer in scorers], n)))
    if "layer_swap" in sections:
        parts.append("\n".join(render_swaps([measure_swaps(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs])))
    if "ot_fusion" in sections:
        parts.append("\n".join(render_fusions([measure_fusions(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs])))
    if "lora_experts" in sections:
        parts.append("\n".join(render_mola([measure_mola(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs], mola_note(zoo_dirs[0]))))
    text = "\n".join(parts) + "\n"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    return text
