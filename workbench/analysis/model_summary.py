"""What ``workbench inspect`` and the TUI's Models screen say about a model, from its headers alone.

Opening a model reads its config and safetensors headers, never tensor data, so a summary of a
large (or Hub) model is cheap. Comparing two summaries tells why two models cannot be merged
tensor by tensor: another architecture, a tensor one of them lacks, or a tensor of another shape.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workbench import architecture
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.registry import Registry


@dataclass(frozen=True)
class ModelSummary:
    """One model's facts, or the reason it could not be opened (``error``)."""

    ref: str
    architecture: str = ""
    layers: int = 0
    parameters: int = 0
    #: Safetensors dtype codes, most common first (e.g. ("BF16",)).
    dtypes: tuple[str, ...] = ()
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    error: str | None = None

    @property
    def dtype_label(self) -> str:
        return ", ".join(self.dtypes)


def summarize(registry: Registry, ref: str) -> ModelSummary:
    """Open ``ref`` (a path, Hub id or BASE+ADAPTER) and describe it; a model that cannot be opened
    gives a summary with the error's message (the one the CLI prints) instead of raising."""
    from workbench.checkpoint.resolve import open_reference

    try:
        with open_reference(registry, ref)[1] as reader:
            names = reader.tensor_names()
            infos = [reader.info(n) for n in names]
            config = reader.config()
    except WorkbenchError as exc:
        return ModelSummary(ref, error=str(exc))
    except OSError as exc:
        return ModelSummary(ref, error=f"cannot open {ref}: {exc.strerror or exc}.")
    dtypes = Counter(i.dtype for i in infos)
    return ModelSummary(
        ref,
        architecture=architecture.describe(config),
        layers=architecture.layer_count(names, config),
        parameters=sum(i.numel for i in infos),
        dtypes=tuple(d for d, _ in dtypes.most_common()),
        shapes={i.name: tuple(i.shape) for i in infos},
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(n) for n in shape) + "]"


def incompatibility(model: ModelSummary, reference: ModelSummary, where: str = "base") -> str | None:
    """Why ``model`` cannot be merged with ``reference`` (``where`` names it in the message: "base",
    "the first model"), or None when their architectures, tensor names and shapes agree."""
    if model.error or reference.error:
        return None
    if model.architecture != reference.architecture:
        return f"architecture {model.architecture} here, {reference.architecture} in {where}"
    for name, shape in reference.shapes.items():
        other = model.shapes.get(name)
        if other is None:
            return f"tensor '{name}' of {where} is missing here"
        if other != shape:
            return f"tensor '{name}' has shape {_shape(other)} here, {_shape(shape)} in {where}"
    extra = next((n for n in model.shapes if n not in reference.shapes), None)
    if extra is not None:
        return f"tensor '{extra}' is not in {where}"
    return None
