"""The recipe being composed: plain recipe data, exactly what its YAML holds.

Every screen edits this one object; it stays a dict (not a ``Recipe``) because a recipe in the
making is often not valid yet: a method without models, a weight still being typed. ``validate``
turns it into a ``Recipe`` with the same checks and messages as ``workbench validate``.

A form value that is not valid stays in the recipe as typed and is recorded as *rejected* under
its field's name: ``validate`` then fails naming that field, so nothing (the recipe check, Run,
Save) treats the recipe as ok while a field is rejected. A recipe opened from a mergekit file keeps
the mergekit format: ``to_yaml`` (what the editor shows and Save writes) is mergekit YAML, until the
user saves it as native.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.errors import RecipeError
from workbench.recipe.mergekit_writer import MergekitRecipe, native_data, to_mergekit
from workbench.recipe.schema import Recipe, load_recipe, parse_recipe

Format = Literal["native", "mergekit"]


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """A recipe as the plain data of its native YAML, defaults left out (a mergekit recipe arrives
    translated). Model entries are mappings with their ``parameters``, as the forms edit them."""
    data = native_data(recipe)
    if "models" in data:
        data["models"] = [
            {"model": m["model"], "parameters": m.get("parameters") or {}} for m in data["models"]
        ]
    return data


def text_format(text: str) -> Format:
    """Which format recipe text is in: mergekit's has ``merge_method``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return "native"
    return "mergekit" if isinstance(data, dict) and "merge_method" in data else "native"


@dataclass(frozen=True)
class Rejection:
    """A form value the recipe holds as typed although it is invalid."""

    place: tuple[Any, ...]  # where in the data: ("parameters", KEY) or ("models", I, "parameters", KEY)
    value: Any
    message: str


def _lookup(data: Any, place: tuple[Any, ...]) -> Any:
    for key in place:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return MISSING
    return data


#: The value of a place the data does not have (a required field left empty).
MISSING: Any = object()


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add ``extra``'s keys that ``into`` lacks (one level into mappings)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            for sub, v in value.items():
                into[key].setdefault(sub, v)
        else:
            into.setdefault(key, copy.deepcopy(value))


