"""The layer-swapping table of ``workbench zoo report``: arithmetic posed in language B.

The zoo's cipher-language setup miniaturises Bandarkar et al. (2024): a math expert fine-tuned on
arithmetic in language A, a language expert fine-tuned on generic text in language B (a bijective
re-mapping of A), both from one base; the target is arithmetic posed and answered in B, which no
model was trained on. Rows: the inputs, the usual merges of the two experts, and layer swaps
(the language expert's bottom and top layers around the math expert's middle ones). The swap
configuration is also chosen on the validation split, like the other methods' hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.registry import Registry
from workbench.zoo.reports.common import Log, Scored, ZooScorer, spread

TASKS = ["math_b", "math", "text_b"]  # the target, then the two skills it combines
TARGET = "math_b"


def swap_configs(layers: int) -> dict[str, dict[str, Any]]:
    """Label -> layer_swap parameters: one or two outer layers each side, and a blended transition."""
    configs: dict[str, dict[str, Any]] = {
        "bottom 1, top 1": {"bottom": 1, "top": 1},
        "bottom 2, top 1": {"bottom": 2, "top": 1},
        "bottom 1, top 2": {"bottom": 1, "top": 2},
        "bottom 2, top 2": {"bottom": 2, "top": 2},
        "bottom 1, top 1, transitions 1 + 1 at 0.5": {
            "bottom": 1,
            "top": 1,
            "transition_bottom": 1,
            "transition_top": 1,
        },
        "bottom 1, top 1, non-layer tensors from the language expert": {
            "bottom": 1,
            "top": 1,
            "non_layer": "language",
        },
    }
    return {
        label: p
        for label, p in configs.items()
        if p["bottom"] + p["top"] + p.get("transition_bottom", 0) + p.get("transition_top", 0) < layers
    }


@dataclass
class SwapResult:
    seed: Any
    layers: int
    rows: dict[str, Scored] = field(default_factory=dict)  # label -> scores (inputs, merges, swaps)
    swaps: list[str] = field(default_factory=list)  # the labels of the layer-swap rows

    def chosen_swap(self) -> str:
        """The swap configuration with the best validation accuracy on the target (first on a tie)."""
        return max(
            self.swaps, key=lambda label: (self.rows[label].validation[TARGET], -self.swaps.index(label))
        )


def measure_swaps(zoo_dir: Path, registry: Registry, n: int, seed: int, log: Log) -> SwapResult:
    scorer = ZooScorer(zoo_dir, registry, n, seed, tasks=TASKS)
    manifest = scorer.manifest
    base, math, language = (scorer.path(manifest[key]) for key in ("base", "math", "language"))
    result = SwapResult(manifest.get("seed"), int(manifest["shape"]["num_hidden_layers"]))
    log(f"zoo seed {result.seed}: scoring the base, the math expert and the language expert")
    result.rows["base"] = scorer.score(base)
    result.rows["math expert"] = scorer.score(math)
    result.rows["language expert"] = scorer.score(language)
    merges: dict[str, dict[str, Any]] = {
        "uniform average (linear)": {"method": "linear", "models": [math, language]},
        "task arithmetic, λ = 1": {"method": "task_arithmetic", "base": base, "models": [math, language]},
        "TIES, k = 20%, λ = 1": {
            "method": "ties",
            "base": base,
            "models": [{"model": m, "parameters": {"density": 0.2}} for m in (math, language)],
        },
    }
    for label, params in swap_configs(result.layers).items():
        merges[f"layer swap, {label}"] = {
            "method": "layer_swap",
            "models": [
                {"model": math, "parameters": {"role": "task"}},
                {"model": language, "parameters": {"role": "language"}},
            ],
            "parameters": params,
        }
        result.swaps.append(f"layer swap, {label}")
    for label, recipe in merges.items():
        log(f"zoo seed {result.seed}: {label}")
        result.rows[label] = scorer.merge_and_score(recipe)
    return result


def render_swaps(results: list[SwapResult]) -> list[str]:
    seeds = [r.seed for r in results]
    layers = sorted({r.layers for r in results})
    header = (
        "| model | "
        + " | ".join(f"seed {s}: math_b / math / text_b" for s in seeds)
        + " | math_b mean ± sd |"
    )
    lines = [
        "## Layer swapping: arithmetic posed in language B",
        "",
        "Test-split accuracy of arithmetic posed and answered in language B (`math_b`, the target), "
        "arithmetic in A (`math`) and",
        f"next-word accuracy on text in B (`text_b`); the zoo models have {', '.join(map(str, layers))} "
        "layers. The last row takes,",
        "per zoo, the swap configuration with the best `math_b` accuracy on the validation split.",
        "",
        header,
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for label in results[0].rows:
        cells = [" / ".join(f"{r.rows[label].test[t]:.3f}" for t in TASKS) for r in results]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {spread([r.rows[label].test[TARGET] for r in results])} |"
        )
    chosen = [r.chosen_swap() for r in results]
    cells = [
        f"{r.rows[c].test[TARGET]:.3f} ({c.removeprefix('layer swap, ')})" for r, c in zip(results, chosen)
    ]
    lines.append(
        "| layer swap, chosen on validation | "
        + " | ".join(cells)
        + f" | {spread([r.rows[c].test[TARGET] for r, c in zip(results, chosen)])} |"
    )
    return lines
