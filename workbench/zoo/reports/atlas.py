"""The learned-coefficients table of ``workbench zoo report`` (aTLAS and AdaMerging in miniature).

On the zoo's four task experts, mean normalised test accuracy of: task arithmetic and TIES with λ
chosen on the validation split (as in the task-vector table); AdaMerging-style coefficients (one
per task vector and layer, entropy of the predictions on the validation inputs, no labels) from
AdaMerging's start λ = 0.3 and from task arithmetic's chosen λ; and aTLAS (one coefficient per
task vector and tensor, cross-entropy, from 0) trained on 1%, 10% and 100% of the validation
examples. The learned methods see the validation split only, as λ's selection does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workbench.zoo.reports.common import Log, Scored, ZooScorer, spread
from workbench.zoo.reports.task_vectors import METHODS, GridMethod, ZooResult, measure_zoo

#: Every learned row: AdamW steps and learning rate. The papers train for thousands of steps at
#: 1e-3; 300 steps at 1e-2 let the coefficients travel as far on two CPU cores.
STEPS, LR = 300, 1e-2
SHARES = (0.01, 0.1, 1.0)
GRID_METHODS = METHODS[:2]  # task arithmetic, TIES


@dataclass
class LearnedResult:
    zoo: ZooResult  # base, experts and the λ grids of the baselines
    rows: dict[str, Scored] = field(default_factory=dict)  # label (the same on every zoo) -> scores
    values: dict[str, str] = field(default_factory=dict)  # label -> what was chosen on this zoo ("λ = 0.7")


def measure_learned(
    scorer: ZooScorer,
    n: int,
    seed: int,
    log: Log,
    steps: int = STEPS,
    baselines: tuple[GridMethod, ...] = GRID_METHODS,
) -> LearnedResult:
    """Every row on one zoo; ``steps`` and ``baselines`` (task arithmetic first) shorten it for tests."""
    zoo = measure_zoo(scorer, baselines, log)
    result = LearnedResult(zoo)
    for method in baselines:
        value, scored = zoo.chosen(method.label)
        label = f"{method.label}, {method.knob} chosen on validation"
        result.rows[label], result.values[label] = scored, f"{method.knob} = {value}"
    ta_lambda = zoo.chosen(baselines[0].label)[0]

    def learned(label: str, samples: int, parameters: dict[str, Any]) -> None:
        log(f"zoo seed {zoo.manifest.get('seed')}: {label}")
        recipe = {
            "method": "atlas",
            "base": scorer.base,
            "seed": seed,  # the evaluators' seed: the data are the validation examples
            "models": [
                {"model": expert, "parameters": {"data": {"evaluator": f"zoo_{task}"}}}
                for task, expert in zip(scorer.tasks, scorer.experts)
            ],
            "parameters": {"steps": steps, "lr": LR, "samples": samples, **parameters},
        }
        result.rows[label] = scorer.merge_and_score(recipe)

    learned(
        "AdaMerging-style: entropy, per layer, from λ = 0.3 (AdaMerging's), no labels",
        n,
        {"objective": "entropy", "blocks": "layer", "init": 0.3},
    )
    warm = "AdaMerging-style: entropy, per layer, from task arithmetic's chosen λ, no labels"
    learned(warm, n, {"objective": "entropy", "blocks": "layer", "init": ta_lambda})
    result.values[warm] = f"from {ta_lambda}"
    for share in SHARES:
        samples = max(1, round(share * n))
        learned(
            f"aTLAS: cross-entropy, per tensor, from 0, {share:.0%} of validation ({samples} per task)",
            samples,
            {"init": 0.0},
        )
    return result


def render_learned(results: list[LearnedResult], n: int) -> list[str]:
    first = results[0]
    tasks = first.zoo.tasks
    seeds = [r.zoo.manifest.get("seed") for r in results]
    lines = [
        "## Learned coefficients: aTLAS and AdaMerging-style, against tuned task arithmetic and TIES",
        "",
        "Mean normalised test accuracy on the four task experts' tasks. The learned rows run `atlas` for "
        f"{STEPS} AdamW steps",
        f"(learning rate {LR}, weight decay 0.1, 16 sequences per task per step, 20% of the data held out "
        "to keep the best",
        f"step) on the validation examples that choose λ for the baselines ({n} per task at 100%); "
        "AdaMerging-style rows read",
        "their inputs only, never the answers.",
        "",
        "| method | " + " | ".join(f"zoo seed {s}" for s in seeds) + " | mean ± sd over seeds |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for label in first.rows:
        values = [r.zoo.normalised(r.rows[label].test, "test") for r in results]
        cells = [
            f"{v:.3f}" + (f" ({r.values[label]})" if label in r.values else "")
            for v, r in zip(values, results)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {spread(values)} |")
    lines += [
        "",
        f"### Per task, zoo seed {seeds[0]} (test split accuracy)",
        "",
        "| model | " + " | ".join(tasks) + " | mean accuracy |",
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for label, scored in first.rows.items():
        chosen = f" ({first.values[label]})" if label in first.values else ""
        lines.append(
            f"| {label}{chosen} | "
            + " | ".join(f"{scored.test[t]:.3f}" for t in tasks)
            + f" | {sum(scored.test.values()) / len(tasks):.3f} |"
        )
    return lines
