"""How many LoRA experts each layer gets (MoLA's layer-wise allocation).

MoLA writes an allocation as one count per group of consecutive layers, ``2-4-6-8`` for LLaMA-2's
32 layers in four groups of eight. On a model whose layer count the pattern does not divide, the
groups are as equal as possible and the extra layers go to the outermost groups first (first,
last, second, second-to-last, …; an odd one to the middle group when there is one), so a pattern
and its reverse (2-4-6-8 and 8-6-4-2) use the same number of experts whenever a symmetric split
exists (not, e.g., 5 layers in 4 groups).
"""

from __future__ import annotations

import re

from workbench.errors import RecipeError

_PATTERN = re.compile(r"^\d+(-\d+)*$")


def group_sizes(layers: int, groups: int) -> list[int]:
    """Layers per group: equal, extras to the outermost groups first."""
    if groups > layers:
        raise RecipeError(
            f"an allocation of {groups} groups needs at least {groups} layers; the model has {layers}."
        )
    sizes = [layers // groups] * groups
    extra = layers % groups
    if extra % 2 and groups % 2:  # the odd one to the middle group keeps the split symmetric
        sizes[groups // 2] += 1
        extra -= 1
    outermost_first = list(
        dict.fromkeys(i for pair in zip(range(groups), reversed(range(groups))) for i in pair)
    )
    for i in outermost_first[:extra]:
        sizes[i] += 1
    return sizes


def per_layer(spec: str | list[int], layers: int, field: str = "allocation") -> list[int]:
    """Expert counts per layer from a pattern (``"2-4-6-8"``) or an explicit list of ``layers`` counts."""
    if isinstance(spec, list):
        if len(spec) != layers:
            raise RecipeError(
                f"{field}: {len(spec)} counts for a model with {layers} layers; give one per layer or a "
                "pattern like '2-4-6-8'."
            )
        counts = spec
    else:
        if not _PATTERN.match(spec.strip()):
            raise RecipeError(
                f"{field}: '{spec}' is not a pattern like '2-4-6-8' (one count per group of layers), a list "
                "of counts, 'uniform' or 'magnitude'."
            )
        pattern = [int(n) for n in spec.strip().split("-")]
        if len(pattern) > layers:
            raise RecipeError(
                f"{field}: '{spec}' has {len(pattern)} groups, but the model has only {layers} layers."
            )
        counts = [
            count for count, size in zip(pattern, group_sizes(layers, len(pattern))) for _ in range(size)
        ]
    if any(c < 1 for c in counts):
        raise RecipeError(f"{field}: every layer needs at least one expert, got {counts}.")
    return counts
