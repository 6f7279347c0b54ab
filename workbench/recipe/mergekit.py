"""Reading mergekit YAML recipes unchanged.

A mergekit recipe is recognised by its ``merge_method`` key and translated into a native recipe
with mergekit's semantics (model order, which model is the base, dtype defaults). Options this
version does not support are named in an error, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from workbench.errors import RecipeError
from workbench.recipe.sources import LocatedSource

#: mergekit methods that take the base apart from the models (task vectors against it, or the other
#: side of nearswap): a base listed among the models is not one of them in mergekit (for task vectors it
#: would be a zero one), so it is dropped from the model list.
_TASK_VECTOR_METHODS = {
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "ram",
    "ramplus_tl",
    "nearswap",
    "multislerp",
    "nuslerp",
    "della",
    "della_linear",
    "sce",
    "arcee_fusion",
}
#: Every mergekit method this version reads (others are refused by name).
SUPPORTED_METHODS = _TASK_VECTOR_METHODS | {"linear", "slerp", "passthrough", "karcher"}
_UNSUPPORTED_KEYS = {
    "modules": "multi-module recipes are not supported yet",
}
_KNOWN_KEYS = {
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
}


def _model_ref(entry: Any, source: LocatedSource, path: tuple[Any, ...]) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("model"), str):
        return entry["model"]
    raise RecipeError(f"{source.where(path)}: expected a model reference (a string).")


def _parameters(value: Any, source: LocatedSource, path: tuple[Any, ...]) -> dict[str, Any]:
    """A copy of a ``parameters`` mapping (none given: empty); any other value is refused by line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{source.where(path)}: expected a mapping of parameters (name: value).")
    return dict(value)


def _remap_model_lines(source: LocatedSource, order: list[int | None]) -> None:
    """Native ``models[j]`` is mergekit ``models[order[j]]`` (None: added here, no line): move the recorded
    lines accordingly."""
    lines = source.lines
    entries = {k: v for k, v in lines.items() if len(k) >= 2 and k[0] == "models" and isinstance(k[1], int)}
    for key in entries:
        del lines[key]
    for j, i in enumerate(order):
        for key, line in entries.items():
            if key[1] == i:
                lines[("models", j) + key[2:]] = line


def _slices(slices: Any, method: str, base: str | None, source: LocatedSource) -> list[dict[str, Any]]:
    """mergekit ``slices`` as native ones: the same sources and layer ranges (end exclusive)."""
    if not isinstance(slices, list) or not slices:
        raise RecipeError(f"{source.where(('slices',))}: expected a list of slices, each with 'sources'.")
    native = []
    for i, piece in enumerate(slices):
        if (
            not isinstance(piece, dict)
            or set(piece) - {"sources"}
            or not isinstance(piece.get("sources"), list)
        ):
            extra = sorted(set(piece) - {"sources"}, key=str) if isinstance(piece, dict) else []
            what = f"slice option '{extra[0]}' is not supported" if extra else "expected 'sources: [...]'"
            raise RecipeError(f"{source.where(('slices', i))}: {what}.")
        sources = []
        for j, entry in enumerate(piece["sources"]):
            where = ("slices", i, "sources", j)
            if not isinstance(entry, dict) or set(entry) - {"model", "layer_range", "parameters"}:
                extra = (
                    sorted(set(entry) - {"model", "layer_range", "parameters"}, key=str)
                    if isinstance(entry, dict)
                    else []
                )
                raise RecipeError(
                    f"{source.where(where)}: "
                    + (
                        f"source option '{extra[0]}' is not supported."
                        if extra
                        else "expected a mapping with 'model' and 'layer_range'."
                    )
                )
            sources.append(
                {
                    "model": _model_ref(entry.get("model"), source, where + ("model",)),
                    "layer_range": entry.get("layer_range"),
                    "parameters": _parameters(entry.get("parameters"), source, where + ("parameters",)),
                }
            )
        if method in _TASK_VECTOR_METHODS and base is not None and base not in [s["model"] for s in sources]:
            raise RecipeError(
                f"{source.where(('slices', i))}: mergekit merges each slice over its own range of the "
                f"base_model, and this slice has no source of '{base}'."
            )
        if method == "slerp":
            if base is None or base not in [s["model"] for s in sources]:
                raise RecipeError(
                    f"{source.where(('slices', i))}: mergekit slerp needs base_model to be one of each slice's sources."
                )
            sources = [s for s in sources if s["model"] == base][:1] + [
                s for s in sources if s["model"] != base
            ]
        native.append({"sources": sources})
    return native


