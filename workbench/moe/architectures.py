"""The sparse architectures an MoE is written as: which one a config gets, its tensor names, its config.json.

mergekit-moe 0.1.5 tries its output architectures in order (Mixtral, DeepSeek MoE, Qwen MoE, Qwen3 MoE),
keeps those that support the inputs, prefers Mixtral, and otherwise takes the first. The same rule is
applied here, so a config gets the architecture it gets from mergekit; DeepSeek MoE (shared experts
without gates) needs DeepSeek's remote modeling code and is refused by name instead of written.

Expert tensors are written in the layout transformers 5 holds in memory (``mlp.experts.gate_up_proj``
of shape ``[experts, 2 * intermediate, hidden]`` with each expert's gate rows before its up rows, and
``mlp.experts.down_proj`` ``[experts, hidden, intermediate]``), as mergekit 0.1.5 writes them: it loads
with no conversion. ``per_expert`` writes the classic layout instead (``block_sparse_moe.experts.{e}.w1``
for Mixtral, ``mlp.experts.{e}.gate_proj`` for Qwen), which transformers 4, vLLM and llama.cpp's
converter read and transformers 5 converts while loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.checkpoint.dtypes import torch_name
from workbench.errors import RecipeError
from workbench.moe.config import RANDOM_MODES, LoadedConfig


@dataclass(frozen=True)
class Architecture:
    """One output architecture (``name`` as mergekit spells it, matched by the config's ``architecture``)."""

    name: str
    class_name: str
    model_type: str
    #: ``model_type`` values of the inputs it is built from.
    inputs: tuple[str, ...]
    #: The expert keys of the MLP modules: (gate, up, down) in the per-expert layout.
    expert_keys: tuple[str, str, str]

    @property
    def shared_expert(self) -> bool:
        return self.model_type == "qwen2_moe"

    @property
    def moe_module(self) -> str:
        """The per-layer module of the classic layout (transformers 5 renames Mixtral's to ``mlp``)."""
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    def router_name(self, layer: int, per_expert: bool) -> str:
        module = self.moe_module if per_expert else "mlp"
        return f"model.layers.{layer}.{module}.gate.weight"

    def fused_names(self, layer: int) -> tuple[str, str]:
        """(gate_up_proj, down_proj) of the fused layout."""
        prefix = f"model.layers.{layer}.mlp.experts"
        return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"

    def expert_name(self, layer: int, expert: int, part: str) -> str:
        """The per-expert tensor of ``part`` (gate_proj, up_proj or down_proj) in the classic layout."""
        key = self.expert_keys[("gate_proj", "up_proj", "down_proj").index(part)]
        return f"model.layers.{layer}.{self.moe_module}.experts.{expert}.{key}.weight"

    def shared_names(self, layer: int) -> tuple[str, str, str, str]:
        """(gate_proj, up_proj, down_proj, shared_expert_gate) of Qwen2-MoE's shared expert."""
        prefix = f"model.layers.{layer}.mlp"
        parts = tuple(f"{prefix}.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
        return (*parts, f"{prefix}.shared_expert_gate.weight")  # type: ignore[return-value]


MIXTRAL = Architecture("Mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), ("w1", "w3", "w2"))
QWEN2_MOE = Architecture(
    "Qwen MoE",
    "Qwen2MoeForCausalLM",
    "qwen2_moe",
    ("llama", "mistral", "qwen2"),
    ("gate_proj", "up_proj", "down_proj"),
)
QWEN3_MOE = Architecture(
    "Qwen3 MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), ("gate_proj", "up_proj", "down_proj")
)
#: mergekit's order of ALL_OUTPUT_ARCHITECTURES; None stands for DeepSeek MoE, which is not written here.
_ORDER: tuple[tuple[str, Architecture | None], ...] = (
    ("Mixtral", MIXTRAL),
    ("DeepSeek MoE", None),
    ("Qwen MoE", QWEN2_MOE),
    ("Qwen3 MoE", QWEN3_MOE),
)


def _refusal(name: str, loaded: LoadedConfig, model_types: list[str]) -> str | None:
    """Why the output architecture ``name`` cannot take this config (mergekit's ``supports_config``)."""
    config = loaded.config
    shared = config.shared_experts or []
    kinds = sorted(set(model_types))
    if name == "Mixtral":
        if shared:
            return "Mixtral has no shared experts"
        if len(kinds) != 1 or kinds[0] not in MIXTRAL.inputs:
            return "Mixtral is built from Llama or Mistral models, all of one type"
    elif name == "DeepSeek MoE":
        if len(shared) > 1:
            return "DeepSeek MoE has at most one shared expert"
        if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
            return "DeepSeek MoE does not gate its shared expert"
        if len(kinds) != 1 or kinds[0] not in ("llama", "mistral"):
            return "DeepSeek MoE is built from Llama or Mistral models, all of one type"
    elif name == "Qwen MoE":
        if len(shared) != 1:
            return "Qwen MoE needs exactly one shared expert"
        if config.gate_mode not in RANDOM_MODES and not shared[0].positive_prompts:
            return "Qwen MoE gates its shared expert, which needs positive_prompts"
        if len(kinds) != 1 or kinds[0] not in QWEN2_MOE.inputs:
            return "Qwen MoE is built from Qwen2, Llama or Mistral models, all of one type"
    elif name == "Qwen3 MoE":
        if shared:
            return "Qwen3 MoE has no shared experts"
        if kinds != ["qwen3"]:
            return "Qwen3 MoE is built from Qwen3 models only"
    return None


def select_architecture(loaded: LoadedConfig, model_types: list[str]) -> Architecture:
    """The output architecture mergekit-moe picks for this config and these inputs' ``model_type``s."""
    config = loaded.config
    names = [name for name, _ in _ORDER]
    candidates = list(_ORDER)
    if config.architecture:
        wanted = config.architecture.lower()
        candidates = [(n, a) for n, a in candidates if n.lower().startswith(wanted)]
        if not candidates:
            raise loaded.fail(
                ("architecture",),
                f"no output architecture is called '{config.architecture}' (known: {', '.join(names)}).",
            )
    reasons = {name: _refusal(name, loaded, model_types) for name, _ in candidates}
    fitting = [(n, a) for n, a in candidates if reasons[n] is None]
    if not fitting:
        why = "; ".join(f"{n}: {r}" for n, r in reasons.items())
        raise RecipeError(
            f"{loaded.where('base_model')}: no output architecture fits these inputs (model types "
            f"{', '.join(sorted(set(model_types)))}; {why})."
        )
    name, architecture = next(((n, a) for n, a in fitting if n == "Mixtral"), fitting[0])
    if architecture is None:
        others = [n for n, _ in fitting if n != name]
        hint = (
            f" Set `architecture: {others[0].split()[0].lower()}` to get {others[0]} instead."
            if others
            else ""
        )
        raise RecipeError(
            f"{loaded.where('shared_experts')}: mergekit writes this config as {name} (an ungated shared "
            "expert), which needs DeepSeek's remote modeling code (trust_remote_code); workbench does not "
            f"write it.{hint}"
        )
    return architecture


#: Defaults of the input families for the keys whose defaults differ in the output families (Mixtral
#: assumes rope_theta 1e6 and 8 key/value heads): a config that leaves them out keeps its meaning.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "num_attention_heads": 32},
    "mistral": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "qwen2": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "qwen3": {
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
#: Keys a config of the input describes that the output does not have (or sets itself).
_DROPPED = ("architectures", "auto_map", "transformers_version", "_name_or_path", "model_type")


def output_config(
    architecture: Architecture,
    base: dict[str, Any],
    *,
    experts: int,
    experts_per_token: int,
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    vocab_size: int,
    out_dtype: str | None,
) -> dict[str, Any]:
    """config.json of the output: the base's config with the MoE keys mergekit sets (and the shapes
    measured from the tensors, which win over a config that disagrees with its own weights)."""
    family = str(base.get("model_type"))
    data = {k: v for k, v in base.items() if k not in _DROPPED}
    for key, value in _FAMILY_DEFAULTS.get(family, {}).items():
        data.setdefault(key, value)
    data.setdefault("num_key_value_heads", data["num_attention_heads"])
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if "rope_theta" not in data and not (isinstance(rope, dict) and "rope_theta" in rope):
        data["rope_theta"] = 10000.0  # every input family's default; Mixtral's own is 1e6
    data.update(
        architectures=[architecture.class_name],
        model_type=architecture.model_type,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        num_experts_per_tok=experts_per_token,
        output_router_logits=False,
        router_aux_loss_coef=data.get("router_aux_loss_coef", 0.001),
    )
    if architecture is MIXTRAL:
        data.update(num_local_experts=experts, sliding_window=None, router_jitter_noise=0.0)
    else:
        data.update(
            num_experts=experts,  # transformers 4's name; 5 maps it onto num_local_experts for Qwen3-MoE
            decoder_sparse_step=1,
            norm_topk_prob=True,
            moe_intermediate_size=intermediate_size,
            mlp_only_layers=[],
        )
        if architecture is QWEN3_MOE:
            data["num_local_experts"] = experts  # transformers 5's field (it writes this name)
        if architecture is QWEN2_MOE:
            data.update(
                shared_expert_intermediate_size=intermediate_size,
                sliding_window=None,
                use_sliding_window=False,
                qkv_bias=True,
            )
    if out_dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "torch_dtype":
                data[key] = torch_name(out_dtype)
    return data
