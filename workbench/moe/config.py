"""The mergekit-moe configuration file, read unchanged and checked with the line of every problem.

mergekit 0.1.5's ``MoEMergeConfig`` is the contract: ``base_model``, ``experts`` (``source_model``,
``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``), ``gate_mode``,
``dtype``, ``experts_per_token``, ``shared_experts`` and ``architecture``. Every key carries over with
mergekit's meaning and default. mergekit's pydantic models ignore unknown keys, so a typo there
(``expert_per_token``) silently falls back to a default; here an unknown key is an error naming its
line. The checks mergekit runs before building (``is_bad_config``) run here too, before any tensor is
read, and also name the field and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workbench.checkpoint.dtypes import FLOAT_CODES, code_from_name
from workbench.errors import RecipeError
from workbench.recipe.sources import MAX_RECIPE_BYTES, LocatedSource

GateMode = Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"]
#: Gate modes that need no prompts (routers for training afterwards, "sparse upcycling").
RANDOM_MODES = frozenset({"random", "uniform_random"})
#: Gate modes that run the base model through transformers.
HIDDEN_MODES = frozenset({"hidden", "hidden_avg", "hidden_last"})
#: The flag mergekit-moe (and ``workbench moe``) takes to build from identical experts anyway.
ALLOW_SAME_FLAG = "--i-understand-this-is-not-useful-without-training"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def model_reference(value: Any) -> Any:
    """A mergekit model reference as one string: ``path[@revision][+lora]`` is kept; the mapping form
    (``{model: {path, revision}, lora: ...}``) is written the same way. ``override_architecture`` would
    change how the model is read, which the readers here do not do: it is refused by name."""
    if isinstance(value, str) or not isinstance(value, dict):
        return value
    if "override_architecture" in value:
        raise ValueError("override_architecture is not supported (the model's own config.json is used)")
    unknown = sorted(set(value) - {"model", "lora"}, key=str)
    if unknown:
        raise ValueError(f"unknown field '{unknown[0]}' in a model reference (use model and lora)")

    def path(part: Any) -> str:
        if isinstance(part, str):
            return part
        if isinstance(part, dict) and isinstance(part.get("path"), str) and set(part) <= {"path", "revision"}:
            revision = part.get("revision")
            return f"{part['path']}@{revision}" if revision else part["path"]
        raise ValueError("expected a model path (a string, or {path: ..., revision: ...})")

    text = path(value.get("model"))
    return f"{text}+{path(value['lora'])}" if value.get("lora") else text


class Expert(_Strict):
    """A dense model whose MLP becomes one expert of every layer (or the shared expert)."""

    source_model: str = Field(description="The expert's model: a folder, a Hub id, or BASE+ADAPTER.")
    positive_prompts: list[str] | None = Field(
        None, description="Prompts that should be routed to this expert (needed unless gates are random)."
    )
    negative_prompts: list[str] | None = Field(
        None, description="Prompts whose hidden states are subtracted from the positive ones."
    )
    noise_scale: float | None = Field(
        None, description="Standard deviation of Gaussian noise added to this expert's MLP weights."
    )
    residual_scale: float | None = Field(
        None, description="Factor on this expert's down_proj (its contribution to the residual stream)."
    )

    @field_validator("source_model", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        return model_reference(value)

    @field_validator("source_model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the model reference is empty")
        return value


class MoEConfig(_Strict):
    """A mergekit-moe configuration (mergekit 0.1.5 ``MoEMergeConfig``), keys and defaults unchanged."""

    base_model: str = Field(
        description="Donor of attention, norms, embeddings and LM head; runs the prompts for hidden gates."
    )
    experts: list[Expert] = Field(description="One routed expert per entry, in order.")
    gate_mode: GateMode = Field(
        "hidden",
        description=(
            "How routers are set: hidden states of the prompts (hidden = last token, hidden_avg = mean "
            "over tokens), cheap_embed (prompt token embeddings), random or uniform_random."
        ),
    )
    dtype: str | None = Field(None, description="Output dtype; default: the base config's torch_dtype.")
    experts_per_token: int = Field(2, description="Experts each token is routed to (top-k).")
    shared_experts: list[Expert] | None = Field(
        None, description="Experts every token passes through (Qwen2-MoE output: exactly one)."
    )
    architecture: str | None = Field(
        None, description="Output architecture by name prefix: mixtral, qwen (Qwen MoE) or qwen3."
    )

    @field_validator("base_model", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> Any:
        return model_reference(value)

    @field_validator("base_model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the model reference is empty")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            code = code_from_name(value.removeprefix("torch."))
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if code not in FLOAT_CODES or code.startswith("F8"):
            raise ValueError(f"the output dtype must be bfloat16, float16, float32 or float64, got '{value}'")
        return value

    @property
    def dtype_code(self) -> str | None:
        """The safetensors code of ``dtype`` ('BF16'), or None to follow the base config."""
        return None if self.dtype is None else code_from_name(self.dtype.removeprefix("torch."))

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts, then shared ones: the order of the rows of the computed gate vectors."""
        return [*self.experts, *(self.shared_experts or [])]


