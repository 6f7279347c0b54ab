"""Model Breadcrumbs: drop both the largest outliers and the smallest entries of each task vector."""

from __future__ import annotations

from collections.abc import Callable

from workbench.hookspecs import hookimpl
from workbench.method import MergeMethod, Param
from workbench_plugins.methods._task_vectors import (
    ConsensusParameters,
    DensityModelParameters,
    LinearParameters,
    TaskVectorMethod,
)


class BreadcrumbsModelParameters(DensityModelParameters):
    gamma: float = Param(
        0.01,
        description=(
            "Fraction of the largest-magnitude entries dropped as "
            "outliers (density takes precedence when both cannot hold)."
        ),
        ge=0.0,
        le=1.0,
    )


class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    summary = (
        "Model Breadcrumbs: drop each task vector's gamma largest and "
        "its smallest entries (density kept), add the weighted sum."
    )
    paper = "https://arxiv.org/abs/2312.06795"
    when_to_use = (
        "When a few very large updates of a fine-tune are specific to its task and hurt the others: it "
        "drops the gamma largest entries as well as the smallest. density defaults to 1, which keeps "
        "everything whatever gamma is: set e.g. density: 0.9. "
        "Exact semantics: [methods.md](../methods.md#breadcrumbs)."
    )
    Parameters = LinearParameters
    ModelParameters = BreadcrumbsModelParameters
    sparsification = "magnitude"
    consensus = False


class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    summary = "Model Breadcrumbs sparsification, then TIES sign consensus."
    paper = "https://arxiv.org/abs/2312.06795"
    when_to_use = (
        "Breadcrumbs' band sparsification with TIES's sign election, for several fine-tunes with "
        "conflicting updates. Exact semantics: [methods.md](../methods.md#breadcrumbs_ties)."
    )
    Parameters = ConsensusParameters
    ModelParameters = BreadcrumbsModelParameters
    sparsification = "magnitude"
    consensus = True


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Breadcrumbs)
    register(BreadcrumbsTies)
