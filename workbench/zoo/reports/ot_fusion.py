"""The optimal-transport fusion table of ``workbench zoo report``.

The zoo's OT pair are two models trained on one task from different random initialisations, so
their units sit in unrelated orders (Imfeld et al., 2024). Rows: each parent, the vanilla average,
and ``ot_fusion`` with weight-based and activation-based costs, hard (EMD) and soft (Sinkhorn)
alignment, one shared residual map or the paper's residual policies. Activation costs run on the
task's validation split, disjoint from the scored test split. Figures: exact-match accuracy and
token accuracy (the share of answer tokens right), since one-shot fusions often get many tokens
right before they get whole answers right; then the same after a short fine-tune of every row,
which the paper found to favour OT fusion over averaging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.recipe.schema import EvaluatorSpec
from workbench.registry import Registry
from workbench.zoo.reports.common import Log, read_manifest, spread

#: label -> ot_fusion parameters (None: the vanilla average). reg: the paper's best per cost type.
FUSIONS: dict[str, dict[str, Any] | None] = {
    "vanilla average (linear)": None,
    "OT fusion, weights, EMD": {"solver": "emd", "cost": "weights"},
    "OT fusion, weights, Sinkhorn reg 0.06": {"solver": "sinkhorn", "reg": 0.06, "cost": "weights"},
    "OT fusion, activations, EMD": {"solver": "emd", "cost": "activations"},
    "OT fusion, activations, Sinkhorn reg 0.08": {"solver": "sinkhorn", "reg": 0.08, "cost": "activations"},
    # The paper's residual policies (the rows above keep one shared residual map)
    "OT fusion, weights, Sinkhorn 0.06, resid mean": {
        "solver": "sinkhorn",
        "reg": 0.06,
        "cost": "weights",
        "resid_policy": "mean",
    },
    **{
        f"OT fusion, activations, Sinkhorn 0.08, resid {policy}": {
            "solver": "sinkhorn",
            "reg": 0.08,
            "cost": "activations",
            "resid_policy": policy,
        }
        for policy in ("only_resid", "no_resid", "mean", "weighted_scalar", "weighted_matrix")
    },
}
SAMPLES = 128  # validation sequences for the activation costs
#: The short fine-tune after fusion (the paper's second experiment): a few steps of the zoo's batch
#: size on the task's training split, the same for every row.
FINETUNE_STEPS, FINETUNE_LR, FINETUNE_SEED = 10, 5e-4, 7


@dataclass
class FusionResult:
    seed: Any
    task: str
    rows: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (accuracy, token accuracy)
    tuned: dict[str, tuple[float, float]] = field(default_factory=dict)  # the same after the short fine-tune


def measure_fusions(zoo_dir: Path, registry: Registry, n: int, seed: int, log: Log) -> FusionResult:
    import tempfile

    from workbench.engine.run import run_recipe
    from workbench.evaluation.running import evaluate, make_evaluators
    from workbench.recipe.schema import Recipe

    manifest = read_manifest(zoo_dir)
    task = manifest["ot"]["task"]
    parents = [str(zoo_dir / m) for m in manifest["ot"]["models"]]
    [evaluator] = make_evaluators(
        [EvaluatorSpec(name=f"zoo_{task}", options={"n": n, "seed": seed})], registry
    )
    result = FusionResult(manifest.get("seed"), task)

    def score(label: str, model: Path | str) -> None:
        scores = evaluate(model, [evaluator])[f"zoo_{task}"]
        result.rows[label] = float(scores["accuracy"]), float(scores["token_accuracy"])
        result.tuned[label] = finetuned_scores(Path(model), task, manifest["scale"], n, seed)

    for i, parent in enumerate(parents):
        score(f"parent {i + 1} ({Path(parent).name})", parent)
    for label, params in FUSIONS.items():
        log(f"zoo seed {result.seed}: {label}")
        if params is None:
            recipe: dict[str, Any] = {"method": "linear", "models": parents}
        else:
            extra = (
                {"data": {"evaluator": f"zoo_{task}"}, "samples": SAMPLES}
                if params["cost"] == "activations"
                else {}
            )
            recipe = {"method": "ot_fusion", "models": parents, "parameters": {**params, **extra}}
        with tempfile.TemporaryDirectory(prefix="workbench-zoo-") as tmp:
            score(
                label,
                run_recipe(Recipe.model_validate(recipe), out=Path(tmp) / "fused", registry=registry).out_dir,
            )
    return result


def finetuned_scores(model: Path, task: str, scale: str, n: int, seed: int) -> tuple[float, float]:
    """(accuracy, token accuracy) on the test split after FINETUNE_STEPS steps on the task."""
    from workbench.modeling.training import train as train_module
    from workbench.zoo import tasks, train
    from workbench.zoo.model import SCALES, load

    module = load(model)
    batches = train.mixture([(task, 1.0)], SCALES[scale].batch_size, FINETUNE_SEED)
    train_module(module, batches, FINETUNE_STEPS, FINETUNE_LR, seed=FINETUNE_SEED)
    scores = tasks.score(module, task, n, seed, split="test")
    return float(scores["accuracy"]), float(scores["token_accuracy"])


def render_fusions(results: list[FusionResult]) -> list[str]:
    task = results[0].task
    lines = [
        f"## Optimal-transport fusion: two models trained from different initialisations ({task})",
        "",
        f"Test-split exact-match accuracy / token accuracy on `{task}`; models[0] (parent 1) is the anchor.",
        f"Activation costs use {SAMPLES} sequences of the task's validation split. First as fused (one shot), then",
        f"after a short fine-tune of every row alike: {FINETUNE_STEPS} steps on the task's training split, "
        f"learning rate {FINETUNE_LR}.",
        "",
        "### One shot",
        "",
        *_table(results, lambda r: r.rows),
        "",
        f"### After {FINETUNE_STEPS} fine-tuning steps",
        "",
        *_table(results, lambda r: r.tuned),
    ]
    return lines


def _table(
    results: list[FusionResult], rows: Callable[[FusionResult], dict[str, tuple[float, float]]]
) -> list[str]:
    seeds = [r.seed for r in results]
    lines = [
        "| model | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | accuracy mean ± sd | token accuracy mean ± sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for label in rows(results[0]):
        pairs = [rows(r)[label] for r in results]
        cells = " | ".join(f"{a:.3f} / {t:.3f}" for a, t in pairs)
        lines.append(
            f"| {label} | {cells} | {spread([a for a, _ in pairs])} | {spread([t for _, t in pairs])} |"
        )
    return lines
