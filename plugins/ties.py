"""TIES-Merging: trim each task vector to its largest entries, elect signs, merge what agrees."""

from __future__ import annotations

from collections.abc import Callable

from workbench import hookimpl
from workbench.method import MergeMethod, Param
from workbench_plugins._task_vectors import NORMALIZE_CONSENSUS, ConsensusParameters, DensityModelParameters, TaskVectorMethod


class TiesParameters(ConsensusParameters):
    normalize: bool = Param(True, description=NORMALIZE_CONSENSUS, per_layer=False)


class Ties(TaskVectorMethod):
    name = "ties"
    summary = "TIES: keep each task vector's top-density entries by magnitude, elect signs by mass, average the agreeing entries."
    paper = "https://arxiv.org/abs/2306.01708"
    Parameters = TiesParameters
    ModelParameters = DensityModelParameters
    sparsification = "magnitude"
    consensus = True


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Ties)
