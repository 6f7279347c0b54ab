"""LoRA from a difference of weights: ΔW = W_finetune − W_base factored by truncated SVD.

ΔW = U S Vᵀ; the best rank-r approximation in Frobenius norm (Eckart-Young) is U_r S_r V_rᵀ, written
as B = U_r √S_r and A = √S_r V_rᵀ (scale 1; the singular values split evenly between the factors,
so neither factor dwarfs the other if the adapter is trained further). Its relative error is
√(Σ_{i>r} s_i²) / √(Σ s_i²), read off the singular values. One tensor at a time, so memory stays
at one weight matrix and its factors. Tensors outside the targets (norms, embeddings) that differ
cannot be carried by a LoRA and are reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench import architecture
from workbench.errors import CheckpointError, RecipeError
from workbench.modeling.lowrank import lowrank

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint import CheckpointReader
    from workbench.registry import Registry

REPORT_NAME = "lora_report.json"


@dataclass(frozen=True)
class Factored:
    name: str
    shape: tuple[int, int]
    rank: int
    relative_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F


@dataclass
class LoraReport:
    out_dir: Path
    tensors: list[Factored] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # targets with ΔW = 0: left out of the adapter
    not_captured: dict[str, float] = field(default_factory=dict)  # non-target tensor -> max |ΔW|

    def to_json(self) -> dict[str, object]:
        return {
            "tensors": {
                t.name: {"shape": list(t.shape), "rank": t.rank, "relative_error": t.relative_error}
                for t in self.tensors
            },
            "unchanged": self.unchanged,
            "not_captured": self.not_captured,
        }


def is_target(name: str, shape: tuple[int, ...], targets: set[str] | None) -> bool:
    """A 2-D ``*.weight`` inside a transformer layer (of a module named in ``targets``, if given)."""
    if len(shape) != 2 or not name.endswith(".weight") or architecture.place(name).layer_index is None:
        return False
    return targets is None or name.removesuffix(".weight").rsplit(".", 1)[-1] in targets


def deltas(
    base: "CheckpointReader", tuned: "CheckpointReader", targets: set[str] | None, report: LoraReport
) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, ΔW) of every target that changed; records unchanged targets and changed non-targets."""
    import torch

    names = [n for n in base.tensor_names() if base.info(n).is_float]
    for name in names:
        if name not in tuned:
            raise CheckpointError(f"'{name}' is in the base but not in {tuned.path}.")
        if tuned.info(name).shape != base.info(name).shape:
            raise CheckpointError(
                f"'{name}' is {tuned.info(name).shape} in {tuned.path} but {base.info(name).shape} in the base."
            )
    for name in names:
        delta = tuned.read(name).float() - base.read(name).float()
        if not is_target(name, base.info(name).shape, targets):
            if bool(torch.any(delta != 0)):
                report.not_captured[name] = float(delta.abs().max())
        elif bool(torch.any(delta != 0)):
            yield name, delta
        else:
            report.unchanged.append(name)


def write_factored(
    pairs: Iterator[tuple[str, "torch.Tensor"]],
    out_dir: Path,
    rank: int | dict[str, int],
    base_model: str,
    report: LoraReport,
    overwrite: bool,
    on_tensor: Callable[[str], None] | None = None,
) -> LoraReport:
    """Factor every (name, ΔW) at ``rank`` (one for all, or per tensor) and publish a PEFT adapter
    folder (whole or not at all)."""
    from workbench.checkpoint.lora_adapter import write_adapter
    from workbench.checkpoint.output_folder import building

    if isinstance(rank, int) and rank < 1:
        raise RecipeError(f"rank must be at least 1, not {rank}.")
    if out_dir.exists() and not overwrite:
        raise RecipeError(f"{out_dir} exists; choose another folder or pass --overwrite.")
    with building(out_dir, replace=overwrite) as partial:
        factors = {}
        for name, delta in pairs:
            a, b, error = lowrank(delta, rank if isinstance(rank, int) else rank[name])
            factors[name] = (a, b)
            report.tensors.append(
                Factored(name, (int(delta.shape[0]), int(delta.shape[1])), int(a.shape[0]), error)
            )
            if on_tensor:
                on_tensor(name)
        if not factors:
            raise RecipeError(
                "no target weight differs between the two models; there is nothing to put in an adapter."
            )
        write_adapter(partial, factors, scale=1.0, base_model=base_model)
        (partial / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    report.out_dir = out_dir
    return report


def extract_lora(
    base_ref: str,
    tuned_ref: str,
    out_dir: Path,
    rank: int,
    registry: "Registry",
    targets: set[str] | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> LoraReport:
    """``workbench lora extract``: the rank-``rank`` LoRA that best turns the base into the fine-tune."""
    from workbench.checkpoint.resolve import open_reference

    _, base = open_reference(registry, base_ref)
    try:
        _, tuned = open_reference(registry, tuned_ref)
    except BaseException:
        base.close()
        raise
    with base, tuned:
        report = LoraReport(out_dir)
        base_model = (
            str(Path(base_ref).resolve()) if Path(base_ref).exists() else base_ref
        )  # a Hub id stays one
        return write_factored(
            deltas(base, tuned, targets, report), out_dir, rank, base_model, report, overwrite, on_tensor
        )
