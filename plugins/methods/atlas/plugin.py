"""``atlas``: task vectors with learned anisotropic scaling (aTLAS, Zhang et al., NeurIPS 2024), and
AdaMerging-style coefficients learned without labels (Yang et al., ICLR 2024).

θ = θ₀ + Σ_t λ[t, b] τ_t with one coefficient per task vector and parameter block: every tensor
(aTLAS), every layer (layer-wise AdaMerging), every module kind across layers, or the whole model
(one λ per task: learned task arithmetic); ``partitions: K`` splits each tensor's elements into K
fixed random groups with a coefficient each (aTLAS × K). ``prepare`` learns Λ from a little data
(``plugins/methods/atlas/training.py``); ``apply`` then streams the merge tensor by tensor like task
arithmetic. The coefficients are kept beside the output (``workbench/checkpoint/coefficients.py``), as
per-tensor weights any task-vector recipe can load, and ``workbench analyze OUTPUT`` draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import RecipeError
from workbench.hookspecs import hookimpl
from workbench.method import (
    MemoryNeed,
    MergeMethod,
    MethodParameters,
    Param,
    ParameterSet,
    PrepareContext,
    TensorContext,
)
from workbench.params import filter_matches

#: The block of the tensors whose coefficients are not learned (they keep ``init``).
UNTRAINED = "(not trained)"
#: Resident memory that importing transformers and running a model adds to a process that has
#: torch (measured: 224 MB after ``import torch``, 399 MB after loading the small zoo's base).
TRANSFORMERS_BYTES = 200 * 2**20

if TYPE_CHECKING:
    import torch

    from workbench.checkpoint.coefficients import CoefficientTable
    from workbench_plugins.methods.atlas.training import LearnResult


class AtlasParameters(MethodParameters):
    objective: Literal["cross_entropy", "entropy"] = Param(
        "cross_entropy",
        per_layer=False,
        description=(
            "What the coefficients minimise: cross-entropy on labelled data (aTLAS) "
            "or the entropy of the predictions, no labels needed (AdaMerging)."
        ),
    )
    blocks: Literal["tensor", "layer", "module", "model"] = Param(
        "tensor",
        per_layer=False,
        description=(
            "One coefficient per task vector and: tensor (aTLAS), transformer layer "
            "(layer-wise AdaMerging), module kind across layers, or model (one per "
            "task). Tensors outside the layers are their own block under layer and module."
        ),
    )
    partitions: int = Param(
        1,
        ge=1,
        le=256,
        per_layer=False,
        description=(
            "Split every tensor's elements into this many fixed "
            "random groups, each with its own coefficient (aTLAS x K)."
        ),
    )
    init: float = Param(
        0.0,
        per_layer=False,
        description=(
            "Starting value of every coefficient: 0 starts from the base "
            "(aTLAS), a task-arithmetic λ warm-starts (AdaMerging uses 0.3)."
        ),
    )
    steps: int = Param(
        300, ge=0, per_layer=False, description="Optimizer steps (each takes one batch per task)."
    )
    lr: float = Param(
        1e-3, ge=0.0, per_layer=False, description="AdamW learning rate (aTLAS and AdaMerging: 1e-3)."
    )
    weight_decay: float = Param(
        0.1, ge=0.0, per_layer=False, description="AdamW weight decay on the coefficients (aTLAS: 0.1)."
    )
    grad_clip: float = Param(
        1.0, gt=0.0, per_layer=False, description="Largest gradient norm of the coefficients per step."
    )
    batch_size: int = Param(16, ge=1, per_layer=False, description="Sequences per task per step.")
    samples: int = Param(
        512,
        ge=1,
        per_layer=False,
        description="Sequences read from each task's data (training and held-out together).",
    )
    holdout: float = Param(
        0.2,
        ge=0.0,
        lt=1.0,
        per_layer=False,
        description=(
            "Share of each task's sequences kept aside; the coefficients "
            "with the best objective on them are kept (0: the last step's)."
        ),
    )
    eval_every: int = Param(
        10, ge=1, per_layer=False, description="Steps between evaluations on the held-out sequences."
    )
    trained: list[str] | None = Param(
        None,
        per_layer=False,
        description=(
            "Tensor name patterns (substrings or globs) whose coefficients are learned; the others "
            "keep init and their task vectors are not held in memory. Default: every float tensor."
        ),
    )


class AtlasModelParameters(MethodParameters):
    data: dict[str, Any] | None = Param(
        None,
        per_layer=False,
        description=(
            "This task's data: {evaluator: NAME, options: {...}} (its validation batches) "
            "or {text: FILE, seq_len: N}. Given at the top level, every task uses it."
        ),
    )


@dataclass
class AtlasState:
    table: "CoefficientTable"
    base_ref: str
    result: "LearnResult"
    summary: dict[str, Any]


def _float_names(ctx: PrepareContext) -> list[str]:
    assert ctx.base is not None
    return [n for n in ctx.tensor_names if ctx.base.info(n).is_float]


def _is_trained(patterns: list[str] | None, name: str) -> bool:
    return patterns is None or any(filter_matches(p, name) for p in patterns)


class Atlas(MergeMethod):
    name = "atlas"
    summary = (
        "base + sum_t lambda[t, block] * tau_t with the lambdas "
        "learned from data (aTLAS; AdaMerging with objective: entropy)."
    )
    paper = "https://arxiv.org/abs/2407.02880"
    when_to_use = (
        "Several fine-tunes of one base and a little data for their tasks: instead of one hand-tuned λ, learn a "
        "coefficient per task vector and block, which lets each task keep the layers it needs and drop the ones "
        "that interfere. With labels use cross_entropy (aTLAS); with unlabelled inputs use entropy (AdaMerging: "
        "blocks: layer, init: 0.3). Holds the base and the trained task vectors in memory while it learns "
        "(the plan states how much and refuses what exceeds the memory limit); `trained` limits that. The "
        "learned values are written to coefficients/ beside the "
        "output. In the zoo, aTLAS with 512 labelled examples per "
        "task kept three times what tuned task arithmetic keeps; entropy only helps where the starting merge is "
        "mostly right (it sharpens whatever the merge predicts). Details: [methods.md](../methods.md#atlas)."
    )
    Parameters = AtlasParameters
    ModelParameters = AtlasModelParameters
    base_model = "required"

    def check_plan(
        self, params: ParameterSet, model_params: Sequence[ParameterSet], layer_count: int
    ) -> None:
        missing = [i for i, p in enumerate(model_params) if not p.values.data]
        if missing:
            raise RecipeError(
                f"atlas: models[{missing[0]}] has no 'data' to learn from; give each model "
                "{evaluator: NAME} or {text: FILE, seq_len: N}, or one 'data' for all at the top level."
            )

    def memory_needed(
        self,
        params: ParameterSet,
        model_params: Sequence[ParameterSet],
        tensors: Sequence[tuple[str, tuple[int, ...]]],
    ) -> MemoryNeed:
        import math

        options: AtlasParameters = params.values
        total = sum(math.prod(shape) for _, shape in tensors)
        trained = sum(math.prod(shape) for name, shape in tensors if _is_trained(options.trained, name))
        tasks = len(model_params)
        # float32: the loaded model, T task vectors of the trained tensors, their merged values and
        # gradients during a step, and (with partitions) one byte per element for its group; plus
        # transformers itself, which the streaming merge does not import.
        need = (
            4 * (total + (tasks + 2) * trained)
            + (trained if options.partitions > 1 else 0)
            + TRANSFORMERS_BYTES
        )
        return MemoryNeed(
            need,
            f"the base model ({total:,} parameters) and {tasks} task vector(s) "
            f"of {trained:,} trained parameters in float32, and transformers "
            f"(about {TRANSFORMERS_BYTES >> 20} MB), plus one batch's activations",
        )

    def prepare(self, ctx: PrepareContext) -> AtlasState:
        import torch

        from workbench.checkpoint.coefficients import CoefficientTable, block_of, partition_assignment
        from workbench.evaluator import EvaluationError, load_model
        from workbench.method import tensor_seed
        from workbench_plugins.methods.atlas.training import Settings, TrainedTensors, learn

        params: AtlasParameters = ctx.params.values
        base = ctx.base
        assert base is not None
        try:
            model = load_model(base.path, tokenizer=False).module
        except EvaluationError as exc:
            raise RecipeError(f"atlas runs the base model to learn its coefficients: {exc}") from None
        parameters = dict(model.named_parameters(remove_duplicate=False))
        names = _float_names(ctx)
        trained = [n for n in names if _is_trained(params.trained, n) and n in parameters]
        if not trained:
            raise RecipeError(
                f"atlas: no tensor is trained: 'trained' ({params.trained}) matches no parameter of {base.path}."
            )
        # Tensors left out of training (by 'trained', or not parameters of the model) share one block
        # that keeps the starting value, so they never take a coefficient learned for other tensors.
        chosen = set(trained)
        tensor_blocks = {
            name: block_of(name, params.blocks) if name in chosen else UNTRAINED for name in names
        }
        blocks = list(dict.fromkeys(tensor_blocks.values()))
        block_index = {block: i for i, block in enumerate(blocks)}
        tensors = TrainedTensors({}, {}, {})
        with torch.no_grad():
            for name in trained:
                theta = parameters[name]
                theta.copy_(base.read(name).to(torch.float32))  # θ₀ exactly as the merge reads it
                tensors.base[name] = theta.detach()
                tensors.task_vectors[name] = torch.stack(
                    [
                        model_reader.read(name).to(torch.float32) - tensors.base[name]
                        for model_reader in ctx.models
                    ]
                )
                tensors.blocks[name] = block_index[tensor_blocks[name]]
                if params.partitions > 1:
                    tensors.assignments[name] = partition_assignment(
                        tuple(theta.shape), params.partitions, tensor_seed(ctx.seed, name)
                    )
        train, held_out = self._data(ctx, params)
        settings = Settings(
            params.objective,
            params.steps,
            params.lr,
            params.weight_decay,
            params.grad_clip,
            params.batch_size,
            params.eval_every,
            ctx.seed,
        )
        start = torch.full(
            (len(ctx.models), len(blocks), params.partitions), params.init, dtype=torch.float64
        )
        result = learn(model, tensors, start, train, held_out, settings, ctx.note)
        if UNTRAINED in block_index:  # no gradient reached it, but weight decay did
            result.lam[:, block_index[UNTRAINED], :] = params.init
        table = CoefficientTable(
            models=list(ctx.model_refs or [str(m.path) for m in ctx.models]),
            granularity=params.blocks,
            partitions=params.partitions,
            blocks=blocks,
            values=result.lam.tolist(),
            tensor_blocks=tensor_blocks,
            seed=ctx.seed,
        )
        summary = {
            "objective": params.objective,
            "steps": params.steps,
            "best_step": result.best_step,
            "seconds": round(result.seconds, 2),
            "sequences": {
                "training": [len(t) for t in train],
                "held_out": [len(h) for h in held_out] if held_out else [],
            },
            "coefficients": int(result.lam.numel()),
            "trained_tensors": len(trained),
            "history": result.history,
        }
        return AtlasState(table, str(ctx.base_ref or base.path), result, summary)

    @staticmethod
    def _data(ctx: PrepareContext, params: AtlasParameters) -> tuple[list[Any], list[Any] | None]:
        """Each task's training and held-out sequences (tasks given the same data share one read)."""
        import json

        import torch

        from workbench_plugins.methods._data import input_batches
        from workbench_plugins.methods.atlas.training import sequences, split

        assert ctx.base is not None
        read: dict[str, Any] = {}
        train, held_out = [], []
        generator = torch.Generator().manual_seed(ctx.seed)
        for p in ctx.model_params:
            data = p.values.data
            key = json.dumps(data, sort_keys=True)
            if key not in read:
                read[key] = split(
                    sequences(
                        input_batches(
                            data,
                            params.samples,
                            ctx.seed,
                            ctx.base.path,
                            ctx.registry,
                            who="atlas",
                        )
                    ),
                    params.holdout,
                    generator,
                )
            train.append(read[key][0])
            held_out.append(read[key][1])
        return train, (held_out if all(h is not None for h in held_out) else None)

    def apply(
        self,
        tensors: list["torch.Tensor"],
        base: "torch.Tensor | None",
        params: MethodParameters,
        model_params: list[MethodParameters],
        ctx: TensorContext,
    ) -> "torch.Tensor":
        from workbench.checkpoint.coefficients import partition_assignment
        from workbench_kernels.weighted_sum import weighted_sum

        assert base is not None
        table: CoefficientTable = ctx.state.table
        values = [table.value(t, ctx.name) for t in range(len(tensors))]
        if table.partitions == 1:  # task arithmetic with per-tensor weights, computed exactly as it is
            coefficients = [v[0] for v in values]
            return weighted_sum(
                [base, *tensors], [1.0 - sum(coefficients), *coefficients], ctx.compute_dtype, ctx.out_dtype
            )
        import torch

        group = partition_assignment(tuple(base.shape), table.partitions, ctx.seed).long()
        base_c = base.to(ctx.compute_dtype)
        out = base_c.clone()
        for x, v in zip(tensors, values):
            out += torch.tensor(v, dtype=ctx.compute_dtype)[group] * (x.to(ctx.compute_dtype) - base_c)
        return out

    def write_extras(self, state: AtlasState, folder: Path) -> list[Path]:
        import json

        from workbench.checkpoint.coefficients import FOLDER
        from workbench.checkpoint.output_folder import final_folder

        written = state.table.write(folder / FOLDER, state.base_ref, final_folder(folder) / FOLDER)
        (folder / FOLDER / "training.json").write_text(json.dumps(state.summary, indent=1) + "\n")
        return [*written, folder / FOLDER / "training.json"]


#: The plugin API this module is written for (checked when the registry loads it).
WORKBENCH_API = "2.0"


@hookimpl
def register_methods(register: Callable[[type[MergeMethod]], None]) -> None:
    register(Atlas)
