"""What a sweep candidate is and how one is run: its settings, the picklable task a worker gets,
its row of the results table, and :func:`run_one`, which merges and scores one candidate.

Both :mod:`workbench.sweep.search` (which builds candidates and keeps the results table) and
:mod:`workbench.sweep.backends` (where candidates run) use these; this module imports neither.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.recipe.schema import EvaluatorSpec, parse_recipe
from workbench.registry import Registry

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Setting:
    """One ``--set``: a dotted path into the recipe data and the values it takes."""

    label: str
    path: Path_
    values: tuple[Any, ...]
    #: ``LO:HI``: a continuous range, searched by ``--search cma`` (``values`` is then empty).
    bounds: tuple[float, float] | None = None


@dataclass(frozen=True)
class CandidateTask:
    """Everything a worker needs to merge and score one candidate (picklable for other processes)."""

    id: str
    settings: dict[str, Any]
    recipe_yaml: str
    out_dir: str
    evaluators: list[dict[str, Any]]


@dataclass
class CandidateResult:
    """A candidate's row of the results table; ``status`` is ``ok`` or ``failed`` (with ``error``)."""

    id: str
    settings: dict[str, Any]
    status: str
    score: float | None = None
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    merged: bool = False


def pick_score(metrics: dict[str, dict[str, Any]], metric: str | None) -> tuple[str, float]:
    """The metric a sweep ranks by: ``EVALUATOR.METRIC``, ``METRIC``, or the first numeric one."""
    for evaluator, scores in metrics.items():
        for name, value in scores.items():
            full = f"{evaluator}.{name}"
            if isinstance(value, (int, float)) and metric in (None, full, name):
                return full, float(value)
    wanted = f"metric '{metric}'" if metric else "a numeric metric"
    raise WorkbenchError(f"the evaluators returned no {wanted} (they returned {json.dumps(metrics)}).")


def merge_complete(out_dir: Path) -> bool:
    """Whether ``out_dir`` is a finished merge (its manifest says complete)."""
    from workbench.engine.manifest import Manifest

    try:
        return Manifest.read(out_dir).complete
    except (FileNotFoundError, WorkbenchError):
        return False


def run_one(
    task: CandidateTask, registry: Registry | None = None, metric: str | None = None
) -> CandidateResult:
    """Merge (unless already merged) and score one candidate; every error becomes a failed row."""
    from workbench.engine.manifest import record_published
    from workbench.engine.run import run_recipe
    from workbench.evaluation.running import RESULTS_FILE, evaluate_output
    from workbench.registry import get_registry

    start = time.perf_counter()
    out = Path(task.out_dir)
    merged = False
    try:
        registry = registry or get_registry()
        if not merge_complete(out):
            recipe = parse_recipe(task.recipe_yaml, f"candidate {task.id}")
            run_recipe(recipe, out=out, overwrite=True, registry=registry)
            merged = True
        specs = [EvaluatorSpec.model_validate(spec) for spec in task.evaluators]
        metrics = evaluate_output(specs, out, registry)
        record_published(out, out / RESULTS_FILE)
        _, score = pick_score(metrics, metric)
        return CandidateResult(
            task.id, task.settings, "ok", score, metrics, seconds=time.perf_counter() - start, merged=merged
        )
    except Exception as exc:  # a failed candidate must not stop the sweep: it is reported instead
        message = str(exc) if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"
        return CandidateResult(
            task.id,
            task.settings,
            "failed",
            error=message,
            seconds=time.perf_counter() - start,
            merged=merged,
        )
