"""From a method's parameter schema to form fields, and from typed text back to recipe values.

The Method screen builds its form from these, so a third-party method gets a form the same way a
built-in one does. Values are checked as ``workbench validate``/``run`` check them (each anchor of a
per-layer value against the field's pydantic type and constraints) and the messages name the
parameter, as the CLI's do.
"""

from __future__ import annotations

import functools
import json
import operator
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError

from workbench.method import MethodParameters, is_per_layer
from workbench.params import anchors, varies

FieldKind = Literal["switch", "select", "integer", "number", "text"]

#: What ``parse`` returns for an empty field: the key is left out and the default applies.
UNSET: Any = object()


@dataclass(frozen=True)
class ParamField:
    """One parameter of a schema, as a form shows it."""

    key: str  # as written in recipes (the alias, e.g. 'lambda')
    kind: FieldKind
    per_layer: bool
    required: bool
    default: Any
    description: str
    choices: tuple[Any, ...] = ()
    adapter: TypeAdapter[Any] | None = None

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not a valid recipe value of this parameter, or None."""
        assert self.adapter is not None
        if value is UNSET:
            return f"parameter '{self.key}' is required: {self.description}" if self.required else None
        if self.per_layer:
            if value == [] or (
                isinstance(value, list) and any(isinstance(v, dict) and v.get("value") == [] for v in value)
            ):
                return f"parameter '{self.key}' has an empty list as its value."
            try:
                values = anchors(value)
            except ValueError as exc:
                return f"parameter '{self.key}': {exc}."
        else:
            values = [value]
        for anchor in values:
            try:
                self.adapter.validate_python(anchor)
            except ValidationError as exc:
                if not self.per_layer and varies(value):
                    return f"parameter '{self.key}' takes a single value, not a list or a file."
                return f"parameter '{self.key}' = {anchor!r} is invalid: {exc.errors()[0]['msg']}."
        return None

    def parse(self, text: str) -> Any:
        """The recipe value of typed text (``UNSET`` when empty); text that is not YAML is kept as
        the string it is, for :meth:`check` to refuse with the schema's message."""
        text = text.strip()
        if not text:
            return UNSET
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if self.kind == "number" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (itself, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return functools.reduce(operator.or_, args), True
    return annotation, False


def _kind(annotation: Any, per_layer: bool) -> tuple[FieldKind, tuple[Any, ...]]:
    inner, _ = _without_none(annotation)
    if inner is bool:
        return "switch", ()
    if typing.get_origin(inner) is Literal:
        return "select", typing.get_args(inner)
    if per_layer:  # a number, or a list of them interpolated over the layers: typed as text
        return "text", ()
    if inner is int:
        return "integer", ()
    if inner is float:
        return "number", ()
    return "text", ()


def fields_of(schema: type[MethodParameters]) -> list[ParamField]:
    """The schema's parameters in declaration order."""
    fields = []
    for name, info in schema.model_fields.items():
        per_layer = is_per_layer(schema, name)
        kind, choices = _kind(info.annotation, per_layer)
        annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields.append(
            ParamField(
                key=info.alias or name,
                kind=kind,
                per_layer=per_layer,
                required=info.is_required(),
                default=None if info.is_required() else info.default,
                description=info.description or "",
                choices=choices,
                adapter=TypeAdapter(annotation),
            )
        )
    return fields


def show(value: Any) -> str:
    """A recipe value as a field shows it: ``[0, 0.5, 1]``, ``0.3``, ``name``."""
    if value is None or value is UNSET:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)
