"""Helpers shared by the built-in weighted methods."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.errors import RecipeError
from workbench.method import ParameterSet
from workbench.params import varies


def normalized(weights: list[float], method: str, tensor: str) -> list[float]:
    """Weights divided by their sum; a sum of 0 cannot be normalised and is an input error."""
    total = sum(weights)
    if total == 0:
        raise RecipeError(
            f"{method}: the weights of tensor '{tensor}' sum to 0, so they cannot be normalised."
        )
    return [w / total for w in weights]


def refuse_zero_sums(method: str, params: ParameterSet, model_params: Sequence[ParameterSet]) -> None:
    """With ``normalize`` on, the models' weights must not sum to 0 at any tensor: refused while
    planning (``workbench validate``), naming the first such tensor, rather than in the middle of a run."""
    if not params.values.normalize or not model_params:  # type: ignore[attr-defined]
        return
    names = model_params[0].tensor_names
    if not any(varies(p.raw.get("weight")) for p in model_params):
        names = names[:1]  # one value per model: every tensor has the same sum
    for name in names:
        if sum(p.at(name).weight for p in model_params) == 0:  # type: ignore[attr-defined]
            raise RecipeError(
                f"{method}: the models' weights of tensor '{name}' sum to 0, so they cannot be normalised "
                "(normalize: true divides by their sum); give weights with a non-zero sum, or normalize: false."
            )