#: Parameters mergekit accepts for a method and ignores (its generalized task arithmetic gives every
#: method of the family a per-model density): dropped with a warning, so such recipes run unchanged.
_IGNORED_PARAMETERS = {"task_arithmetic": ("density",)}


def _drop_ignored(
    method: str, params: dict[str, Any], source: LocatedSource, path: tuple[Any, ...], notes: list[str]
) -> None:
    for key in _IGNORED_PARAMETERS.get(method, ()):
        if key in params:
            del params[key]
            notes.append(
                f"{source.where((*path, key))}: no effect for {method} (mergekit accepts it and ignores it"
                " too); use ties or dare_linear to sparsify the task vectors."
            )


#: The keys of mergekit's ``tokenizer:`` block (``TokenizerConfig``).
_TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


def _tokenizer(
    data: dict[str, Any],
    source: LocatedSource,
    notes: list[str],
    method: str,
    base: str | None,
    native: dict[str, Any],
) -> dict[str, Any]:
    """mergekit's ``tokenizer_source``, ``tokenizer`` block and ``chat_template`` as a native
    ``tokenizer`` section (empty: none given). Either key makes the output vocabulary and aligns
    the rows to it (mergekit's ``tokenizer:`` block defaults to ``source: union``); a
    ``chat_template`` alone changes no rows. The native fields get the lines of the keys written."""
    chosen, block, template = data.get("tokenizer_source"), data.get("tokenizer"), data.get("chat_template")
    lines = source.lines
    if chosen is not None and block is not None:
        raise RecipeError(
            f"{source.where(('tokenizer',))}: mergekit refuses tokenizer_source together with a tokenizer "
            "block ('Cannot specify both tokenizer_source and tokenizer'); put the source in tokenizer.source."
        )
    section: dict[str, Any] = {}
    if chosen is not None:
        if not isinstance(chosen, str) or not chosen.strip():
            raise RecipeError(
                f"{source.where(('tokenizer_source',))}: expected union, base or a model reference."
            )
        section["source"] = chosen
        for key in (("tokenizer",), ("tokenizer", "source")):
            lines.setdefault(key, lines.get(("tokenizer_source",), 0))
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError(
                f"{source.where(('tokenizer',))}: expected a mapping ({', '.join(_TOKENIZER_KEYS)})."
            )
        unknown = sorted(set(block) - set(_TOKENIZER_KEYS), key=str)
        if unknown:
            raise RecipeError(
                f"{source.where(('tokenizer', unknown[0]))}: unknown tokenizer option '{unknown[0]}'."
            )
        section.update({k: v for k, v in block.items() if v is not None})
        section.setdefault("source", "union")  # mergekit's TokenizerConfig default
        if block.get("pad_to_multiple_of") == 1:
            del section["pad_to_multiple_of"]
            notes.append(f"{source.where(('tokenizer', 'pad_to_multiple_of'))}: 1 pads nothing; no effect.")
    if template is not None:
        if not isinstance(template, str):
            raise RecipeError(
                f"{source.where(('chat_template',))}: expected a template name or Jinja text (a string)."
            )
        section["chat_template"] = template
        lines.setdefault(("tokenizer",), lines.get(("chat_template",), 0))
        lines.setdefault(("tokenizer", "chat_template"), lines.get(("chat_template",), 0))
    merged = [m["model"] for m in native.get("models", [])]
    if section.get("source") == "base" and base is not None and "base" not in native:
        section["source"] = base  # base_model is no native base here: name its tokenizer by reference
    if base is not None and "base" not in native and base not in merged and section.get("source") == "union":
        notes.append(
            f"{source.where(('tokenizer',))}: mergekit's {method} gathers base_model only for the vocabulary: "
            "its union starts from base_model's tokenizer and its rows count for the default rules; here "
            "the union is over the merged models, starting from models[0]'s tokenizer."
        )
    return section


