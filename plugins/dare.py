"""DARE (drop and rescale): drop task-vector entries at random, rescale, then sum or use TIES consensus."""

from __future__ import annotations

from collections.abc import Callable

from workbench import hookimpl
from workbench.method import MergeMethod, Param
from workbench_plugins._task_vectors import RESCALE, ConsensusParameters, DensityModelParameters, LinearParameters, TaskVectorMethod


class DareLinearParameters(LinearParameters):
    rescale: bool = Param(True, description=RESCALE, per_layer=False)


class DareTiesParameters(ConsensusParameters):
    rescale: bool = Param(True, description=RESCALE, per_layer=False)


class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    summary = "DARE: drop each task-vector entry with probability 1 - density, rescale, add the weighted sum to the base."
    paper = "https://arxiv.org/abs/2311.03099"
    Parameters = DareLinearParameters
    ModelParameters = DensityModelParameters
    sparsification = "random"
    consensus = False


class DareTies(TaskVectorMethod):
    name = "dare_ties"
    summary = "DARE + TIES: drop task-vector entries at random, rescale, then merge with TIES sign consensus."
    paper = "https://arxiv.org/abs/2311.03099"
    Parameters = DareTiesParameters
    ModelParameters = DensityModelParameters
    sparsification = "random"
    consensus = True


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(DareLinear)
    register(DareTies)
