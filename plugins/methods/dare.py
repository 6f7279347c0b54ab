"""DARE (drop and rescale): drop task-vector entries at random, rescale, then sum or use TIES consensus."""

from __future__ import annotations

from collections.abc import Callable

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param
from workbench_plugins.methods._task_vectors import (
    RESCALE,
    ConsensusParameters,
    DensityModelParameters,
    LinearParameters,
    TaskVectorMethod,
)


class DareLinearParameters(LinearParameters):
    rescale: bool = Param(True, description=RESCALE, per_layer=False)


class DareTiesParameters(ConsensusParameters):
    rescale: bool = Param(True, description=RESCALE, per_layer=False)


class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    summary = (
        "DARE: drop each task-vector entry with probability 1 - density, "
        "rescale, add the weighted sum to the base."
    )
    paper = "https://arxiv.org/abs/2311.03099"
    when_to_use = (
        "Fine-tunes of large models whose deltas are redundant: dropping most of each task vector at "
        "random (the paper goes to p = 0.9) and rescaling reduces interference before a plain sum. Use "
        "moderate densities on small models, and a fixed seed for reproducible masks. With density 1 "
        "it is task_arithmetic. Exact semantics: [methods.md](../methods.md#dare_linear)."
    )
    Parameters = DareLinearParameters
    ModelParameters = DensityModelParameters
    sparsification = "random"
    consensus = False


class DareTies(TaskVectorMethod):
    name = "dare_ties"
    summary = "DARE + TIES: drop task-vector entries at random, rescale, then merge with TIES sign consensus."
    paper = "https://arxiv.org/abs/2311.03099"
    when_to_use = (
        "The usual choice for merging several instruction or domain fine-tunes of one LLM: DARE's random "
        "drop, then TIES's sign election. mergekit's defaults sum the agreeing entries (normalize: false); "
        "set normalize: true for the disjoint mean. Exact semantics: [methods.md](../methods.md#dare_ties)."
    )
    Parameters = DareTiesParameters
    ModelParameters = DensityModelParameters
    sparsification = "random"
    consensus = True


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(DareLinear)
    register(DareTies)