class LoadedConfig:
    """A validated configuration with its source text (written into the output, as mergekit does) and
    the located YAML (so later checks, even ones that read the models, can name a line)."""

    def __init__(self, config: MoEConfig, text: str, source: LocatedSource) -> None:
        self.config = config
        self.text = text
        self.source = source

    def where(self, *path: Any) -> str:
        """'moe.yml:7: experts[1].source_model'."""
        return self.source.where(tuple(path))

    def fail(self, path: tuple[Any, ...], message: str) -> RecipeError:
        return RecipeError(f"{self.where(*path)}: {message}")


def parse_config(text: str, name: str = "<moe config>") -> LoadedConfig:
    """Parse and validate mergekit-moe YAML; raises ``RecipeError`` naming the line of each problem."""
    source = LocatedSource(text, name)
    data = source.data
    if not isinstance(data, dict):
        raise RecipeError(
            f"{name}: a mergekit-moe config must be a YAML mapping (base_model, experts, ...), got "
            f"{type(data).__name__}."
        )
    if "merge_method" in data:
        raise RecipeError(
            f"{source.where(('merge_method',))}: this is a merge recipe (it has merge_method), not a "
            "mergekit-moe config; run it with `workbench run`."
        )
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if p not in ("function-before", "function-after"))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = f"unknown key '{loc[-1]}' (mergekit-moe 0.1.5 has no such option)"
            elif error["type"] == "literal_error" and loc == ("gate_mode",):
                message = (
                    f"unknown gate_mode {data.get('gate_mode')!r} (use hidden, hidden_avg, hidden_last, "
                    "cheap_embed, random or uniform_random)"
                )
            problems.append(f"{source.where(loc)}: {message}")
        raise RecipeError("invalid mergekit-moe config: " + "; ".join(problems) + ".") from None
    return LoadedConfig(config, text, source)


def load_config(path: str | Path) -> LoadedConfig:
    """Read a mergekit-moe YAML file (at most ``MAX_RECIPE_BYTES``: real ones are a few kilobytes)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"config file {path} is larger than {MAX_RECIPE_BYTES} bytes.")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"config file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read config file {path} ({exc}).") from exc
    return parse_config(text, str(path))


def _prompt_key(expert: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())


def check_config(loaded: LoadedConfig, allow_all_same: bool = False) -> list[str]:
    """mergekit's ``is_bad_config`` and the prompt rules of its build step, as located errors; returns
    warnings (nothing is read from the models here)."""
    config = loaded.config
    warnings: list[str] = []
    if not config.experts:
        raise loaded.fail(("experts",), "at least one expert is needed.")
    if config.experts_per_token < 1:
        raise loaded.fail(("experts_per_token",), "must be at least 1.")
    if len(config.experts) < config.experts_per_token:
        raise loaded.fail(
            ("experts_per_token",),
            f"{config.experts_per_token} experts per token, but only {len(config.experts)} experts are given.",
        )
    shared = config.shared_experts or []
    if shared:
        with_prompts = [bool(e.positive_prompts) for e in shared]
        if any(with_prompts) and not all(with_prompts):
            raise loaded.fail(
                ("shared_experts",), "give positive_prompts to every shared expert or to none, not a mix."
            )
    count = len(config.experts)
    if count & (count - 1):
        warnings.append(
            f"{count} experts is not a power of two; llama.cpp cannot run such a model (transformers can)."
        )
    if config.gate_mode in RANDOM_MODES:
        return warnings
    for i, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise loaded.fail(
                ("experts", i),
                f"has no positive_prompts; gate_mode {config.gate_mode} sets each router from its expert's "
                "prompts (or use gate_mode: random to train the routers afterwards).",
            )
    if len(config.experts) > 1 and all(
        _prompt_key(e) == _prompt_key(config.experts[0]) for e in config.experts[1:]
    ):
        raise loaded.fail(
            ("experts",),
            "every expert has the same positive and negative prompts, which cannot route tokens apart; give "
            "each expert prompts that show what should be routed to it.",
        )
    if (
        len(config.experts) > 1
        and all(e.source_model == config.experts[0].source_model for e in config.experts[1:])
        and not allow_all_same
    ):
        raise loaded.fail(
            ("experts",),
            "every expert is the same model: the result computes the same function at a higher cost. To "
            f"train it afterwards, pass {ALLOW_SAME_FLAG}.",
        )
    return warnings
