"""Where each output layer of a recipe comes from: the rows of the Layers screen, without textual.

Every value comes from the code a run uses, never re-derived here: the layout of a method that swaps
layers between two experts (its :class:`~workbench.method.LayerSwapLayout` methods,
``layer_swap``'s), :func:`workbench.params.resolve` for parameters that vary over layers, and the
recipe's ``slices`` (renumbered from 0 in order, as the stacked reader does). The layer count is
read from the first model's headers (``architecture.layer_count``), so nothing but headers is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench import params as param_values
from workbench.architecture import layer_count
from workbench.checkpoint.resolve import open_reference
from workbench.errors import WorkbenchError
from workbench.method import LayerSwapLayout

if TYPE_CHECKING:
    from workbench.registry import Registry


@dataclass
class LayerMap:
    """A table (one row per output layer) and a line that says what it shows."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    error: bool = False
    #: layer_swap only: the language expert's weight per layer, which the screen edits.
    swap_weights: list[float] | None = None


def count_layers(registry: "Registry", ref: str) -> int:
    """Decoder layers of a model, from its config or tensor names (headers only)."""
    _, reader = open_reference(registry, ref)
    try:
        return layer_count(reader.tensor_names(), reader.config())
    finally:
        reader.close()


def _models(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Model entries as ``{model, parameters}`` (the shorthand string form expanded)."""
    entries = data.get("models") or []
    return [{"model": e, "parameters": {}} if isinstance(e, str) else dict(e) for e in entries]


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def slices_map(data: dict[str, Any]) -> LayerMap:
    """Stacking: output layer k is layer ``start + offset`` of source j of the slice that holds k."""
    slices = data.get("slices") or []
    width = max((len(s.get("sources") or []) for s in slices), default=0)
    table = LayerMap(["layer", "slice"] + [f"source {j}" for j in range(width)])
    out = 0
    for i, piece in enumerate(slices):
        sources = piece.get("sources") or []
        start, end = sources[0]["layer_range"]
        for offset in range(end - start):
            cells = [f"{s['model']} layer {s['layer_range'][0] + offset}" for s in sources]
            table.rows.append([str(out), str(i)] + cells)
            out += 1
    table.note = f"{len(slices)} slice(s) stacked into {out} layers (method {data.get('method')})."
    return table


def swap_map(data: dict[str, Any], method: LayerSwapLayout, layers: int) -> LayerMap:
    """A layer-swapping method: which expert each layer is taken from, with the blend weights of
    transitions."""
    name = data.get("method")
    models = _models(data)
    if len(models) != 2:
        raise WorkbenchError(
            f"{name} takes two models (a task and a language expert); the recipe has {len(models)}."
        )
    weights, task, language = method.layer_layout(
        data.get("parameters") or {}, [m.get("parameters") or {} for m in models], layers
    )
    task_ref, language_ref = models[task]["model"], models[language]["model"]
    table = LayerMap(["layer", "from", "language w", "task w"], swap_weights=list(weights))
    for layer, w in enumerate(weights):
        source = f"{language_ref} (language)" if w == 1.0 else f"{task_ref} (task)" if w == 0.0 else "blend"
        table.rows.append([str(layer), source, f"{w:.2f}", f"{1.0 - w:.2f}"])
    non_layer = (data.get("parameters") or {}).get("non_layer", "task")
    table.note = (
        f"{name}: task {task_ref}, language {language_ref}; outside the layers: {non_layer}. "
        "Keys t / l set the selected layer."
    )
    return table


def gradient_map(data: dict[str, Any], layers: int) -> LayerMap:
    """Any other method: every model in every layer, with the values of parameters that vary by layer."""
    columns: list[tuple[str, Any]] = [
        (name, value) for name, value in (data.get("parameters") or {}).items() if param_values.varies(value)
    ]
    for i, entry in enumerate(_models(data)):
        columns += [
            (f"{name}[{i}]", value)
            for name, value in (entry.get("parameters") or {}).items()
            if param_values.varies(value)
        ]
    table = LayerMap(["layer", "from"] + [name for name, _ in columns])
    for layer in range(layers):
        cells = []
        for _, value in columns:
            try:
                cells.append(
                    _number(param_values.resolve(value, f"model.layers.{layer}.", layer, layers, default="-"))
                )
            except (LookupError, ValueError) as exc:
                cells.append(f"? {exc}")
        table.rows.append([str(layer), "every model"] + cells)
    varying = ", ".join(name for name, _ in columns) or "none"
    table.note = (
        f"{data.get('method')}: every layer merges every model; parameters varying by layer: {varying}."
    )
    return table


def swap_layout(data: dict[str, Any], registry: "Registry") -> LayerSwapLayout | None:
    """The recipe's method, where it swaps layers between two experts (its map can be edited)."""
    name = data.get("method")
    found = registry.methods.get(name) if isinstance(name, str) else None
    return found.obj if found is not None and isinstance(found.obj, LayerSwapLayout) else None


def build_map(data: dict[str, Any], registry: "Registry") -> LayerMap:
    """The layer map of a recipe in the making; a problem becomes the map's note, flagged as an error."""
    try:
        if data.get("slices"):
            return slices_map(data)
        models = _models(data)
        if not models:
            return LayerMap(["layer"], note="No models yet: add them on the Models screen (F2).")
        layers = count_layers(registry, models[0]["model"])
        method = swap_layout(data, registry)
        if method is not None:
            return swap_map(data, method, layers)
        return gradient_map(data, layers)
    except (WorkbenchError, KeyError, TypeError, ValueError) as exc:
        return LayerMap(["layer"], note=f"error: {exc}", error=True)
