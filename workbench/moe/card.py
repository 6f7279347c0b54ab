"""The model card of an MoE output: README.md with Hub metadata, the experts and the config it was built from.

mergekit-moe writes no card (a TODO in its code); this one follows the card of ``workbench run``
(:mod:`workbench.engine.card`): front matter with ``library_name``, ``tags`` and, for Hub inputs,
``base_model`` with ``base_model_relation: merge``; an ``## Inputs`` section; the configuration under
``## Recipe``, verbatim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.engine.card import PROJECT_URL, hub_repo

if TYPE_CHECKING:
    from workbench.moe.architectures import Architecture
    from workbench.moe.config import LoadedConfig


def _source(ref: str) -> str:
    from workbench.checkpoint.hub_client import endpoint

    repo = hub_repo(ref)
    return f"[`{ref}`]({endpoint()}/{repo})" if repo else f"`{ref}`"


def moe_card(loaded: LoadedConfig, architecture: Architecture, title: str) -> str:
    """README.md for an MoE built from ``loaded``."""
    from huggingface_hub import ModelCardData

    config = loaded.config
    refs = [config.base_model, *(e.source_model for e in config.all_experts)]
    hub_refs = sorted({repo for repo in map(hub_repo, refs) if repo})
    data = ModelCardData(
        base_model=hub_refs or None,
        base_model_relation="merge" if hub_refs else None,
        library_name="transformers",
        tags=["merge", "merge-workbench", "moe", architecture.model_type],
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {title}",
        "",
        f"A {architecture.name} mixture of experts ({architecture.class_name}) made with "
        f"[Merge Workbench]({PROJECT_URL}) (`workbench moe`, the counterpart of mergekit-moe): attention, "
        f"norms, embeddings and LM head come from the base model, each expert's MLP from a dense model, "
        f"and the routers were set with gate_mode `{config.gate_mode}`; {config.experts_per_token} "
        "expert(s) per token.",
        "",
        "## Inputs",
        "",
        f"- base: {_source(config.base_model)}",
    ]
    for i, expert in enumerate(config.experts):
        lines.append(f"- expert {i}: {_source(expert.source_model)}")
    for i, expert in enumerate(config.shared_experts or []):
        lines.append(f"- shared expert {i}: {_source(expert.source_model)}")
    lines += ["", "## Recipe", "", "```yaml", loaded.text.rstrip(), "```", ""]
    return "\n".join(lines)
