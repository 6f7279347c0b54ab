"""``ot_fusion``'s parameters: the ground cost, the solver, the residual policy and the per-model weights."""

from __future__ import annotations

from typing import Any, Literal

from workbench.method import MethodParameters, Param

ResidPolicy = Literal["shared", "only_resid", "no_resid", "mean", "weighted_scalar", "weighted_matrix"]


class OTFusionParameters(MethodParameters):
    solver: Literal["emd", "sinkhorn"] = Param(
        "sinkhorn",
        per_layer=False,
        description=(
            "'emd': exact, hard alignment (an assignment solver for square problems); "
            "'sinkhorn': entropic, soft alignment (the paper's default for transformers)."
        ),
    )
    reg: float = Param(
        0.06,
        gt=0.0,
        per_layer=False,
        description=(
            "Sinkhorn regularisation on the max-normalised cost "
            "(the paper's best for weight-based costs: 0.06)."
        ),
    )
    cost: Literal["weights", "activations"] = Param(
        "weights",
        per_layer=False,
        description=(
            "Ground cost between units: from their weights (no "
            "data needed) or from their activations on 'data'."
        ),
    )
    data: dict[str, Any] | None = Param(
        None,
        per_layer=False,
        description=(
            "Inputs for cost 'activations': {evaluator: NAME, options: {...}} (the evaluator's "
            "data batches) or {text: FILE, seq_len: N} (cut with the anchor's tokenizer)."
        ),
    )
    samples: int = Param(
        64,
        ge=1,
        per_layer=False,
        description="Sequences run through each model for cost 'activations' (bounds time and memory).",
    )
    anchor: int = Param(
        0,
        ge=0,
        per_layer=False,
        description=(
            "Index of the model the others are aligned to (with models of "
            "different widths it must be 0: the output takes models[0]'s shapes)."
        ),
    )
    resid_policy: ResidPolicy = Param(
        "shared",
        per_layer=False,
        description=(
            "Residual stream's map: 'shared' (one map throughout, branches included; exact for "
            "permuted copies) or the paper's per-sublayer policies after each residual join: 'only_resid' "
            "(keep the incoming map; branches get their own), 'no_resid' (the branch's), 'mean' "
            "(their mean), 'weighted_scalar' / 'weighted_matrix' (weighted by the anchor's mean "
            "|activation| of residual and branch, overall or per dimension; cost 'activations' only)."
        ),
    )


class OTFusionModelParameters(MethodParameters):
    weight: float = Param(
        1.0, per_layer=False, description="Fusion weight of this model (the weights are normalised to sum 1)."
    )
