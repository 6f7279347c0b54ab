"""Model cards (and, later, uploads) for the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.resolve import looks_like_hub_id

if TYPE_CHECKING:
    from workbench.plan import MergePlan

PROJECT_URL = "https://github.com/merge-workbench/merge-workbench"


def card_text(plan: "MergePlan", recipe_yaml: str, title: str) -> str:
    """README.md for a merged model: Hub metadata front matter, the method, the inputs, the recipe."""
    from huggingface_hub import ModelCardData

    refs = [m.ref for m in plan.inputs]
    hub_refs = [r.partition("@")[0] for r in refs if looks_like_hub_id(r) and not Path(r).exists()]
    method = plan.method
    data = ModelCardData(
        base_model=sorted(set(hub_refs)) or None,
        library_name="transformers",
        tags=["merge", "merge-workbench", method.name],
    )
    paper = f" ([paper]({method.paper}))" if method.paper else ""
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge made with [Merge Workbench]({PROJECT_URL}) using the **{method.name}** method{paper}:",
        f"{method.summary}",
        "",
        "## Inputs",
        "",
    ]
    for model in plan.inputs:
        params = f" with parameters `{model.parameters}`" if model.parameters else ""
        lines.append(f"- {model.label}: `{model.ref}`{params}")
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
