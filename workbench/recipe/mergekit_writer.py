"""Writing a native recipe back as mergekit YAML: the inverse of :mod:`workbench.recipe.mergekit`.

An opened mergekit recipe is saved as mergekit YAML, so mergekit can still read it. Every written
recipe is read back through the same translation (``parse_recipe``) and must give the same native
recipe; one that would not (a method mergekit does not have, a base mergekit would ignore, ...)
is refused with the reason, never written differently. Workbench-only settings (the output folder,
the push, the seed, evaluators, ...) have no place in mergekit YAML: they are returned apart as
``left_out``, for the caller to keep or to show.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from workbench.errors import RecipeError
from workbench.recipe.mergekit import SUPPORTED_METHODS
from workbench.recipe.schema import Recipe, parse_recipe

#: Native top-level keys with no mergekit equivalent (``output.dtype`` has one: ``out_dtype``).
_WORKBENCH_ONLY = ("seed", "memory_limit", "evaluators")


def native_data(recipe: Recipe) -> dict[str, Any]:
    """A recipe as the plain data of its native YAML, without the values that are defaults."""
    data = recipe.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    data["method"] = recipe.method
    return data


@dataclass
class MergekitRecipe:
    """A native recipe written as mergekit YAML."""

    text: str
    #: Native settings mergekit YAML cannot hold (same shape as the recipe: ``{"output": {"path": ...}}``).
    left_out: dict[str, Any] = field(default_factory=dict)

    @property
    def left_out_keys(self) -> list[str]:
        """The left-out settings as dotted keys: ``output.path``, ``seed``."""
        keys = []
        for key, value in self.left_out.items():
            if isinstance(value, dict) and key == "output":
                keys += [f"{key}.{sub}" for sub in value]
            else:
                keys.append(key)
        return keys


def _split(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what mergekit can hold, the workbench-only rest)."""
    kept = copy.deepcopy(data)
    rest: dict[str, Any] = {k: kept.pop(k) for k in _WORKBENCH_ONLY if k in kept}
    output = kept.pop("output", None) or {}
    if not isinstance(output, dict):  # a recipe being composed: refused when it is checked
        rest["output"], output = output, {}
    extra = {k: v for k, v in output.items() if k != "dtype"}
    if extra and "output" not in rest:
        rest["output"] = extra
    if "dtype" in output:
        kept["output"] = {"dtype": output["dtype"]}
    return kept, rest


def _cannot(why: str) -> RecipeError:
    return RecipeError(f"this recipe cannot be written as mergekit YAML: {why}")


def _models(data: dict[str, Any]) -> list[dict[str, Any]]:
    entries = []
    for entry in data.get("models") or []:
        entry = {"model": entry} if isinstance(entry, str) else dict(entry)
        if not entry.get("parameters"):
            entry.pop("parameters", None)
        entries.append(entry)
    return entries


def _slices(data: dict[str, Any], method: str, base: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """mergekit slices and its base_model (slerp: each slice's first source, the t = 0 end)."""
    slices = []
    for piece in data["slices"]:
        sources = []
        for source in piece.get("sources", []):
            source = dict(source)
            if not source.get("parameters"):
                source.pop("parameters", None)
            sources.append(source)
        slices.append({"sources": sources})
    if method == "slerp":
        if base is not None:
            raise _cannot("slerp takes no separate base in mergekit (its base_model is one of the models).")
        firsts = {s["sources"][0]["model"] for s in slices if s["sources"]}
        if len(firsts) != 1:
            raise _cannot("mergekit's slerp needs the same first model (its base_model) in every slice.")
        return slices, firsts.pop()
    return slices, base


def _mergekit_dict(data: dict[str, Any]) -> dict[str, Any]:
    method = data["method"]
    if method not in SUPPORTED_METHODS:
        raise _cannot(f"mergekit has no method '{method}' that this version translates.")
    base = data.get("base")
    out: dict[str, Any] = {"merge_method": method}
    if data.get("slices"):
        slices, base = _slices(data, method, base)
        if base is not None:
            out["base_model"] = base
        out["slices"] = slices
    else:
        models = _models(data)
        if method == "slerp":
            if base is not None:
                raise _cannot(
                    "slerp takes no separate base in mergekit (its base_model is one of the models)."
                )
            if models:
                out["base_model"] = models[0]["model"]  # the t = 0 end
        elif base is not None:
            out["base_model"] = base
        out["models"] = models
    if data.get("parameters"):
        out["parameters"] = copy.deepcopy(data["parameters"])
    dtype = data.get("dtype")
    out_dtype = (data.get("output") or {}).get("dtype")
    if dtype is None and out_dtype == "float32":
        dtype = "float32"  # the compute default, written as mergekit writes it: dtype alone
    if dtype is not None:
        out["dtype"] = dtype
    if out_dtype is not None and out_dtype != dtype:
        out["out_dtype"] = out_dtype
    if dtype is not None and out_dtype is None:
        raise _cannot(
            f"mergekit's dtype ({dtype}) is also the output's dtype unless out_dtype is given, and this "
            "recipe keeps the input's dtype in the output."
        )
    tokenizer = data.get("tokenizer")
    if tokenizer:
        block = {k: v for k, v in tokenizer.items() if k != "chat_template"}
        if "chat_template" in tokenizer:
            out["chat_template"] = tokenizer["chat_template"]
        if block:
            out["tokenizer"] = block
    return out


def to_mergekit(data: dict[str, Any], name: str = "<recipe>", check: bool = True) -> MergekitRecipe:
    """The native recipe ``data`` (plain data) as mergekit YAML that reads back to it.

    With ``check`` (for saving), ``data`` must be a valid recipe and the text is read back through
    the translation and compared. Without (for showing a recipe still being composed), the text is
    written as it stands. Raises ``RecipeError`` when mergekit YAML cannot say the same merge."""
    if not check:
        kept, rest = _split(data)
        if not isinstance(kept.get("method"), str):
            raise _cannot("it has no method yet.")
        return MergekitRecipe(
            yaml.safe_dump(_mergekit_dict(kept), sort_keys=False, default_flow_style=None), rest
        )
    native = native_data(parse_recipe(yaml.safe_dump(data, sort_keys=False), name))
    kept, rest = _split(native)
    text = yaml.safe_dump(_mergekit_dict(kept), sort_keys=False, default_flow_style=None)
    try:
        back = native_data(parse_recipe(text, name))
    except RecipeError as exc:
        raise _cannot(f"mergekit YAML would not read back ({exc})") from exc
    expected = native_data(parse_recipe(yaml.safe_dump(kept, sort_keys=False), name))
    if back != expected:
        raise _cannot(
            "mergekit's reading of it would be a different merge (the order or roles of the models)."
        )
    return MergekitRecipe(text, rest)
