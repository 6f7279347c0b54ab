"""The output tensors of an MoE, each with the input tensors it is made of, planned from headers alone.

Planning reads no tensor data, so every problem with the inputs (a missing tensor, an expert of another
shape, a base with attention biases Mixtral cannot hold) is reported before the routers are computed
or anything is written. Writing then walks this plan one piece at a time: a fused expert tensor is
streamed expert by expert, so memory holds one input tensor, never a whole layer of experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.base import CheckpointReader, TensorSpec
from workbench.errors import CheckpointError
from workbench.method import tensor_seed
from workbench.moe.architectures import MIXTRAL, QWEN2_MOE, QWEN3_MOE, Architecture
from workbench.moe.config import Expert

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_PROJECTIONS = tuple(f"self_attn.{p}_proj.weight" for p in "qkvo")
_QKV_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")
_O_BIAS = "self_attn.o_proj.bias"
_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
#: Base tensors that are recomputed by transformers, never read: dropped without a word.
_DERIVED = ("rotary_emb.inv_freq",)


@dataclass
class Input:
    """One opened input model: where the config names it, and its lazy reader."""

    ref: str
    label: str  # the config field: 'base_model', 'experts[1].source_model'
    path: Path
    reader: CheckpointReader
    field: tuple[Any, ...] = ()  # the same as a path into the YAML, for located messages

    def __str__(self) -> str:
        return f"{self.label} ({self.ref})"


@dataclass(frozen=True)
class Piece:
    """A contiguous part of an output tensor: an input tensor (with its expert's noise and scale), a
    block of router rows, or zeros (Qwen2-MoE's attention biases for a base without them)."""

    source: Input | None = None
    name: str | None = None
    expert: Expert | None = None
    residual: bool = False  # a down_proj: residual_scale applies
    seed: int = 0
    gate_rows: tuple[int, int, int] | None = None  # (layer, first row, end row) of the gate vectors
    zeros: tuple[int, ...] | None = None

    @property
    def nbytes_read(self) -> int:
        return self.source.reader.info(self.name).nbytes if self.source and self.name else 0


@dataclass(frozen=True)
class OutputTensor:
    spec: TensorSpec
    pieces: tuple[Piece, ...]


@dataclass
class Layout:
    """Everything the output is made of, and the shapes its config.json states."""

    tensors: list[OutputTensor]
    layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    gate_dtype: str  # dtype of the router tensors
    warnings: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)


def _require(model: Input, name: str) -> tuple[int, ...]:
    if name not in model.reader:
        raise CheckpointError(f"{model}: tensor '{name}' is missing from {model.path}.")
    return model.reader.info(name).shape


def layer_count(model: Input) -> int:
    layers = {int(m[1]) for n in model.reader.tensor_names() if (m := _LAYER.match(n))}
    if not layers:
        raise CheckpointError(
            f"{model}: no tensors named model.layers.N.* in {model.path}; a Llama-style decoder is expected."
        )
    return max(layers) + 1


def _attention(architecture: Architecture, base: Input, layer: int) -> list[str]:
    """The base's per-layer tensors the output keeps, checked against what the architecture holds."""
    prefix = f"model.layers.{layer}."
    present = {n.removeprefix(prefix) for n in base.reader.tensor_names() if n.startswith(prefix)}
    wanted = [*_NORMS[:1], *_PROJECTIONS]
    if architecture is QWEN3_MOE:
        wanted += list(_QK_NORMS)
    for suffix in wanted + [_NORMS[1]]:
        _require(base, prefix + suffix)
    biases = [b for b in (*_QKV_BIASES, _O_BIAS) if b in present]
    if architecture is MIXTRAL and biases:
        raise CheckpointError(
            f"{base}: '{prefix}{biases[0]}' is an attention bias, which Mixtral does not have (mergekit "
            "drops it silently, changing the model); use `architecture: qwen` with a shared expert, or a "
            "base without attention biases."
        )
    if architecture is QWEN2_MOE and _O_BIAS in present:
        raise CheckpointError(f"{base}: '{prefix}{_O_BIAS}': Qwen2-MoE has no bias on o_proj.")
    qkv_biases = [b for b in _QKV_BIASES if b in present]
    o_bias = [_O_BIAS] if _O_BIAS in present else []
    qk_norms = list(_QK_NORMS) if architecture is QWEN3_MOE else []
    return [_NORMS[0], *_PROJECTIONS[:3], *qkv_biases, _PROJECTIONS[3], *o_bias, *qk_norms]


def _mlp_shapes(model: Input, layer: int) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{layer}.mlp."
    for bias in (f"{prefix}{p}.bias" for p in MLP_PARTS):
        if bias in model.reader:
            raise CheckpointError(f"{model}: '{bias}' is an MLP bias, which MoE experts do not have.")
    return {part: _require(model, f"{prefix}{part}.weight") for part in MLP_PARTS}


def plan_layout(
    architecture: Architecture,
    base: Input,
    experts: list[tuple[Input, Expert]],
    shared: list[tuple[Input, Expert]],
    *,
    out_dtype: str | None,
    per_expert: bool,
    seed: int,
    tied_embeddings: bool,
) -> Layout:
    """The output tensors in order (embeddings, then per layer attention, router and experts, then the
    final norm and LM head), checking every input's names and shapes on the way."""
    layers = layer_count(base)
    vocab, hidden = _require(base, "model.embed_tokens.weight")
    reference = _mlp_shapes(base, 0) if f"model.layers.0.mlp.{MLP_PARTS[0]}.weight" in base.reader else None
    for model, _ in [*experts, *shared]:
        count = layer_count(model)
        if count != layers:
            raise CheckpointError(
                f"{model} has {count} layers, the base has {layers}; experts must match it."
            )
        shapes = _mlp_shapes(model, 0)
        if reference is None:
            reference = shapes
        if shapes != reference:
            part = next(p for p in MLP_PARTS if shapes[p] != reference[p])
            raise CheckpointError(
                f"{model}: 'model.layers.0.mlp.{part}.weight' has shape {list(shapes[part])}, but "
                f"{list(reference[part])} is expected (the base's, or the first expert's); every expert must "
                "be a fine-tune of the base, with its shapes."
            )
    assert reference is not None
    intermediate = reference["gate_proj"][0]
    if reference["gate_proj"][1] != hidden:
        raise CheckpointError(
            f"{base}: the MLP takes {reference['gate_proj'][1]} features but the embeddings have {hidden}."
        )
    gate_dtype = out_dtype or base.reader.info("model.embed_tokens.weight").dtype
    tensors: list[OutputTensor] = []
    warnings: list[str] = []

    def dtype_of(piece: Piece) -> str:
        if out_dtype is not None:
            return out_dtype
        if piece.source is not None and piece.name is not None:
            return piece.source.reader.info(piece.name).dtype
        return gate_dtype

    def add(name: str, shape: tuple[int, ...], pieces: list[Piece]) -> None:
        tensors.append(OutputTensor(TensorSpec(name, dtype_of(pieces[0]), shape), tuple(pieces)))

    def copy(name: str) -> None:
        add(name, base.reader.info(name).shape, [Piece(base, name)])

    def expert_piece(model: Input, expert: Expert, layer: int, part: str, out_name: str, index: int) -> Piece:
        name = f"model.layers.{layer}.mlp.{part}.weight"
        _require(model, name)
        shape = model.reader.info(name).shape
        if shape != reference[part]:
            raise CheckpointError(
                f"{model}: '{name}' has shape {list(shape)}, expected {list(reference[part])}."
            )
        return Piece(
            model,
            name,
            expert,
            residual=part == "down_proj",
            seed=tensor_seed(seed, f"{out_name}#{index}"),
        )

    copy("model.embed_tokens.weight")
    count = len(experts)
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        suffixes = _attention(architecture, base, layer)
        for suffix in suffixes:
            copy(prefix + suffix)
        if architecture is QWEN2_MOE:  # Qwen2-MoE always has q/k/v biases: zeros where the base has none
            for bias in _QKV_BIASES:
                if bias not in suffixes:
                    rows = base.reader.info(prefix + bias.replace(".bias", ".weight")).shape[0]
                    add(prefix + bias, (rows,), [Piece(zeros=(rows,))])
        copy(prefix + _NORMS[1])
        add(
            architecture.router_name(layer, per_expert), (count, hidden), [Piece(gate_rows=(layer, 0, count))]
        )
        if per_expert:
            for e, (model, expert) in enumerate(experts):
                for part in MLP_PARTS:
                    out = architecture.expert_name(layer, e, part)
                    piece = expert_piece(model, expert, layer, part, out, e)
                    add(out, reference[part], [piece])
        else:
            gate_up, down = architecture.fused_names(layer)
            pieces = [
                expert_piece(model, expert, layer, part, gate_up, e)
                for e, (model, expert) in enumerate(experts)
                for part in ("gate_proj", "up_proj")
            ]
            add(gate_up, (count, 2 * intermediate, hidden), pieces)
            downs = [
                expert_piece(model, expert, layer, "down_proj", down, e)
                for e, (model, expert) in enumerate(experts)
            ]
            add(down, (count, hidden, intermediate), downs)
        if architecture.shared_expert:
            model, expert = shared[0]
            *parts, gate = architecture.shared_names(layer)
            for part, out in zip(MLP_PARTS, parts):
                add(out, reference[part], [expert_piece(model, expert, layer, part, out, 0)])
            add(gate, (1, hidden), [Piece(gate_rows=(layer, count, count + 1))])
    copy("model.norm.weight")
    if "lm_head.weight" in base.reader:
        copy("lm_head.weight")
    elif not tied_embeddings:
        raise CheckpointError(
            f"{base}: 'lm_head.weight' is missing and its config.json does not tie it to the embeddings "
            "(tie_word_embeddings)."
        )
    kept = {t.spec.name for t in tensors}
    dropped = [
        n
        for n in base.reader.tensor_names()
        if n not in kept
        and n not in _GLOBAL
        and not n.endswith(_DERIVED)
        and not ((m := _LAYER.match(n)) and m[2].startswith("mlp."))
    ]
    if dropped:
        warnings.append(
            f"{base}: {len(dropped)} tensor(s) the {architecture.name} output has no place for are left out "
            f"(first: '{dropped[0]}')."
        )
    return Layout(tensors, layers, hidden, intermediate, vocab, gate_dtype, warnings)


def materialize(piece: Piece, gates: "torch.Tensor | None", dtype: "torch.dtype") -> "torch.Tensor":
    """The values of one piece in the output dtype. An expert's noise (seeded per output tensor and
    expert, so a run is reproducible) and residual scale are applied in float32 and rounded once."""
    import torch

    if piece.zeros is not None:
        return torch.zeros(piece.zeros, dtype=dtype)
    if piece.gate_rows is not None:
        assert gates is not None, "router rows are requested before the routers were computed"
        layer, start, stop = piece.gate_rows
        return gates[layer, start:stop].to(dtype)
    assert piece.source is not None and piece.name is not None
    tensor = piece.source.reader.read(piece.name)
    expert = piece.expert
    scale = expert.residual_scale if expert is not None and piece.residual else None
    if expert is None or (expert.noise_scale is None and scale is None):
        return tensor.to(dtype)
    value = tensor.float()
    if expert.noise_scale is not None:
        generator = torch.Generator().manual_seed(piece.seed)
        value = value + torch.randn(value.shape, generator=generator) * expert.noise_scale
    if scale is not None:
        value = value * scale
    return value.to(dtype)