class RecipeState:
    """The composed recipe, the file it was opened from or saved to, and its format there."""

    def __init__(
        self, data: dict[str, Any] | None = None, path: Path | None = None, format: Format = "native"
    ) -> None:
        self.data: dict[str, Any] = data if data is not None else {"method": "linear", "models": []}
        self.path = path
        self.format: Format = format
        #: Field name (as the status line names it) -> the invalid value the recipe holds there.
        self.rejected: dict[str, Rejection] = {}
        #: Set by the recipe editor while it holds text not yet applied.
        self.unapplied_edit = False
        self._saved = self._snapshot()

    @classmethod
    def open(cls, path: Path) -> "RecipeState":
        """Fill the state from a recipe file (native or mergekit); raises ``RecipeError``."""
        recipe = load_recipe(path)
        try:
            fmt = text_format(path.read_text())
        except (OSError, UnicodeDecodeError):
            fmt = "native"
        return cls(recipe_data(recipe), path, fmt)

    def replace(self, other: "RecipeState") -> None:
        """Become ``other`` (a recipe opened in place: every screen keeps this object)."""
        self.data, self.path, self.format = other.data, other.path, other.format
        self.rejected = {}
        self.unapplied_edit = False
        self._saved = self._snapshot()

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "<composed recipe>"

    # -- changed since opened or saved -----------------------------------------------------------

    def _snapshot(self) -> str:
        def entry(e: Any) -> Any:
            if isinstance(e, str):
                return {"model": e}
            if isinstance(e, dict) and not e.get("parameters"):
                return {k: v for k, v in e.items() if k != "parameters"}
            return e

        data = dict(self.data)
        if isinstance(data.get("models"), list):
            data["models"] = [entry(e) for e in data["models"]]
        if not data.get("models") and "models" in data:
            del data["models"]
        if not data.get("parameters"):
            data.pop("parameters", None)
        return json.dumps([self.format, data], sort_keys=True, default=str)

    @property
    def changed(self) -> bool:
        """Whether there is something a quit would lose: the recipe differs from the file it was
        opened from or saved to (or was never saved), or the editor holds unapplied text."""
        return self.unapplied_edit or self._snapshot() != self._saved

    # -- rejected form values --------------------------------------------------------------------

    def reject(self, field: str, place: tuple[Any, ...], value: Any, message: str) -> None:
        self.rejected[field] = Rejection(place, value, message)

    def accept(self, field: str) -> None:
        self.rejected.pop(field, None)

    def problems(self) -> list[tuple[str, str]]:
        """The rejected fields still holding their invalid value: (field, message). A field whose
        value changed since (edited elsewhere, its model removed) is no longer rejected."""
        for field, rejection in list(self.rejected.items()):
            if _lookup(self.data, rejection.place) != rejection.value:
                del self.rejected[field]
        return [(field, r.message) for field, r in self.rejected.items()]

    # -- text ------------------------------------------------------------------------------------

    def native_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)

    def mergekit(self) -> MergekitRecipe:
        """The recipe as mergekit YAML (checked and round-tripped when it is valid); raises
        ``RecipeError`` when mergekit cannot say the same merge."""
        try:
            parse_recipe(self.native_yaml(), self.name)
        except RecipeError:
            return to_mergekit(self.data, self.name, check=False)
        return to_mergekit(self.data, self.name)

    def format_note(self) -> str:
        """What the editor should say about the format of its text ('' for native)."""
        if self.format != "mergekit":
            return ""
        try:
            written = self.mergekit()
        except (RecipeError, KeyError, TypeError, AttributeError) as exc:
            return f"mergekit YAML cannot hold this recipe, shown as native: {exc}"
        if written.left_out:
            return (
                "mergekit YAML has no place for "
                + ", ".join(written.left_out_keys)
                + ": kept for this session, not written to the file (Ctrl+N saves native YAML with them)."
            )
        return ""

    def to_yaml(self) -> str:
        """The text the editor shows and Save writes: mergekit YAML for a recipe in that format
        (native YAML when mergekit cannot hold it; Save then refuses, see ``save``)."""
        if self.format == "mergekit":
            try:
                return self.mergekit().text
            except (RecipeError, KeyError, TypeError, AttributeError):
                pass
        return self.native_yaml()

    def validate(self) -> Recipe:
        """The recipe as ``workbench validate`` would load it; raises ``RecipeError`` with its
        message, or naming the first rejected form field."""
        problems = self.problems()
        if problems:
            field, message = problems[0]
            raise RecipeError(f"field '{field}' is invalid: {message} Fix it on the Method screen (F3).")
        return parse_recipe(self.native_yaml(), self.name)

    def set_yaml(self, text: str) -> Recipe:
        """Replace the state with edited YAML once it is a valid recipe (else nothing changes). The
        text's format becomes the state's; mergekit text keeps the session's workbench-only settings
        (the output folder, ...) that mergekit YAML cannot hold."""
        recipe = parse_recipe(text, self.name)
        fmt = text_format(text)
        data = recipe_data(recipe)
        if fmt == "mergekit" and self.format == "mergekit":
            try:
                _merge(data, self.mergekit().left_out)
            except (RecipeError, KeyError, TypeError, AttributeError):
                pass
        self.data, self.format = data, fmt
        self.rejected = {}
        return recipe

    def save(self, path: Path, native: bool = False) -> str:
        """Write ``to_yaml`` (validated first: a saved recipe always loads), beside the target first
        and renamed onto it, so a failed save never leaves half a recipe where the old one was. A
        mergekit recipe stays mergekit YAML unless ``native``; one mergekit cannot hold is refused.
        Returns a note on what the file does not hold ('' if nothing)."""
        self.validate()
        note = ""
        fmt: Format = "native" if native else self.format
        if fmt == "mergekit":
            try:
                written = self.mergekit()
            except RecipeError as exc:
                raise RecipeError(
                    f"{exc} Not saved: saving native YAML over a mergekit recipe would make it unreadable by "
                    "mergekit; save as native (Ctrl+N) if that is what you want."
                ) from exc
            text = written.text
            if written.left_out:
                note = "not in the file (mergekit YAML has no place for them): " + ", ".join(
                    written.left_out_keys
                )
        else:
            text = self.native_yaml()
        scratch = path.with_name(f".{path.name}.saving")
        try:
            scratch.write_text(text)
            os.replace(scratch, path)
        except OSError as exc:
            scratch.unlink(missing_ok=True)
            raise RecipeError(f"cannot save the recipe to {path}: {exc.strerror}.") from exc
        self.path, self.format = path, fmt
        self.unapplied_edit = False
        self._saved = self._snapshot()
        return note

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
