"""Helpers shared by the built-in weighted methods."""

from __future__ import annotations

from workbench.errors import RecipeError


def normalized(weights: list[float], method: str, tensor: str) -> list[float]:
    """Weights divided by their sum; a sum of 0 cannot be normalised and is an input error."""
    total = sum(weights)
    if total == 0:
        raise RecipeError(
            f"{method}: the weights of tensor '{tensor}' sum to 0, so they cannot be normalised."
        )
    return [w / total for w in weights]
