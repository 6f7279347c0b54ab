"""Parameter values that vary over layers and tensors, with mergekit's semantics.

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
from pathlib import Path
from typing import Any

import yaml

_MISSING = object()


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
