"""Recipes: YAML files that say which models to merge, how, and where the result goes.

Native format::

    method: task_arithmetic
    base: ./models/base                 # optional; a path or org/name@revision
    models:
      - model: ./models/math
        parameters: {weight: 1.0}
      - ./models/code                   # shorthand: no per-model parameters
    # or, instead of models, layer ranges stacked in order (source i of every slice is model i):
    # slices:
    #   - sources: [{model: ./models/a, layer_range: [0, 6]}]
    #   - sources: [{model: ./models/a, layer_range: [2, 8]}]
    # with a base, each slice also names one range of it: the base of that slice's merge
    parameters: {lambda: 0.8}
    dtype: float32                      # compute dtype
    seed: 0                             # seeds random methods per tensor name
    output:
      path: ./merged                    # or `workbench run --out DIR`
      dtype: bfloat16                   # storage dtype (default: each input tensor's own)
      shard_size: 5GB
      copy_tokenizer_from: base         # base | <model index> | <path>
      push: {repo: org/name, private: true}  # optional: upload after a successful run
    tokenizer:                          # optional (docs/tokenizers.md)
      source: union                     # base | union | <model index> | <model reference> | <folder>
      tokens:                           # per-token rows, mergekit's `tokens:`
        "<|im_start|>": {source: 0}     # models[0]'s row wherever a model lacks the token
        "<|im_end|>": {source: {kind: zero}, force: true}   # zero in every model
        "<tool>": {source: {kind: model_token, model: base, token: "<unk>"}}
      pad_to_multiple_of: 64            # rows past the vocabulary: each model's mean row
      chat_template: chatml             # auto | alpaca | chatml | exaone | llama3 | mistral | a Jinja string
    evaluators: [zoo_copy]              # optional: scored on the output after the merge

Embedding and LM-head rows are merged **by token**: with a ``tokenizer`` section that gives
``source``, ``tokens`` or ``pad_to_multiple_of``, every model's rows are re-indexed to the output
vocabulary with mergekit's rules (a token a model lacks: its only donor's row, else the base's,
else the average of the models that have it, else zero). Without one, the output tokenizer is the
one ``output.copy_tokenizer_from`` names (default: the base, else the first model) and rows are
re-indexed to it only where the models' tokenizers differ (with a warning). ``tokenizer.source``
and ``output.copy_tokenizer_from`` must name the same tokenizer when both are given; a section with
only ``chat_template`` changes no rows.

A mergekit recipe (it has ``merge_method``) is translated on load; see
:mod:`workbench.recipe.mergekit`. Errors name the field path and the line of the YAML file
(see :mod:`workbench.recipe.sources`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from workbench.checkpoint.dtypes import FLOAT_CODES, code_from_name
from workbench.checkpoint.tokenizer_plan import TokenizerRequest
from workbench.errors import RecipeError
from workbench.recipe.mergekit import translate
from workbench.recipe.sources import (  # noqa: F401  (the recipe limits, also read from here)
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_VALUES,
    LocatedSource,
    format_path,
)
from workbench.recipe.strict import Strict
from workbench.recipe.tokenizer_section import TokenizerSection

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
#: Sizes count bytes: from 2**63 up they are typos (and as floats they may not even be finite).
_MAX_SIZE = 2**63 - 1


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("a size must be positive")
        if value > _MAX_SIZE:
            raise ValueError("a size must be below 2**63 bytes")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size (examples: 500MB, 2GB, 1GiB, 1000000)")
    unit = (match[2] or "").lower().removesuffix("b")
    scaled = float(match[1]) * _UNITS[unit]
    if not scaled <= _MAX_SIZE:  # also infinity, which int() cannot convert
        raise ValueError(f"'{value}' is too large for a size (below 2**63 bytes)")
    size = int(scaled)
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


class ModelEntry(Strict):
    model: str = Field(description="A local folder or file, or a Hub id 'org/name[@revision]'.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Per-model method parameters.")

    @field_validator("model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the model reference is empty")
        return value


class SliceSource(Strict):
    model: str = Field(description="A local folder or file, or a Hub id 'org/name[@revision]'.")
    layer_range: tuple[int, int] = Field(
        description="Layers [start, end) of this model (the end is exclusive, as in mergekit)."
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="Per-model method parameters.")

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class SliceEntry(Strict):
    sources: list[SliceSource] = Field(
        description="The models whose layer ranges are merged into this slice."
    )

    @field_validator("sources")
    @classmethod
    def _some_sources(cls, value: list[SliceSource]) -> list[SliceSource]:
        if not value:
            raise ValueError("a slice needs at least one source")
        return value


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PushSection(Strict):
    """Where ``workbench run`` uploads the output once it is complete (as ``workbench push`` would)."""

    repo: str = Field(description="Hub repo id 'org/name' (created if missing).")
    private: bool = Field(
        False, description="Create the repo private; refuse to push into an existing public repo."
    )
    revision: str | None = Field(None, description="Branch to push to (created from main if missing).")
    create_pr: bool = Field(
        False, description="Open a pull request against the default branch instead of committing."
    )

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO_ID.match(value) or ".." in value or value.endswith((".", "-")):
            raise ValueError(f"'{value}' is not a Hub repo id (org/name)")
        return value

    @model_validator(mode="after")
    def _pr_on_default_branch(self) -> "PushSection":
        if self.create_pr and self.revision not in (None, "main"):
            raise ValueError(
                "create_pr opens a pull request against the default branch; drop revision or create_pr"
            )
        return self


class OutputSection(Strict):
    path: str | None = Field(None, description="Output folder (overridden by --out).")
    dtype: str | None = Field(None, description="Storage dtype of float tensors; default: the input's.")
    shard_size: int | str = Field("5GB", description="Largest output shard, e.g. 2GB or 500MB.")
    copy_tokenizer_from: str | int | None = Field(
        None, description="Where config/tokenizer files come from: 'base', a model index, or a path."
    )
    format: str = Field("safetensors", description="Output checkpoint format.")
    push: PushSection | None = Field(
        None, description="Upload the output to the Hugging Face Hub after a successful run."
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and code_from_name(value) not in FLOAT_CODES:
            raise ValueError(f"the output dtype of float tensors must be a float type, got '{value}'")
        return value

    # "before": pydantic would otherwise turn `true` into the size 1 before this check sees it.
    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: int | str) -> int | str:
        parse_size(value)
        return value

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)


class EvaluatorSpec(Strict):
    name: str = Field(description="A registered evaluator (see `workbench eval --list`).")
    options: dict[str, Any] = Field(default_factory=dict, description="The evaluator's options.")


class Recipe(Strict):
    method: str = Field(description="A registered merge method (see `workbench methods`).")
    base: str | None = Field(None, description="Base model for task-vector methods.")
    models: list[ModelEntry] = Field(default_factory=list, description="The models to merge, in order.")
    slices: list[SliceEntry] | None = Field(
        None,
        description="Instead of models: layer ranges of models, stacked in order (each slice's sources are merged).",
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="Method parameters.")
    dtype: str = Field("float32", description="Compute dtype.")
    seed: int = Field(0, description="Seed for random methods (per tensor name).")
    memory_limit: int | str | None = Field(
        None,
        description=(
            "Most memory a whole-model method may hold, e.g. 16GB (default: the memory available when planning)."
        ),
    )
    output: OutputSection = Field(default_factory=OutputSection)
    tokenizer: TokenizerSection | None = Field(
        None, description="The output's tokenizer, token-aligned embeddings and chat template."
    )
    evaluators: list[EvaluatorSpec] = Field(default_factory=list, description="Evaluators run on the output.")

    #: Where the recipe came from (for messages); not part of the recipe itself.
    source: str | None = Field(None, exclude=True)
    _located: Any = PrivateAttr(None)
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def translation_notes(self) -> list[str]:
        """Warnings from translating a mergekit recipe (options it accepts that change nothing here),
        shown with the plan's warnings."""
        return self._notes

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), list):
            data = dict(data)
            data["models"] = [{"model": m} if isinstance(m, str) else m for m in data["models"]]
        if isinstance(data, dict) and isinstance(data.get("evaluators"), list):
            data = dict(data)
            data["evaluators"] = [{"name": e} if isinstance(e, str) else e for e in data["evaluators"]]
        return data

    @field_validator("models")
    @classmethod
    def _some_models(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        if not value:  # only when given: without 'models', 'slices' may stand in for it
            raise ValueError("at least one model is needed")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Recipe":
        if self.slices is not None and self.models:
            raise ValueError("give either 'models' or 'slices', not both")
        if self.slices is None and not self.models:
            raise ValueError("'models' is missing: at least one model is needed (or give 'slices')")
        if self.slices is not None:
            if not self.slices:
                raise ValueError("'slices' is empty: at least one slice is needed")
            for i, entry in enumerate(self.slices):
                bases = [s for s in entry.sources if s.model == self.base]
                if self.base is not None and len(bases) != 1:
                    raise ValueError(
                        f"slices[{i}] has {len(bases)} sources of the base '{self.base}': with a base, each "
                        "slice names exactly one range of it (the base of that slice's merge)"
                    )
            counts = {len(self.slice_models(i)) for i in range(len(self.slices))}
            if len(counts) > 1:
                raise ValueError(
                    f"every slice needs the same number of sources besides the base (found {sorted(counts)}): "
                    "source i of each slice is stacked into input model i"
                )
        return self

    def slice_models(self, index: int) -> list[SliceSource]:
        """The sources of slice ``index`` that are merged models, in order (all but the base's)."""
        assert self.slices is not None
        return [s for s in self.slices[index].sources if self.base is None or s.model != self.base]

    def slice_base(self, index: int) -> SliceSource | None:
        """The source of slice ``index`` that is the base's layer range (None without a base)."""
        assert self.slices is not None
        return next((s for s in self.slices[index].sources if s.model == self.base), None)

    @property
    def model_count(self) -> int:
        """Number of models the method merges (with slices: sources per slice, the base's aside)."""
        return len(self.slice_models(0)) if self.slices else len(self.models)

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_size(value)
        return value

    def tokenizer_request(self) -> TokenizerRequest:
        """What the planner needs of ``tokenizer`` and ``output.copy_tokenizer_from``."""
        copy_from = self.output.copy_tokenizer_from
        section = self.tokenizer
        if section is None:
            return TokenizerRequest(source=copy_from)
        own = section.source is not None
        return TokenizerRequest(
            source=section.source if own else copy_from,
            source_field=("tokenizer", "source") if own else ("output", "copy_tokenizer_from"),
            copy_from=copy_from if own else None,
            explicit=section.builds_vocabulary,
            tokens={token: entry.request() for token, entry in section.tokens.items()},
            pad_to_multiple_of=section.pad_to_multiple_of,
            chat_template=section.chat_template,
        )

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_size(self.memory_limit)

    @field_validator("dtype")
    @classmethod
    def _compute_dtype(cls, value: str) -> str:
        code = code_from_name(value)
        if code not in ("F32", "F64", "F16", "BF16"):
            raise ValueError(f"compute dtype must be a float type, got '{value}'")
        return value

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if self.slices is not None:
            del data["models"]
        return yaml.safe_dump(data, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading with located errors
# --------------------------------------------------------------------------------------------------


def _raise_validation(exc: ValidationError, source: LocatedSource, prefix: tuple[Any, ...] = ()) -> None:
    problems = []
    for error in exc.errors():
        loc = prefix + tuple(p for p in error["loc"] if p not in ("function-before", "function-after"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{source.where(loc)}: {message}")
    raise RecipeError("invalid recipe: " + "; ".join(problems) + ".")


def parse_recipe(text: str, name: str = "<recipe>") -> Recipe:
    """Parse recipe text (native or mergekit)."""
    source = LocatedSource(text, name)
    data = source.data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{name}: a recipe must be a YAML mapping (method, models, ...), got {type(data).__name__}."
        )
    notes: list[str] = []
    if "merge_method" in data:
        data = translate(data, source, notes)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, source)
    recipe.source = name
    recipe._located = source
    recipe._notes = notes
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        with path.open("rb") as handle:  # at most one byte past the cap: /dev/zero is not read whole
            raw = handle.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"recipe file {path} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few kilobytes."
            )
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe file {path} ({exc}).") from exc
    return parse_recipe(text, str(path))


def with_overrides(
    recipe: Recipe,
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    shard_size: str | None = None,
    memory_limit: str | None = None,
) -> Recipe:
    """The recipe with command-line overrides applied and validated like recipe values."""
    update: dict[str, Any] = {}
    output: dict[str, Any] = {}
    if dtype is not None:
        update["dtype"] = dtype
    if memory_limit is not None:
        update["memory_limit"] = memory_limit
    if out_dtype is not None:
        output["dtype"] = out_dtype
    if shard_size is not None:
        output["shard_size"] = shard_size
    if not update and not output:
        return recipe
    data = recipe.model_dump()
    data.update(update)
    data["output"].update(output)
    try:
        new = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{format_path(tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise RecipeError(f"invalid command-line override: {problems}.") from None
    new.source = recipe.source
    new._located = recipe._located
    new._notes = recipe._notes
    return new


def located(recipe: Recipe) -> LocatedSource | None:
    """The YAML source a recipe was parsed from, when it came from text."""
    return recipe._located
