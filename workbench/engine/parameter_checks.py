"""A recipe's parameters against a method's schemas, before any tensor is read: unknown keys (with the
nearest known one), missing required ones, empty lists, values out of bounds (every gradient anchor,
filter value and file entry), and numbers that are not finite. Each error names the recipe's line."""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from workbench.errors import RecipeError
from workbench.method import MethodParameters, is_per_layer, param_keys
from workbench.params import anchors, is_filter_list, varies
from workbench.recipe.schema import Recipe, format_path, located


class ParameterChecker:
    """Checks a recipe's parameters against a method's schemas, naming the recipe's line."""

    def __init__(self, recipe: Recipe) -> None:
        self.source = located(recipe)
        self.recipe_name = recipe.source or "<recipe>"

    def where(self, path: tuple[Any, ...]) -> str:
        return self.source.where(path) if self.source else f"{self.recipe_name}: {format_path(path)}"

    def check(
        self,
        raw: dict[str, Any],
        schema: type[MethodParameters],
        path: tuple[Any, ...],
        method: str,
        allowed_elsewhere: set[str],
        defaults: dict[str, Any] | None = None,
    ) -> None:
        keys = param_keys(schema)
        for key in raw:
            if key in keys or key in allowed_elsewhere:
                continue
            close = difflib.get_close_matches(key, list(keys) + list(allowed_elsewhere), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(keys)) or "none"
            raise RecipeError(
                f"{self.where(path + (key,))}: unknown parameter '{key}' for method '{method}'.{hint} Its "
                f"parameters here: {known}."
            )
        for key, fname in keys.items():
            info = schema.model_fields[fname]
            if key not in raw:
                if info.is_required() and not (defaults and key in defaults):
                    raise RecipeError(
                        f"{self.where(path)}: method '{method}' needs parameter '{key}' ({info.description})."
                    )
                continue
            value = raw[key]
            if value == [] or (is_filter_list(value) and any(entry.get("value") == [] for entry in value)):
                raise RecipeError(
                    f"{self.where(path + (key,))}: parameter '{key}' has an empty list as its value."
                )
            annotation: Any = (
                Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            )
            adapter = TypeAdapter(annotation)
            if not is_per_layer(schema, fname):  # one value for the whole model, taken literally
                refuse_non_finite(self.where(path + (key,)), key, value)
                try:
                    refuse_non_finite(self.where(path + (key,)), key, adapter.validate_python(value))
                except ValidationError as exc:
                    if varies(value):
                        raise RecipeError(
                            f"{self.where(path + (key,))}: parameter '{key}' takes a single value, not a "
                            "list or a file."
                        ) from None
                    raise RecipeError(
                        f"{self.where(path + (key,))}: parameter '{key}' = {value!r} is invalid: "
                        f"{exc.errors()[0]['msg']}."
                    ) from None
                continue
            if is_filter_list(value):
                for i, entry in enumerate(value):
                    extra = set(entry) - {"filter", "value"}
                    if extra or "value" not in entry:
                        raise RecipeError(
                            f"{self.where(path + (key, i))}: a filter entry has keys 'filter' and 'value' only."
                        )
            try:
                values = anchors(value)
            except ValueError as exc:
                raise RecipeError(f"{self.where(path + (key,))}: {exc}.") from None
            for anchor in values:
                refuse_non_finite(self.where(path + (key,)), key, anchor)
                try:  # a number given as text ("1e308": YAML 1.1 reads it as a string) is checked as read
                    refuse_non_finite(self.where(path + (key,)), key, adapter.validate_python(anchor))
                except ValidationError as exc:
                    message = exc.errors()[0]["msg"]
                    raise RecipeError(
                        f"{self.where(path + (key,))}: parameter '{key}' = {anchor!r} is invalid: {message}."
                    ) from None


#: The largest magnitude float32 holds: a parameter beyond it turns the merge into inf at once.
FLOAT32_MAX = 3.4028234663852886e38


def refuse_non_finite(where: str, key: str, value: Any) -> None:
    """A number a recipe gives (at any depth of a list or mapping) must be finite and within float32's
    range: NaN, inf or 1e308 would only give a model of NaN/Inf, tensor by tensor."""
    if isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            refuse_non_finite(where, key, item)
    elif isinstance(value, dict):
        for item in value.values():
            refuse_non_finite(where, key, item)
    elif isinstance(value, (int, float)) and not (abs(value) <= FLOAT32_MAX):  # NaN fails the test too
        what = (
            "not a number"
            if value != value
            else "infinite"
            if math.isinf(value)
            else "beyond float32's range"
        )
        raise RecipeError(
            f"{where}: parameter '{key}' = {value!r} is {what}: the merge would give NaN/Inf values. "
            "Give a finite number."
        )
