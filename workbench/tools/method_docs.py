"""One Markdown page per registered merge method, generated from its class and parameter schemas.

The parameter tables come from the pydantic schemas the recipes are validated with, so the pages
cannot drift from what the code accepts; the prose comes from the class (``summary``,
``when_to_use``, ``paper``). Third-party methods get pages the same way as built-in ones.
``workbench methods --docs DIR`` writes them; the built-in ones are kept in ``docs/methods/``.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from workbench.method import MergeMethod, MethodParameters, is_per_layer
from workbench.registry import Registry

BASE_MODEL_TEXT = {
    "required": "required (`base:`): the method works on task vectors θᵢ − θ_base",
    "optional": "optional (`base:`)",
    "unused": "not used (a recipe with `base:` is refused)",
}


def type_label(annotation: Any) -> str:
    """'float', 'bool', or the allowed values of a Literal: 'l1 | inverse_density'."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(type_label(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def parameter_rows(schema: type[MethodParameters]) -> list[tuple[str, str, str, str, str]]:
    """(name as written in recipes, type, default, per-layer, description) for every field."""
    rows = []
    for field_name, info in schema.model_fields.items():
        default = "(required)" if info.is_required() else repr(info.default)
        per_layer = "yes" if is_per_layer(schema, field_name) else "no"
        rows.append(
            (
                info.alias or field_name,
                type_label(info.annotation),
                default,
                per_layer,
                info.description or "",
            )
        )
    return rows


def parameter_records(schema: type[MethodParameters]) -> list[dict[str, Any]]:
    """Every field as plain data: the recipe key, type, default, per-layer flag, bounds and description."""
    records = []
    for field_name, info in schema.model_fields.items():
        bounds = {
            key: getattr(item, key)
            for item in info.metadata
            for key in ("gt", "ge", "lt", "le")
            if getattr(item, key, None) is not None
        }
        records.append(
            {
                "name": info.alias or field_name,
                "type": type_label(info.annotation),
                "required": info.is_required(),
                "default": None if info.is_required() else _plain(info.default),
                "per_layer": is_per_layer(schema, field_name),
                "bounds": bounds,
                "description": info.description or "",
            }
        )
    return records


def _plain(value: Any) -> Any:
    """A default as JSON has it (tuples as lists; anything else JSON lacks as its repr)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return repr(value)


def method_record(registry: Registry, name: str) -> dict[str, Any]:
    """One method as ``workbench methods --json`` gives it."""
    entry = registry.methods[name]
    method: type[MergeMethod] = entry.obj
    return {
        "name": name,
        "plugin": entry.plugin.name,
        "package": entry.plugin.package,
        "version": entry.plugin.version,
        "summary": method.summary,
        "paper": method.paper,
        "base_model": method.base_model,
        "min_models": method.min_models,
        "max_models": method.max_models,
        "mode": method.mode,
        "parameters": parameter_records(method.Parameters),
        "model_parameters": parameter_records(method.ModelParameters),
    }


def _cell(text: str) -> str:
    return text.replace("|", "&#124;")


def _table(schema: type[MethodParameters]) -> list[str]:
    rows = parameter_rows(schema)
    if not rows:
        return ["None."]
    lines = ["| parameter | type | default | per layer | description |", "|---|---|---|---|---|"]
    for name, kind, default, per_layer, description in rows:
        default = default if default == "(required)" else f"`{default}`"
        lines.append(f"| `{name}` | {_cell(kind)} | {default} | {per_layer} | {_cell(description)} |")
    return lines


def method_page(method: type[MergeMethod], plugin: str, package: str) -> str:
    models = (
        f"{method.min_models} or more"
        if method.max_models is None
        else (
            f"exactly {method.min_models}"
            if method.min_models == method.max_models
            else f"{method.min_models} to {method.max_models}"
        )
    )
    lines = [f"# `{method.name}`", "", method.summary, ""]
    if method.paper:
        lines += [f"Paper: <{method.paper}>", ""]
    if method.when_to_use:
        lines += ["## When to use it", "", method.when_to_use, ""]
    lines += [
        "## Inputs",
        "",
        f"- base model: {BASE_MODEL_TEXT[method.base_model]}",
        f"- models: {models}",
        f"- provided by the plugin `{plugin}` (package `{package}`)",
        "",
        "## Parameters",
        "",
        "Global, under the recipe's `parameters:` (values marked per layer also take a list, interpolated",
        "over the layers, or `{filter, value}` entries; see [recipes.md](../recipes.md)):",
        "",
        *_table(method.Parameters),
        "",
        "Per model, under each model's `parameters:` (a per-model parameter under the top-level",
        "`parameters:` is every model's default):",
        "",
        *_table(method.ModelParameters),
        "",
        "This page is generated from the method's schema by `workbench methods --docs`; run `workbench "
        f"methods {method.name}` for the same table in the terminal.",
        "",
    ]
    return "\n".join(lines)


def index_page(registry: Registry) -> str:
    lines = [
        "# Merge methods",
        "",
        "One page per registered method, generated from its schema by `workbench methods --docs DIR`.",
        "The exact semantics (rounding, ties, mergekit differences) are in [../methods.md](../methods.md).",
        "",
        "| method | summary |",
        "|---|---|",
    ]
    for name, entry in sorted(registry.methods.items()):
        lines.append(f"| [`{name}`]({name}.md) | {_cell(entry.obj.summary)} |")
    return "\n".join(lines) + "\n"


def method_pages(registry: Registry) -> dict[str, str]:
    """File name -> contents: the index and one page per method."""
    pages = {"README.md": index_page(registry)}
    for name, entry in sorted(registry.methods.items()):
        pages[f"{name}.md"] = method_page(entry.obj, entry.plugin.name, entry.plugin.package)
    return pages


def write_method_docs(registry: Registry, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in method_pages(registry).items():
        path = directory / file_name
        path.write_text(text)
        written.append(path)
    return written
