"""The model card: written into every output as README.md, and checked before a push uploads it.

This module is the one place that knows what the card holds: Hub metadata (``base_model`` with
``base_model_relation: merge``, ``library_name``, ``tags``), the method with links to its paper and
its page, the input sources (Hub inputs with the commit they were read at), and the recipe.
``check_card`` refuses a card that lost any of that, before anything is sent to the Hub.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.checkpoint.hub_client import HubError
from workbench.checkpoint.resolve import is_hub_reference

if TYPE_CHECKING:
    from workbench.engine.plan import MergePlan
    from workbench.recipe.schema import Recipe

PROJECT_URL = "https://github.com/merge-workbench/merge-workbench"
CARD_FILE = "README.md"
REQUIRED_SECTIONS = ("## Inputs", "## Recipe")
_RECIPE_BLOCK = re.compile(r"^## Recipe\s*\n+```yaml\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def recipe_references(recipe: Recipe) -> list[str]:
    """Every model reference of a recipe, in order: base, models, every slice source."""
    refs = [recipe.base] if recipe.base else []
    refs += [entry.model for entry in recipe.models]
    refs += [source.model for piece in recipe.slices or [] for source in piece.sources]
    return list(dict.fromkeys(refs))


def hub_repo(ref: str) -> str | None:
    """The Hub repo id a reference reads from (``org/name`` of ``org/name@rev[+adapter]``), else None."""
    base = ref.split("+")[0]
    return base.partition("@")[0] if is_hub_reference(base) else None


def _source(ref: str, path: Path | None) -> str:
    """How the card names an input: a Hub input links to its repo at the commit that was read."""
    from workbench.checkpoint.hub_client import endpoint
    from workbench.checkpoint.remote import hub_commit

    repo = hub_repo(ref)
    if repo is None:
        return f"`{ref}`"
    commit = hub_commit(path) if path is not None else None
    if commit:
        return f"[`{ref}`]({endpoint()}/{repo}/tree/{commit}) (commit `{commit}`)"
    return f"[`{ref}`]({endpoint()}/{repo})"


def card_text(plan: MergePlan, recipe_yaml: str, title: str) -> str:
    """README.md for a merged model: Hub metadata front matter, the method, the inputs, the recipe."""
    from huggingface_hub import ModelCardData

    refs = recipe_references(plan.recipe)
    hub_refs = sorted({repo for repo in map(hub_repo, refs) if repo})
    method = plan.method
    data = ModelCardData(
        base_model=hub_refs or None,
        base_model_relation="merge" if hub_refs else None,
        library_name="transformers",
        tags=["merge", "merge-workbench", method.name],
    )
    links = [f"[paper]({method.paper})"] if method.paper else []
    if method.__module__.startswith("workbench_plugins"):
        links.append(f"[method page]({PROJECT_URL}/blob/main/docs/methods/{method.name}.md)")
    linked = f" ({', '.join(links)})" if links else ""
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# {title}",
        "",
        f"This model is a merge made with [Merge Workbench]({PROJECT_URL}) using the **{method.name}** method{linked}:",
        f"{method.summary}",
        "",
        "## Inputs",
        "",
    ]
    paths = {model.ref: model.path for model in plan.inputs}
    for model in plan.inputs:
        params = f" with parameters `{model.parameters}`" if model.parameters else ""
        lines.append(f"- {model.label}: {_source(model.ref, model.path)}{params}")
    for ref in refs:  # slice sources beyond the first of each input
        if ref not in paths:
            lines.append(f"- slice source: {_source(ref, None)}")
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def check_card(folder: Path) -> dict[str, Any]:
    """Parse ``folder/README.md`` as a Hub model card and check the fields a merge card must have;
    returns its metadata. Raises ``HubError`` naming the problem, so a push stops before uploading."""
    import yaml
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = folder / CARD_FILE
    where = f"model card {path}"
    if not path.is_file():
        raise HubError(
            f"{folder} has no {CARD_FILE} model card; `workbench run` writes one into every output."
        )
    try:
        card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=False)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise HubError(
            f"{where}: the metadata block (between the '---' lines) is not valid: {exc}."
        ) from None
    data = card.data.to_dict()
    if not data:
        raise HubError(
            f"{where} has no metadata block ('---' lines with library_name, tags, base_model at the top)."
        )
    library = data.get("library_name")
    if not isinstance(library, str) or not library.strip():
        raise HubError(
            f"{where}: metadata field 'library_name' is missing or empty (it tells the Hub how to load the model)."
        )
    tags = data.get("tags")
    if not isinstance(tags, list) or "merge" not in tags:
        raise HubError(f"{where}: metadata field 'tags' must be a list that includes 'merge' (got {tags!r}).")
    base = data.get("base_model")
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        if not isinstance(bases, list) or not bases:
            raise HubError(
                f"{where}: metadata field 'base_model' must be a Hub repo id or a list of them (got {base!r})."
            )
        for repo in bases:
            try:
                validate_repo_id(str(repo))
            except HFValidationError as exc:
                raise HubError(f"{where}: base_model entry {repo!r} is not a Hub repo id ({exc}).") from None
        if data.get("base_model_relation") != "merge":
            raise HubError(
                f"{where}: a merge that names base_model needs 'base_model_relation: merge' (got "
                f"{data.get('base_model_relation')!r})."
            )
    for section in REQUIRED_SECTIONS:
        if not re.search(rf"^{re.escape(section)}\s*$", card.text, re.MULTILINE):
            raise HubError(
                f"{where} has no '{section}' section (the inputs and the recipe belong on the card)."
            )
    block = _RECIPE_BLOCK.search(card.text)
    try:
        recipe = yaml.safe_load(block[1]) if block else None
    except yaml.YAMLError:
        recipe = None
    # a merge recipe names its method; a `workbench moe` config its base and experts
    if not isinstance(recipe, dict) or not ("method" in recipe or {"base_model", "experts"} <= recipe.keys()):
        raise HubError(
            f"{where}: the '## Recipe' section must hold the recipe as a ```yaml block with its method "
            "(or, for a mixture of experts, its base_model and experts)."
        )
    return data
