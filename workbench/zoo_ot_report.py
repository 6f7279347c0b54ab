"""The optimal-transport fusion table of ``workbench zoo report``.

The zoo's OT pair are two models trained on one task from different random initialisations, so
their units sit in unrelated orders (Imfeld et al., 2024). Rows: each parent, the vanilla average,
and ``ot_fusion`` with weight-based and activation-based costs, hard (EMD) and soft (Sinkhorn)
alignment. Activation costs run on the task's validation split, disjoint from the scored test
split. Figures: exact-match accuracy and token accuracy (the share of answer tokens right), since
one-shot fusions often get many tokens right before they get whole answers right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.recipe import EvaluatorSpec
from workbench.registry import Registry
from workbench.zoo_report import Log, read_manifest, spread

#: label -> ot_fusion parameters (None: the vanilla average). reg: the paper's best per cost type.
FUSIONS: dict[str, dict[str, Any] | None] = {
    "vanilla average (linear)": None,
    "OT fusion, weights, EMD": {"solver": "emd", "cost": "weights"},
    "OT fusion, weights, Sinkhorn reg 0.06": {"solver": "sinkhorn", "reg": 0.06, "cost": "weights"},
    "OT fusion, activations, EMD": {"solver": "emd", "cost": "activations"},
    "OT fusion, activations, Sinkhorn reg 0.08": {"solver": "sinkhorn", "reg": 0.08, "cost": "activations"},
}
SAMPLES = 128  # validation sequences for the activation costs


@dataclass
class FusionResult:
    seed: Any
    task: str
    rows: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (accuracy, token accuracy)


def measure_fusions(zoo_dir: Path, registry: Registry, n: int, seed: int, log: Log) -> FusionResult:
    import tempfile

    from workbench.engine import run_recipe
    from workbench.evaluation import evaluate, make_evaluators
    from workbench.recipe import Recipe

    manifest = read_manifest(zoo_dir)
    task = manifest["ot"]["task"]
    parents = [str(zoo_dir / m) for m in manifest["ot"]["models"]]
    [evaluator] = make_evaluators([EvaluatorSpec(name=f"zoo_{task}", options={"n": n, "seed": seed})], registry)
    result = FusionResult(manifest.get("seed"), task)

    def score(model: Path | str) -> tuple[float, float]:
        scores = evaluate(model, [evaluator])[f"zoo_{task}"]
        return float(scores["accuracy"]), float(scores["token_accuracy"])

    for i, parent in enumerate(parents):
        result.rows[f"parent {i + 1} ({Path(parent).name})"] = score(parent)
    for label, params in FUSIONS.items():
        log(f"zoo seed {result.seed}: {label}")
        if params is None:
            recipe: dict[str, Any] = {"method": "linear", "models": parents}
        else:
            extra = {"data": {"evaluator": f"zoo_{task}"}, "samples": SAMPLES} if params["cost"] == "activations" else {}
            recipe = {"method": "ot_fusion", "models": parents, "parameters": {**params, **extra}}
        with tempfile.TemporaryDirectory(prefix="workbench-zoo-") as tmp:
            out = run_recipe(Recipe.model_validate(recipe), out=Path(tmp) / "fused", registry=registry).out_dir
            result.rows[label] = score(out)
    return result


def render_fusions(results: list[FusionResult]) -> list[str]:
    seeds = [r.seed for r in results]
    lines = [
        f"## Optimal-transport fusion: two models trained from different initialisations ({results[0].task})",
        "",
        f"Test-split exact-match accuracy / token accuracy on `{results[0].task}`; models[0] (parent 1) is the anchor.",
        f"Activation costs use {SAMPLES} sequences of the task's validation split. No fine-tuning after fusion.",
        "",
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | accuracy mean ± sd | token accuracy mean ± sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for label in results[0].rows:
        pairs = [r.rows[label] for r in results]
        cells = " | ".join(f"{a:.3f} / {t:.3f}" for a, t in pairs)
        lines.append(f"| {label} | {cells} | {spread([a for a, _ in pairs])} | {spread([t for _, t in pairs])} |")
    return lines

