"""Running evaluators: on a model folder (``workbench eval``) or on a merge's output (a recipe's
``evaluators``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import RecipeError
from workbench.evaluator import Evaluator, LoadedModel, load_model
from workbench.recipe.schema import EvaluatorSpec
from workbench.registry import Registry

Results = dict[str, dict[str, float | str]]
#: Written into a merge's output folder when its recipe names evaluators.
RESULTS_FILE = "eval_results.json"


def make_evaluators(specs: Iterable[EvaluatorSpec], registry: Registry) -> list[Evaluator]:
    """Evaluator instances with validated options; errors name the evaluator and the option."""
    return [registry.make_evaluator(spec.name, spec.options) for spec in specs]


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["n=64", "text=notes.txt"]`` -> ``{"n": 64, "text": "notes.txt"}`` (values read as YAML)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"evaluator option '{pair}' is not KEY=VALUE.")
        options[key.strip()] = yaml.safe_load(value)
    return options


def evaluator_specs(registry: Registry, names: Iterable[str], pairs: Iterable[str]) -> list[EvaluatorSpec]:
    """``-e NAME ... -o KEY=VALUE ...`` as evaluator specs: each option goes to the evaluators that
    have it; an option none of them has is refused (a typo would otherwise be ignored)."""
    given = parse_options(pairs)
    specs, known = [], set()
    for name in names:
        fields = registry.evaluator(name).Options.model_fields
        known |= set(fields)
        specs.append(EvaluatorSpec(name=name, options={k: v for k, v in given.items() if k in fields}))
    unused = set(given) - known
    if unused:
        raise RecipeError(f"no chosen evaluator has option(s) {', '.join(sorted(unused))}.")
    return specs


def evaluate(model: LoadedModel | str | Path, evaluators: list[Evaluator]) -> Results:
    """Score one model with every evaluator (each checks that it can score it first)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    results: Results = {}
    for evaluator in evaluators:
        evaluator.check(loaded)
        results[evaluator.name] = evaluator.evaluate(loaded)
    return results


def evaluate_output(specs: list[EvaluatorSpec], out_dir: Path, registry: Registry) -> Results:
    """Score a merge's output with the recipe's evaluators and keep the scores beside it."""
    import json

    results = evaluate(out_dir, make_evaluators(specs, registry))
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results
