"""TIES-Merging: trim each task vector to its largest entries, elect signs, merge what agrees."""

from __future__ import annotations

from collections.abc import Callable

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param
from workbench_plugins.methods._task_vectors import (
    NORMALIZE_CONSENSUS,
    ConsensusParameters,
    DensityModelParameters,
    TaskVectorMethod,
)


class TiesParameters(ConsensusParameters):
    normalize: bool = Param(True, description=NORMALIZE_CONSENSUS, per_layer=False)


class Ties(TaskVectorMethod):
    name = "ties"
    summary = (
        "TIES: keep each task vector's top-density entries by "
        "magnitude, elect signs by mass, average the agreeing entries."
    )
    paper = "https://arxiv.org/abs/2306.01708"
    when_to_use = (
        "Merging several fine-tunes whose task vectors interfere: trimming drops small, redundant updates "
        "and the sign election stops opposing updates from cancelling. The paper keeps 20% "
        "(density: 0.2) with lambda around 1 (searched 0.8-2.5 with validation data); density defaults "
        "to 1, as in mergekit. scope: model takes the paper's single threshold over the whole model. "
        "Exact semantics: [methods.md](../methods.md#ties)."
    )
    Parameters = TiesParameters
    ModelParameters = DensityModelParameters
    sparsification = "magnitude"
    consensus = True


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Ties)
