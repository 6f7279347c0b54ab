"""Method parameters: declared (a pydantic schema of :func:`Param` fields), given (a recipe's values,
which may vary over layers and tensors with mergekit's semantics) and resolved (one tensor's values, or
a run's, as :class:`ParameterSet`).

A recipe value is one of:
- a scalar: used for every tensor;
- a list of numbers: a *gradient*, linearly interpolated over layers. Layer ``i`` of ``n`` sits at
  ``t = i / (n - 1)`` and the anchors are spread evenly over ``[0, 1]``; tensors outside the layers
  (embeddings, final norm, head) are evaluated at ``t = 0``, as mergekit does;
- a list of other values: indexed at ``int(t * (len - 1))`` (no interpolation);
- a list of ``{filter: pattern, value: v}`` entries: the first entry whose filter matches the tensor
  name wins (a plain substring, or a glob when it holds ``*``, ``?`` or ``[``); an entry without a
  filter, or with ``"*"``, matches every tensor. ``value`` may itself be a gradient;
- ``{file: path}``: values kept in a JSON or YAML file, either a mapping from exact tensor names to
  values (per-tensor coefficients, e.g. learned by aTLAS) or a filter list as above. A tensor the
  file does not name takes the parameter's default.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workbench import architecture
from workbench.architecture import TensorPlace
from workbench.errors import RecipeError

_MISSING = object()  # resolve(): no default given
_NO_VALUE = object()  # resolve_params(): no value for this tensor


def is_file_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"file"}


@functools.lru_cache(maxsize=32)
def _load_file(path: str, mtime: float) -> Any:
    text = Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not (isinstance(data, dict) or is_filter_list(data)):
        raise ValueError(
            f"{path} must hold a mapping of tensor names to values, or a list of {{filter, value}} entries"
        )
    return data


def load_value_file(value: dict[str, Any]) -> Any:
    """The table a ``{file: path}`` value refers to (read once per file version)."""
    path = Path(str(value["file"])).expanduser()
    try:
        return _load_file(str(path), path.stat().st_mtime)
    except FileNotFoundError:
        raise ValueError(f"parameter file {path} does not exist") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"parameter file {path} cannot be read: {exc}") from None


def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def filter_matches(pattern: str | None, name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def layer_position(layer_index: int | None, layer_count: int) -> float:
    if layer_index is None or layer_count <= 1:
        return 0.0
    return min(max(layer_index / (layer_count - 1), 0.0), 1.0)


def evaluate_gradient(anchors: list[Any], t: float) -> Any:
    """Interpolate a list of anchors at position ``t`` in ``[0, 1]``."""
    if len(anchors) == 1:
        return anchors[0]
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in anchors)
    scaled = t * (len(anchors) - 1)
    if not numeric:
        return anchors[int(scaled)]
    low = min(int(math.floor(scaled)), len(anchors) - 2)
    frac = scaled - low
    if frac == 0.0:
        return anchors[low]
    return anchors[low] * (1.0 - frac) + anchors[low + 1] * frac


def resolve(value: Any, name: str, layer_index: int | None, layer_count: int, default: Any = _MISSING) -> Any:
    """The value a recipe entry takes for one tensor; ``default`` when no filter matches."""
    if is_file_ref(value):
        table = load_value_file(value)
        if isinstance(table, dict):
            if name in table:
                return resolve(table[name], name, layer_index, layer_count, default)
            if default is _MISSING:
                raise LookupError(
                    f"the parameter file does not name tensor '{name}' and the parameter has no default"
                )
            return default
        value = table
    if is_filter_list(value):
        for entry in value:
            if filter_matches(entry.get("filter"), name):
                return resolve(entry.get("value"), name, layer_index, layer_count, default)
        if default is _MISSING:
            raise LookupError(f"no filter matches tensor '{name}' and the parameter has no default")
        return default
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list is not a parameter value")
        return evaluate_gradient(value, layer_position(layer_index, layer_count))
    return value


def anchors(value: Any) -> list[Any]:
    """Every concrete value a recipe entry can produce (for validating ranges up front)."""
    if is_file_ref(value):
        table = load_value_file(value)
        return [a for v in (table.values() if isinstance(table, dict) else [table]) for a in anchors(v)]
    if is_filter_list(value):
        return [a for entry in value for a in anchors(entry.get("value"))]
    if isinstance(value, list):
        return list(value)
    return [value]


def varies(value: Any) -> bool:
    return isinstance(value, list) or is_file_ref(value)


# Declared: a method's schema.


class MethodParameters(BaseModel):
    """Base class of parameter schemas: unknown keys are errors, never silently ignored."""

    # unknown keys are errors; so are NaN and inf (a schema that wants them sets allow_inf_nan=True)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def Param(
    default: Any = ...,
    *,
    description: str,
    per_layer: bool = True,
    **constraints: Any,
) -> Any:
    """Declare a method parameter.

    ``per_layer=True`` lets a recipe give a list (interpolated over layers, as in mergekit) or a
    list of ``{filter, value}`` entries matched against tensor names; otherwise only a single value
    is accepted.
    """
    return Field(default, description=description, json_schema_extra={"per_layer": per_layer}, **constraints)


def is_per_layer(schema: type[BaseModel], name: str) -> bool:
    extra = schema.model_fields[name].json_schema_extra
    return bool(isinstance(extra, dict) and extra.get("per_layer", False))


# Resolved: one tensor's values, or a whole run's.


def param_keys(schema: type[MethodParameters]) -> dict[str, str]:
    """Recipe key -> field name (a field may use an alias such as 'lambda')."""
    return {(f.alias or name): name for name, f in schema.model_fields.items()}


def resolve_params(
    schema: type[MethodParameters], raw: Mapping[str, Any], place: TensorPlace, name: str, layers: int
) -> MethodParameters:
    """The parameters of one tensor: gradients interpolated, filters applied, schema validated."""
    values: dict[str, Any] = {}
    for key, fname in param_keys(schema).items():
        if key not in raw:
            continue
        if not is_per_layer(schema, fname):
            values[key] = raw[key]
            continue
        value = resolve(raw[key], name, place.layer_index, layers, _NO_VALUE)
        if value is _NO_VALUE:
            if schema.model_fields[fname].is_required():
                raise RecipeError(
                    f"no filter of parameter '{key}' matches tensor '{name}', and '{key}' has no default."
                )
            continue
        values[key] = value
    return schema.model_validate(values)


class ParameterSet:
    """One set of a method's parameters (its own, or one model's) for a whole run, validated against
    its schema by the planner before ``check_plan``, ``memory_needed`` or ``prepare`` sees it.

    :attr:`values` are the run-wide values: every per-layer entry (a gradient, a filter list, a
    ``{file: ...}`` table) at its value outside the layers, where embeddings and the head sit (t = 0);
    options that do not vary are read there. :meth:`at` gives one tensor's values, exactly what
    ``apply`` receives for it. :attr:`raw` is the recipe's text (top-level defaults merged into a
    model's), for a method that hands it on to another (``lines`` wraps one). :attr:`tensor_names` are
    the tensors the run merges, for a check that must see every tensor's values."""

    def __init__(
        self,
        schema: type[MethodParameters],
        raw: Mapping[str, Any],
        layer_count: int,
        tensor_names: Sequence[str] = (),
    ) -> None:
        self.schema = schema
        self.raw: Mapping[str, Any] = MappingProxyType(dict(raw))
        self.layer_count = layer_count
        self.tensor_names = tuple(tensor_names)

    def at(self, tensor_name: str) -> MethodParameters:
        """The values of tensor ``tensor_name`` (RecipeError naming it if they are invalid)."""
        try:
            return resolve_params(
                self.schema, self.raw, architecture.place(tensor_name), tensor_name, self.layer_count
            )
        except ValidationError as exc:
            raise RecipeError(
                f"parameters for tensor '{tensor_name}' are invalid: {exc.errors()[0]['msg']}."
            ) from None
        except (LookupError, ValueError) as exc:  # a {file: ...} table that cannot be read or lacks it
            raise RecipeError(f"parameters for tensor '{tensor_name}': {exc}.") from None

    @functools.cached_property
    def values(self) -> MethodParameters:
        """The run-wide values (per-layer entries at t = 0, outside the layers)."""
        try:
            return resolve_params(self.schema, self.raw, architecture.place(""), "", self.layer_count)
        except ValidationError as exc:
            raise RecipeError(f"parameters are invalid: {exc.errors()[0]['msg']}.") from None
        except (LookupError, ValueError, RecipeError) as exc:
            raise RecipeError(
                f"parameters have no run-wide value ({exc}); read them per tensor with at(name)."
            ) from None

    def __repr__(self) -> str:
        return f"ParameterSet({self.schema.__name__}, {dict(self.raw)!r}, layer_count={self.layer_count})"
