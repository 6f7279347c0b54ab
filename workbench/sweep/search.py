"""Hyperparameter sweeps: merge and score candidate recipes, keep a resumable results table.

``workbench sweep`` and the Python API share this module; it has no UI. A sweep takes a recipe and
``--set PATH=V1,V2,...`` settings, builds candidate recipes (grid or seeded random sample of the
grid), merges each into ``<sweep>/candidates/<id>/`` and scores it with evaluators. After every
candidate ``results.json`` and ``results.csv`` are rewritten atomically, so a killed sweep resumes
where it stopped: candidates already scored are skipped, a finished merge is only re-scored.

Candidates run through :func:`workbench.sweep.backends.run_candidates`: here, in ``--jobs``
processes, or as Ray tasks (``executor="ray"``); it takes picklable
:class:`~workbench.sweep.candidates.CandidateTask` objects (see :mod:`workbench.sweep.candidates`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import RecipeError, WorkbenchError
from workbench.recipe.schema import (
    EvaluatorSpec,
    ModelEntry,
    Recipe,
    format_path,
    parse_recipe,
)
from workbench.registry import Registry
from workbench.sweep.backends import (
    check_cma,
    check_executor,
    cma_search,
    run_candidates,
)
from workbench.sweep.candidates import (
    CandidateResult,
    CandidateTask,
    Path_,
    Setting,
    pick_score,
    run_one,
)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
BEST_RECIPE = "best.yaml"
CANDIDATES = "candidates"
SEARCHES = ("grid", "random", "cma")
#: Metric names (or name endings) for which lower is better, per the evaluator contract.
LOWER_IS_BETTER = ("perplexity", "loss")

_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
RANGE = re.compile(_NUMBER + ":" + _NUMBER)


# --------------------------------------------------------------------------------------------------
# --set parsing and candidate generation
# --------------------------------------------------------------------------------------------------


def _split_path(label: str) -> Path_:
    parts = label.split(".")
    if not label or any(not p for p in parts):
        raise RecipeError(f"--set path '{label}' is empty or has an empty part.")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def parse_setting(text: str) -> Setting:
    """``parameters.lambda=0.3,0.5`` -> Setting; each value read as YAML (numbers, lists, text).

    Commas inside brackets belong to one value, so ``parameters.weight=[1,0],[0,1]`` is two values.
    ``parameters.lambda=0.1:1.5`` is a continuous range (for ``--search cma``).
    """
    label, sep, rest = text.partition("=")
    label = label.strip()
    if not sep or not rest.strip():
        raise RecipeError(f"--set '{text}' is not PATH=V1,V2,... (for example parameters.lambda=0.3,0.5).")
    span = RANGE.fullmatch(rest.strip())
    if span:
        low, high = float(span[1]), float(span[2])
        if not low < high:
            raise RecipeError(f"--set {label}: the range {rest.strip()} is empty (LO:HI needs LO < HI).")
        return Setting(label, _split_path(label), (), (low, high))
    values, depth, current = [], 0, ""
    for char in rest:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    try:
        parsed = tuple(yaml.safe_load(v) if v.strip() else None for v in values)
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {label}: a value is not valid YAML ({exc}).") from None
    return Setting(label, _split_path(label), parsed)


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (as it would be written), the space ``--set`` paths point into."""
    return yaml.safe_load(recipe.to_yaml())


def _known_keys(parent_path: Path_, registry: Registry, method: str) -> set[str] | None:
    """Keys a path may add under ``parent_path`` though the recipe leaves them out (defaults)."""
    from workbench.method import param_keys

    cls = registry.method(method)
    if parent_path == ("parameters",):
        return set(param_keys(cls.Parameters)) | set(param_keys(cls.ModelParameters))
    if len(parent_path) == 3 and parent_path[0] == "models" and parent_path[2] == "parameters":
        return set(param_keys(cls.ModelParameters))
    if parent_path == ():
        return {name for name in Recipe.model_fields if name != "source"}
    if len(parent_path) == 2 and parent_path[0] == "models":
        return set(ModelEntry.model_fields)
    return None


def check_path(data: dict[str, Any], setting: Setting, registry: Registry) -> None:
    """Refuse a path that does not lead into the recipe (before anything runs), naming it."""
    node: Any = data
    for depth, part in enumerate(setting.path):
        last = depth == len(setting.path) - 1
        where = format_path(setting.path[:depth]) if depth else "the recipe"
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(
                    f"--set {setting.label}: '{part}' is not an index of {where} (it has {len(node)} entries)."
                )
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(
                f"--set {setting.label}: {where} is a value, not a mapping or list, so '{part}' cannot be set in it."
            )
        known = _known_keys(setting.path[:depth], registry, str(data.get("method")))
        if known is not None and str(part) not in known:
            raise RecipeError(
                f"--set {setting.label}: '{part}' is not a known key of {where} (known: "
                f"{', '.join(sorted(known)) or 'none'})."
            )
        if part not in node:
            if last and known is not None:
                return
            raise RecipeError(f"--set {setting.label}: the recipe has no '{part}' in {where}.")
        node = node[part]


