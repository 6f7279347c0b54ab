"""The LoRA-experts table of ``workbench zoo report`` (MoLA, Gao et al. 2024, in miniature).

Multi-task accuracy on the zoo's LoRA tasks (subject, object, count; test split) of: the base; each
task's LoRA adapter; the linear merge of the three adapters (mean ΔW, ``workbench lora merge``);
``lora_experts`` built from the three adapters (every adapter in every layer, top-2, routers from
each task's validation prompts); and MoLA trained from scratch on the three tasks with 2-4-6-8,
8-6-4-2 and 5-5-5-5 experts per group of layers, the same number of experts in total. Every
adapter and expert has rank 8 and alpha 16, on all seven projections. Parameters: what each row
adds to the base (LoRA factors, and routers).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.recipe.schema import EvaluatorSpec
from workbench.registry import Registry
from workbench.zoo.reports.common import Log, read_manifest, spread

ALLOCATIONS = ("2-4-6-8", "8-6-4-2", "5-5-5-5")
#: MoLA training: the three tasks mixed, with the same pretraining replay as the zoo's adapters
#: (every 4th step), for as many steps as the three adapters took together, at their learning rate.
MOLA_LR, MOLA_SEED = 3e-3, 5


@dataclass
class MolaResult:
    seed: Any
    tasks: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> task -> accuracy
    parameters: dict[str, int] = field(default_factory=dict)


def _adapter_parameters(folder: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def measure_mola(
    zoo_dir: Path, registry: Registry, n: int, seed: int, log: Log, steps: int | None = None
) -> MolaResult:
    """The table's rows on one zoo; ``steps`` overrides MoLA's training length (tests)."""
    import json

    from workbench.engine.run import run_recipe
    from workbench.evaluation.running import evaluate, make_evaluators
    from workbench.lora.merge import merge_loras
    from workbench.lora.mola_train import train_mola
    from workbench.recipe.schema import Recipe
    from workbench.zoo import train
    from workbench.zoo.build import REPLAY_EVERY, REPLAY_MIX
    from workbench.zoo.model import SCALES

    manifest = read_manifest(zoo_dir)
    adapters = {task: zoo_dir / folder for task, folder in manifest["lora"].items()}
    tasks = list(adapters)
    evaluators = make_evaluators(
        [EvaluatorSpec(name=f"zoo_{t}", options={"n": n, "seed": seed, "split": "test"}) for t in tasks],
        registry,
    )
    result = MolaResult(manifest.get("seed"), tasks)

    def score(label: str, model: Path | str, parameters: int) -> None:
        log(f"zoo seed {result.seed}: {label}")
        scores = evaluate(model, evaluators)
        result.rows[label] = {t: float(scores[f"zoo_{t}"]["accuracy"]) for t in tasks}
        result.parameters[label] = parameters

    base = zoo_dir / "base"
    score("base", base, 0)
    for task, folder in adapters.items():
        score(f"LoRA {task}", f"{base}+{folder}", _adapter_parameters(folder))
    all_adapters = sum(_adapter_parameters(folder) for folder in adapters.values())
    with tempfile.TemporaryDirectory(prefix="workbench-zoo-mola-") as tmp:
        merged = merge_loras(list(adapters.values()), Path(tmp) / "linear", registry, "linear")
        score(
            "linear merge of the LoRAs (mean ΔW)",
            f"{base}+{merged.out_dir}",
            _adapter_parameters(merged.out_dir),
        )
        recipe = {
            "method": "lora_experts",
            "base": str(base),
            "models": [
                {"model": str(folder), "parameters": {"data": {"evaluator": f"zoo_{task}"}}}
                for task, folder in adapters.items()
            ],
            "parameters": {"allocation": "uniform", "top_k": 2, "router": "prompts"},
        }
        out = run_recipe(Recipe.model_validate(recipe), out=Path(tmp) / "experts", registry=registry).out_dir
        routers = json.loads((out / "mola" / "mola_config.json").read_text())["parameters"] - all_adapters
        score(
            "lora_experts from the LoRAs (uniform, top-2, routers from prompts)", out, all_adapters + routers
        )
        scale = SCALES[manifest["scale"]]
        steps = steps or scale.lora_steps * len(tasks)  # mola_note says the same
        for allocation in ALLOCATIONS:
            batches = train.mixture([(t, 1.0) for t in tasks], scale.batch_size, MOLA_SEED)
            batches = train.interleave(
                batches, train.mixture(REPLAY_MIX, scale.batch_size, MOLA_SEED + 1), REPLAY_EVERY
            )
            log(f"zoo seed {result.seed}: training MoLA {allocation} ({steps} steps)")
            trained = train_mola(
                base,
                Path(tmp) / f"mola-{allocation}",
                batches,
                allocation,
                steps=steps,
                lr=MOLA_LR,
                rank=scale.lora_rank,
                seed=MOLA_SEED,
            )
            counts = "-".join(str(c) for c in trained.experts_per_layer)
            score(
                f"MoLA {allocation} trained (per layer {counts}, top-2)", trained.out_dir, trained.parameters
            )
    return result


def mola_note(zoo_dir: Path) -> str:
    from workbench.zoo.build import REPLAY_EVERY
    from workbench.zoo.model import SCALES

    scale = SCALES[read_manifest(zoo_dir)["scale"]]
    return (
        f"MoLA trains every expert and router together for {3 * scale.lora_steps} steps of "
        f"{scale.batch_size} sequences (as many as the three adapters took together) at learning rate "
        f"{MOLA_LR}, with pretraining replay every {REPLAY_EVERY}th step as the adapters had; experts and "
        f"adapters have rank {scale.lora_rank}, alpha 16."
    )


def render_mola(results: list[MolaResult], steps_note: str) -> list[str]:
    tasks = results[0].tasks
    seeds = [r.seed for r in results]
    lines = [
        "## Layer-wise LoRA experts (MoLA): three tasks, one model",
        "",
        f"Test-split exact-match accuracy on {', '.join(f'`{t}`' for t in tasks)}; the per-task columns are "
        f"zoo seed {seeds[0]},",
        "the last columns the mean over the three tasks per zoo seed and its mean ± sd over seeds. "
        "Parameters: what the row",
        f"adds to the base (zoo seed {seeds[0]}). {steps_note}",
        "",
        "| model | "
        + " | ".join(tasks)
        + " | "
        + " | ".join(f"mean, seed {s}" for s in seeds)
        + " | mean ± sd | parameters |",
        "|---|" + "---|" * (len(tasks) + len(seeds) + 2),
    ]
    for label in results[0].rows:
        first = results[0].rows[label]
        means = [sum(r.rows[label].values()) / len(tasks) for r in results]
        lines.append(
            f"| {label} | "
            + " | ".join(f"{first[t]:.3f}" for t in tasks)
            + " | "
            + " | ".join(f"{m:.3f}" for m in means)
            + f" | {spread(means)} | {results[0].parameters[label]:,} |"
        )
    return lines
