"""The report's task-vector section: task arithmetic, TIES, DARE-TIES, PCB and LiNeS compared on
the zoos' task experts.

As in the papers, each method's one hyperparameter (λ, or β for LiNeS) is searched on a grid and
chosen on the validation split, by mean normalised accuracy, and the chosen merge is scored on the
test split; the whole test grid is printed too, so nothing hides behind the selection. Several zoos
(built with different seeds) give a mean and a spread. The section states the zoos, the evaluation
seed and size, and the command, so each figure can be reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from workbench.zoo.reports.common import Log, Scored, Scores, ZooScorer, spread


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
    GridMethod(
        "task arithmetic",
        "λ",
        (0.2, 0.3, 0.5, 0.7, 1.0, 1.5),
        lambda ex, v: {"method": "task_arithmetic", "models": ex, "parameters": {"lambda": v}},
    ),
    GridMethod(
        "TIES, k = 20%",
        "λ",
        (0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        lambda ex, v: {"method": "ties", "models": _density(ex, 0.2), "parameters": {"lambda": v}},
    ),
    GridMethod(
        "DARE-TIES, density 0.2",
        "λ",
        (0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        lambda ex, v: {"method": "dare_ties", "models": _density(ex, 0.2), "parameters": {"lambda": v}},
    ),
    GridMethod(
        "PCB, r = 0.1",
        "λ",
        (0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        lambda ex, v: {"method": "pcb", "models": ex, "parameters": {"lambda": v}},
    ),
    GridMethod(
        "LiNeS on task arithmetic, α = 1/T",
        "β",
        (0.1, 0.25, 0.5, 0.75, 1.0),
        lambda ex, v: {"method": "lines", "models": ex, "parameters": {"beta": v}},
    ),
)


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
        return max(
            grid.items(), key=lambda item: (self.normalised(item[1].validation, "validation"), -item[0])
        )


def measure_zoo(scorer: ZooScorer, methods: tuple[GridMethod, ...] = METHODS, log: Log = print) -> ZooResult:
    """Base, experts, their uniform average, and every method at every grid value, on one zoo."""
    seed = scorer.manifest.get("seed")
    log(f"zoo seed {seed}: scoring the base and the experts")
    experts = {task: scorer.score(path) for task, path in zip(scorer.tasks, scorer.experts)}
    average = {"method": "linear", "models": scorer.experts}
    log(f"zoo seed {seed}: merging the uniform average")
    result = ZooResult(
        scorer.manifest, scorer.tasks, scorer.score(scorer.base), experts, scorer.merge_and_score(average)
    )
    for method in methods:
        result.grid[method.label] = {}
        for value in method.grid:
            log(f"zoo seed {seed}: {method.label}, {method.knob} = {value}")
            recipe = {"base": scorer.base, **method.recipe(scorer.experts, value)}
            result.grid[method.label][value] = scorer.merge_and_score(recipe)
    return result


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
    lines.append(
        "| uniform average (linear) | none | "
        + " | ".join(f"{v:.3f}" for v in average)
        + f" | {spread(average)} |"
    )
    for method in methods:
        cells, values = [], []
        for r in results:
            value, scored = r.chosen(method.label)
            values.append(r.normalised(scored.test, "test"))
            cells.append(f"{values[-1]:.3f} ({method.knob} = {value})")
        grid = ", ".join(f"{v:g}" for v in method.grid)
        lines.append(
            f"| {method.label} | {method.knob} ∈ {{{grid}}} | " + " | ".join(cells) + f" | {spread(values)} |"
        )
    return lines


def _grid_table(results: list[ZooResult], methods: tuple[GridMethod, ...]) -> list[str]:
    seeds = [r.manifest.get("seed") for r in results]
    lines = [
        "| method | value | "
        + " | ".join(f"seed {s}: validation / test" for s in seeds)
        + " | test mean ± sd |",
        "|---|---|" + "---|" * (len(seeds) + 1),
    ]
    for method in methods:
        for value in method.grid:
            tests = [r.normalised(r.grid[method.label][value].test, "test") for r in results]
            cells = [
                f"{r.normalised(r.grid[method.label][value].validation, 'validation'):.3f} / {t:.3f}"
                for r, t in zip(results, tests)
            ]
            lines.append(
                f"| {method.label} | {method.knob} = {value} | " + " | ".join(cells) + f" | {spread(tests)} |"
            )
    return lines


def render(results: list[ZooResult], methods: tuple[GridMethod, ...], command: str, n: int, seed: int) -> str:
    first = results[0]
    zoos = "; ".join(
        f"seed {r.manifest.get('seed')} (`{r.manifest.get('command', 'workbench zoo build')}`)"
        for r in results
    )
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
                f"- evaluation: exact-match accuracy on {n} held-out examples per task and split, "
                f"evaluation seed {seed}; validation and test splits are disjoint by content, and no model "
                "was trained on either"
            ),
            "- normalised accuracy: accuracy divided by the accuracy of that task's own expert (on the "
            "same split), averaged over tasks",
            (
                "- each method's hyperparameter is chosen per zoo on the validation split (best mean "
                "normalised accuracy) and reported on the test split, as the papers do"
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