def apply_settings(data: dict[str, Any], paths: dict[str, Path_], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with each path set to its value."""
    out = json.loads(json.dumps(data))
    for label, value in values.items():
        node = out
        path = paths[label]
        for part in path[:-1]:
            if isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                node = node[part]
        node[path[-1]] = value
    return out


def candidate_id(settings: dict[str, Any]) -> str:
    """Short stable hash of a candidate's settings, so a rerun finds its folder and its row."""
    text = json.dumps(sorted(settings.items()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def grid(settings: list[Setting]) -> list[dict[str, Any]]:
    """Every combination of the settings' values, in order (first setting varies slowest)."""
    combos = itertools.product(*(s.values for s in settings))
    return [dict(zip((s.label for s in settings), combo)) for combo in combos]


def generate(settings: list[Setting], search: str, budget: int | None, seed: int) -> list[dict[str, Any]]:
    """The candidates' settings for a search mode; duplicates (equal settings) appear once."""
    if search not in SEARCHES:
        raise RecipeError(f"--search must be one of {', '.join(SEARCHES)}, got '{search}'.")
    if search == "cma":  # cma proposes candidates as it goes: see sweep_backends.cma_search
        check_cma(settings, budget)
        return []
    ranged = [s.label for s in settings if s.bounds]
    if ranged:
        raise RecipeError(
            f"--set {ranged[0]}: a range LO:HI is searched by --search cma; for {search} give values V1,V2,..."
        )
    unique: dict[str, dict[str, Any]] = {}
    for combo in grid(settings):
        unique.setdefault(candidate_id(combo), combo)
    combos = list(unique.values())
    if search == "random":
        if budget is None or budget < 1:
            raise RecipeError("--search random needs --budget N (N >= 1): how many candidates to sample.")
        if budget < len(combos):
            combos = random.Random(seed).sample(combos, budget)
    elif budget is not None and budget < len(combos):
        combos = combos[:budget]
    return combos


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def lower_is_better(metric: str) -> bool:
    """Per the evaluator contract: higher is better unless the name says perplexity or loss."""
    name = metric.rsplit(".", 1)[-1].lower()
    return any(name == word or name.endswith("_" + word) for word in LOWER_IS_BETTER)


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    directory: Path
    metric: str | None
    lower_is_better: bool
    rows: list[CandidateResult]
    best: CandidateResult | None
    best_recipe: Path | None
    #: Candidates run this time (the others were found in results.json).
    ran: list[str] = field(default_factory=list)


def _write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def sort_rows(rows: Iterable[CandidateResult], lower: bool) -> list[CandidateResult]:
    """Scored rows best first, failed rows last (in id order, so the table is stable)."""
    rows = list(rows)
    ok = [r for r in rows if r.status == "ok" and r.score is not None]
    failed = sorted((r for r in rows if r not in ok), key=lambda r: r.id)
    return sorted(ok, key=lambda r: (r.score if lower else -r.score, r.id)) + failed  # type: ignore[operator]


def _save(directory: Path, identity: dict[str, Any], rows: list[CandidateResult], lower: bool) -> None:
    ordered = sort_rows(rows, lower)
    _write_atomic(
        directory / RESULTS_JSON,
        json.dumps({"sweep": identity, "candidates": [asdict(r) for r in ordered]}, indent=1) + "\n",
    )
    labels = sorted({label for r in ordered for label in r.settings})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", *labels, "status", "score", "error", "seconds"])
    for r in ordered:
        writer.writerow(
            [
                r.id,
                *(json.dumps(r.settings.get(label)) for label in labels),
                r.status,
                r.score,
                r.error or "",
                f"{r.seconds:.2f}",
            ]
        )
    _write_atomic(directory / RESULTS_CSV, buffer.getvalue())


def _load(directory: Path, identity: dict[str, Any]) -> dict[str, CandidateResult]:
    path = directory / RESULTS_JSON
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        rows = [CandidateResult(**row) for row in data["candidates"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WorkbenchError(
            f"{path} is not a readable sweep results file ({exc}); remove it or choose another --out."
        ) from exc
    if data.get("sweep") != identity:
        raise WorkbenchError(
            f"{directory} holds a different sweep (the recipe, evaluators or metric changed); choose "
            "another --out or remove it."
        )
    return {row.id: row for row in rows if row.status == "ok"}


def _validate(data: dict[str, Any], registry: Registry, name: str) -> str:
    """The candidate's recipe text, after checking it like ``workbench validate`` (no tensor data read)."""
    from workbench.engine.plan import build_plan

    text = yaml.safe_dump(data, sort_keys=False)
    recipe = parse_recipe(text, name)
    build_plan(recipe, registry, check_output=False).close()
    return text


def run_sweep(
    recipe: Recipe,
    settings: list[Setting],
    evaluators: list[EvaluatorSpec],
    out: Path,
    registry: Registry,
    *,
    search: str = "grid",
    budget: int | None = None,
    seed: int = 0,
    jobs: int = 1,
    metric: str | None = None,
    keep_outputs: bool = False,
    executor: str = "local",
    address: str | None = None,
    on_result: Callable[[CandidateResult, int, int], None] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep in ``out``; see the module docstring. Paths and evaluators are
    checked before anything runs; a failing candidate becomes a failed row and the sweep goes on."""
    from workbench.evaluation.running import make_evaluators

    if not settings:
        raise RecipeError("a sweep needs at least one --set PATH=V1,V2,...")
    if not evaluators:
        raise RecipeError("a sweep needs at least one --evaluator to score the candidates by.")
    check_executor(executor, address)
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise RecipeError(
            f"--set names a path twice: {', '.join(sorted({label for label in labels if labels.count(label) > 1}))}."
        )
    make_evaluators(evaluators, registry)  # unknown evaluators or options fail now, not per candidate
    data = recipe_data(recipe)
    data.pop("evaluators", None)  # the sweep scores candidates itself
    for setting in settings:
        check_path(data, setting, registry)
    lower = lower_is_better(metric) if metric else False
    combos = generate(settings, search, budget, seed)
    identity: dict[str, Any] = {
        "recipe": hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16],
        "evaluators": [spec.model_dump(mode="json") for spec in evaluators],
        "metric": metric,
    }
    out.mkdir(parents=True, exist_ok=True)
    done = _load(out, identity)
    rows: dict[str, CandidateResult] = dict(done)
    paths = {s.label: s.path for s in settings}
    wanted: dict[str, None] = {}  # the candidates of this sweep, in the order they were proposed
    total = (budget or 0) if search == "cma" else len({candidate_id(c) for c in combos})
    ran: list[str] = []
    if metric is None and done:  # the metric, and so the direction, of the earlier run
        metric, _ = pick_score(next(iter(done.values())).metrics, None)
        lower = lower_is_better(metric)

    def report(row: CandidateResult) -> None:
        if on_result:
            on_result(row, sum(i in rows for i in wanted), total)

    def run_batch(batch: list[dict[str, Any]]) -> list[CandidateResult]:
        """Merge and score the batch's new candidates (others are found in ``rows``), saving as they finish."""
        nonlocal metric, lower
        tasks: list[CandidateTask] = []
        for combo in batch:
            cid = candidate_id(combo)
            if cid in wanted:
                continue
            wanted[cid] = None
            if cid in done:
                continue
            try:
                text = _validate(apply_settings(data, paths, combo), registry, f"candidate {cid}")
            except WorkbenchError as exc:
                rows[cid] = CandidateResult(cid, combo, "failed", error=str(exc))
                report(rows[cid])
                continue
            tasks.append(CandidateTask(cid, combo, text, str(out / CANDIDATES / cid), identity["evaluators"]))
        _save(out, identity, list(rows.values()), lower)
        chosen = metric  # what workers rank by; with None each picks the first numeric metric, as here

        def run_here(task: CandidateTask) -> CandidateResult:
            return run_one(task, registry, chosen)

        for result in run_candidates(tasks, run_here, jobs, chosen, executor=executor, address=address):
            ran.append(result.id)
            if result.status == "ok" and metric is None:
                metric, _ = pick_score(result.metrics, None)
                lower = lower_is_better(metric)
            rows[result.id] = result
            _save(out, identity, list(rows.values()), lower)
            report(result)
        return [rows[candidate_id(combo)] for combo in batch]

    if search == "cma":
        cma_search(
            settings,
            budget or 0,
            seed,
            lambda batch: [
                None if r.score is None else -r.score if lower else r.score for r in run_batch(batch)
            ],
        )
    else:
        run_batch(combos)
    ordered = sort_rows((rows[i] for i in wanted), lower)
    best = ordered[0] if ordered and ordered[0].status == "ok" else None
    best_path = None
    if best is not None:
        best_path = out / BEST_RECIPE
        _write_atomic(best_path, yaml.safe_dump(apply_settings(data, paths, best.settings), sort_keys=False))
    if not keep_outputs:  # only the best merge is kept: candidates' folders are full models
        for row in ordered:
            if best is None or row.id != best.id:
                shutil.rmtree(out / CANDIDATES / row.id, ignore_errors=True)
    return SweepResult(out, metric, lower, ordered, best, best_path, ran)
