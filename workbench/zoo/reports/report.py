"""``workbench zoo report``: the miniature counterparts of the papers' headline tables.

Every number is measured on zoos built by ``workbench zoo build``: each row is a model (an input
of the zoo, or a merge made by running a recipe through the engine) scored by the zoo's task
evaluators. This module assembles the report from its sections (``SECTIONS``): the task-vector
methods (``task_vectors``), learned coefficients (``atlas``), layer swapping (``layer_swap``), OT
fusion (``ot_fusion``) and layer-wise LoRA experts (``mola``); what they share is in ``common``.
"""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.registry import Registry
from workbench.zoo.reports.atlas import measure_learned, render_learned
from workbench.zoo.reports.common import Log, ZooScorer
from workbench.zoo.reports.layer_swap import measure_swaps, render_swaps
from workbench.zoo.reports.mola import measure_mola, mola_note, render_mola
from workbench.zoo.reports.ot_fusion import measure_fusions, render_fusions
from workbench.zoo.reports.task_vectors import METHODS, GridMethod, measure_zoo, render

SECTIONS = ("task_vectors", "learned", "layer_swap", "ot_fusion", "lora_experts")


def write_report(
    zoo_dirs: list[Path],
    out_file: Path,
    registry: Registry,
    n: int,
    seed: int,
    command: str,
    log: Log = print,
    methods: tuple[GridMethod, ...] = METHODS,
    sections: tuple[str, ...] = SECTIONS,
) -> str:
    """Measure every zoo (all are checked first, so a typo fails before any work) and write the
    report (the chosen sections only, in the usual order)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise WorkbenchError(
            f"unknown report section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}."
        )
    scorers = [ZooScorer(zoo_dir, registry, n, seed) for zoo_dir in zoo_dirs]
    tasks = {tuple(s.tasks) for s in scorers}
    if len(tasks) > 1:
        raise WorkbenchError(
            f"the zoos have different task experts ({sorted(tasks)}); build them with the same workbench version."
        )
    parts = []
    if "task_vectors" in sections:
        parts.append(
            render([measure_zoo(scorer, methods, log) for scorer in scorers], methods, command, n, seed)
        )
    if "learned" in sections:
        parts.append(
            "\n".join(render_learned([measure_learned(scorer, n, seed, log) for scorer in scorers], n))
        )
    if "layer_swap" in sections:
        parts.append(
            "\n".join(render_swaps([measure_swaps(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs]))
        )
    if "ot_fusion" in sections:
        parts.append(
            "\n".join(
                render_fusions([measure_fusions(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs])
            )
        )
    if "lora_experts" in sections:
        parts.append(
            "\n".join(
                render_mola(
                    [measure_mola(zoo_dir, registry, n, seed, log) for zoo_dir in zoo_dirs],
                    mola_note(zoo_dirs[0]),
                )
            )
        )
    text = "\n".join(parts) + "\n"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    return text