def translate(data: dict[str, Any], source: LocatedSource, notes: list[str] | None = None) -> dict[str, Any]:
    """A native recipe dict equivalent to the mergekit recipe ``data``; warnings about options that
    change nothing are appended to ``notes``."""
    notes = [] if notes is None else notes
    for key, why in _UNSUPPORTED_KEYS.items():
        if key in data:
            raise RecipeError(f"{source.where((key,))}: mergekit option '{key}' is not supported: {why}.")
    unknown = sorted(
        set(data) - _KNOWN_KEYS - set(_UNSUPPORTED_KEYS), key=str
    )  # keys may be numbers, dates...
    if unknown:
        raise RecipeError(f"{source.where((unknown[0],))}: unknown mergekit option '{unknown[0]}'.")
    method = data["merge_method"]
    if not isinstance(method, str) or method not in SUPPORTED_METHODS:
        raise RecipeError(
            f"{source.where(('merge_method',))}: mergekit method '{method}' is not supported yet"
            f" (supported: {', '.join(sorted(SUPPORTED_METHODS))})."
        )
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(base, source, ("base_model",))
    models: list[dict[str, Any]] = []
    entries = data.get("models") or []
    if not isinstance(entries, list):
        raise RecipeError(f"{source.where(('models',))}: expected a list of '- model: <ref>' entries.")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RecipeError(
                f"{source.where(('models', i))}: expected '- model: <ref>' with optional parameters."
            )
        ref = _model_ref(entry.get("model"), source, ("models", i, "model"))
        models.append(
            {
                "model": ref,
                "parameters": _parameters(entry.get("parameters"), source, ("models", i, "parameters")),
                "_index": i,
            }
        )

    native: dict[str, Any] = {
        "method": method,
        "models": models,
        "parameters": _parameters(data.get("parameters"), source, ("parameters",)),
    }
    _drop_ignored(method, native["parameters"], source, ("parameters",), notes)
    for i, m in enumerate(models):
        _drop_ignored(method, m["parameters"], source, ("models", i, "parameters"), notes)
    if "slices" in data:
        if models:
            raise RecipeError(f"{source.where(('slices',))}: give either 'models' or 'slices', not both.")
        del native["models"]
        native["slices"] = _slices(data["slices"], method, base, source)
        if method in _TASK_VECTOR_METHODS and base is not None:
            native["base"] = base  # each slice merges over its own range of the base, as in mergekit
        base = None  # slerp's base picked each slice's t = 0 end; linear and passthrough ignore it
    elif method == "slerp":
        # mergekit interpolates from the base (t = 0) to the other model (t = 1).
        if base is None or base not in [m["model"] for m in models]:
            raise RecipeError(
                f"{source.where(('base_model',))}: mergekit slerp needs base_model to be one of its two models."
            )
        native["models"] = [m for m in models if m["model"] == base][:1] + [
            m for m in models if m["model"] != base
        ]
    elif method == "linear":
        pass  # mergekit's linear ignores base_model
    elif method == "karcher":
        # mergekit's karcher averages every model of the recipe, its base_model included
        if base is not None and base not in [m["model"] for m in models]:
            native["models"] = [{"model": base, "parameters": {}, "_index": None}, *models]
    elif base is not None:
        native["base"] = base
        if method in _TASK_VECTOR_METHODS:
            native["models"] = [m for m in models if m["model"] != base]
    # Models may have been reordered or dropped: errors about native models[j] must point at the
    # line of the entry the user wrote, so remap the located lines of 'models'.
    _remap_model_lines(source, [m.pop("_index") for m in native.get("models", [])])
    for m in models:
        m.pop("_index", None)
    if "dtype" in data:
        native["dtype"] = data["dtype"]
    out_dtype = data.get("out_dtype") or data.get("dtype")
    output: dict[str, Any] = {}
    if out_dtype:
        output["dtype"] = out_dtype
    section = _tokenizer(data, source, notes, method, base, native)
    if section:
        native["tokenizer"] = section
    if output:
        native["output"] = output
    return native
