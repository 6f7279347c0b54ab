"""The recipe being composed: plain recipe data, exactly what its YAML holds.

Every screen edits this one object; it stays a dict (not a ``Recipe``) because a recipe in the
making is often not valid yet: a method without models, a weight still being typed. ``validate``
turns it into a ``Recipe`` with the same checks and messages as ``workbench validate``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import RecipeError
from workbench.recipe.schema import Recipe, load_recipe, parse_recipe


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """A recipe as the plain data of its native YAML (a mergekit recipe arrives translated)."""
    data = yaml.safe_load(recipe.to_yaml())
    return data if isinstance(data, dict) else {}


class RecipeState:
    """The composed recipe and the file it was opened from or saved to."""

    def __init__(self, data: dict[str, Any] | None = None, path: Path | None = None) -> None:
        self.data: dict[str, Any] = data if data is not None else {"method": "linear", "models": []}
        self.path = path

    @classmethod
    def open(cls, path: Path) -> "RecipeState":
        """Fill the state from a recipe file (native or mergekit); raises ``RecipeError``."""
        return cls(recipe_data(load_recipe(path)), path)

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "<composed recipe>"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)

    def validate(self) -> Recipe:
        """The recipe as ``workbench validate`` would load it; raises ``RecipeError`` with its message."""
        return parse_recipe(self.to_yaml(), self.name)

    def set_yaml(self, text: str) -> Recipe:
        """Replace the state with edited YAML once it is a valid recipe (else nothing changes)."""
        recipe = parse_recipe(text, self.name)
        self.data = recipe_data(recipe)
        return recipe

    def save(self, path: Path) -> None:
        """Write the YAML (validated first: a saved recipe always loads), beside the target first and
        renamed onto it, so a failed save never leaves half a recipe where the old one was."""
        self.validate()
        scratch = path.with_name(f".{path.name}.saving")
        try:
            scratch.write_text(self.to_yaml())
            os.replace(scratch, path)
        except OSError as exc:
            scratch.unlink(missing_ok=True)
            raise RecipeError(f"cannot save the recipe to {path}: {exc.strerror}.") from exc
        self.path = path

    # -- the parts screens edit ------------------------------------------------------------------

    @property
    def method(self) -> str:
        return str(self.data.get("method") or "")

    @property
    def models(self) -> list[dict[str, Any]]:
        """Model entries as ``{model: REF, parameters: {...}}``, normalised in place (none for a
        recipe of slices, which must not gain an empty ``models``)."""
        if "models" not in self.data and self.data.get("slices"):
            return []
        entries = self.data.setdefault("models", [])
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entries[i] = {"model": entry, "parameters": {}}
        return entries

    @property
    def references(self) -> list[str]:
        """Every model the recipe names: the base first, then models (or slice sources), once each."""
        refs = [self.data["base"]] if self.data.get("base") else []
        refs += [m["model"] for m in self.models]
        for entry in self.data.get("slices") or []:
            refs += [s["model"] for s in entry.get("sources", [])]
        return list(dict.fromkeys(refs))
