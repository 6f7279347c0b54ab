"""The recipe's ``tokenizer:`` section: the output vocabulary (base, union or a model), per-token
overrides, padding and the chat template (see docs/tokenizers.md); validated here, carried out by
:mod:`workbench.checkpoint.tokenizer_plan`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from workbench.checkpoint.chat_templates import check_chat_template
from workbench.checkpoint.tokenizer_plan import (
    ModelRow,
    ModelTokenRow,
    TokenRequest,
    ZeroRow,
)
from workbench.recipe.strict import Strict


class ZeroSource(Strict):
    """A zero row (mergekit's ``{kind: zero}``)."""

    kind: Literal["zero"]


class ModelTokenSource(Strict):
    """A model's row of another token, by text or id (mergekit's ``{kind: model_token}``)."""

    kind: Literal["model_token"]
    model: StrictInt | StrictStr = Field(description="'base', a model index, or a model's reference.")
    token: StrictStr | None = Field(None, description="The token, in that model's tokenizer.")
    token_id: StrictInt | None = Field(None, ge=0, description="Or its row in that model.")

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class TokenOverride(Strict):
    """Where one token's row comes from (mergekit's ``tokens:`` entry)."""

    source: StrictInt | StrictStr | ZeroSource | ModelTokenSource | None = Field(
        None,
        description=(
            "'base', a model index or reference (that model's row of the token), {kind: zero}, or "
            "{kind: model_token, ...}; omitted: the default rules"
        ),
    )
    force: StrictBool = Field(
        False, description="Every model takes this row, also those that have the token."
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        """One message per mistake (a plain union would report one per member)."""
        if value is None or isinstance(value, (str, ZeroSource, ModelTokenSource)):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"a model index is 0 or more, got {value}")
            return value
        kinds: dict[Any, type[Strict]] = {"zero": ZeroSource, "model_token": ModelTokenSource}
        if isinstance(value, dict) and value.get("kind") in kinds:
            try:
                return kinds[value["kind"]].model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(
                    f"{{kind: {value['kind']}}}: {where + ': ' if where else ''}{what.removeprefix('Value error, ')}"
                ) from None
        raise ValueError(
            "expected 'base', a model index or reference, {kind: zero} or {kind: model_token, model: ..., "
            "token: ... | token_id: ...}"
        )

    def request(self) -> TokenRequest:
        source = self.source
        if source is None:
            return TokenRequest(None, self.force)
        if isinstance(source, ZeroSource):
            return TokenRequest(ZeroRow(), self.force)
        if isinstance(source, ModelTokenSource):
            return TokenRequest(ModelTokenRow(source.model, source.token, source.token_id), self.force)
        return TokenRequest(ModelRow(source), self.force)


class TokenizerSection(Strict):
    """The output's tokenizer and how embedding and head rows follow it (docs/tokenizers.md)."""

    source: StrictInt | StrictStr | None = Field(
        None,
        description="base | union | a model index | a model's reference | a folder with tokenizer files.",
    )
    tokens: dict[str, TokenOverride] = Field(
        default_factory=dict, description="Per-token rows; tokens the vocabulary lacks are added."
    )
    pad_to_multiple_of: StrictInt | None = Field(
        None, ge=1, description="Pad the vocabulary rows to a multiple of this (padding: the mean row)."
    )
    chat_template: StrictStr | None = Field(
        None, description="auto, a named template (alpaca, chatml, exaone, llama3, mistral) or Jinja text."
    )

    @field_validator("tokens", mode="before")
    @classmethod
    def _no_tokens(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("source")
    @classmethod
    def _source(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a model index is 0 or more, got {value}")
        if isinstance(value, str) and not value.strip():
            raise ValueError("the tokenizer source is empty")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_chat_template(value)

    @property
    def builds_vocabulary(self) -> bool:
        """Whether rows follow this section (mergekit's semantics) rather than the default."""
        return self.source is not None or bool(self.tokens) or self.pad_to_multiple_of is not None
