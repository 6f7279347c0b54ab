"""What a merge does about tokenizers: the output's tokenizer, whether (and how) the models'
embedding and head rows are aligned to it by token, and the chat template.

Two modes, chosen by the recipe (see docs/tokenizers.md):

* **explicit** (a ``tokenizer:`` section with ``source``, ``tokens`` or ``pad_to_multiple_of``; a
  mergekit ``tokenizer_source`` or ``tokenizer:`` block): mergekit's semantics, always: the output
  vocabulary is built (base, union or a model's) and every model's rows are re-indexed to it;
* **default** (nothing said): the output tokenizer is the one copied (``output.copy_tokenizer_from``,
  default the base), and rows are aligned to it only where the models' tokenizers differ (or their
  vocabulary row counts do), with a warning; where they agree nothing changes, byte for byte.

A model without tokenizer files is taken to be indexed like the reference model (the base, else the
first model), as mergekit assumes; a warning says so when it matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from workbench.checkpoint.base import CheckpointReader
from workbench.errors import RecipeError


@dataclass(frozen=True)
class ZeroRow:
    """A zero row (mergekit's ``kind: zero``)."""


@dataclass(frozen=True)
class ModelRow:
    """The row a model has for the token itself (mergekit's model reference)."""

    model: int | str


@dataclass(frozen=True)
class ModelTokenRow:
    """A model's row of another token, by text or by id (mergekit's ``kind: model_token``)."""

    model: int | str
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRequest:
    """One ``tokens:`` entry: where the token's default row comes from (None: the default rules)
    and whether every model takes it (``force``) instead of its own row."""

    source: ZeroRow | ModelRow | ModelTokenRow | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerRequest:
    """What the recipe asks for, with the field paths its messages name."""

    #: 'base' | 'union' | a model index | a model's reference | a folder; None: the reference model.
    source: str | int | None = None
    source_field: tuple[str, ...] = ("output", "copy_tokenizer_from")
    #: ``output.copy_tokenizer_from`` when ``source`` comes from ``tokenizer.source``: must agree.
    copy_from: str | int | None = None
    explicit: bool = False
    tokens: dict[str, TokenRequest] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None


class Input(Protocol):
    """An input model as the planner holds it (``engine.plan.InputModel``)."""

    label: str
    ref: str
    path: Path
    reader: CheckpointReader


@dataclass
class TokenizerPlan:
    """The output's tokenizer: the folder it comes from, the tokenizer built (None: the folder's
    files copied as they are), the chat template, and the planning warnings."""

    folder: Path | None
    tokenizer: Any = None  # tokenizer_build.Tokenizer; Any keeps this module light to import
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def write(self, dest: Path, warn: Callable[[str], None]) -> list[str]:
        """Write the tokenizer files (and the chat template) into ``dest``; returns the names."""
        from workbench.checkpoint.chat_templates import write_chat_template
        from workbench.checkpoint.sidecars import copy_tokenizer
        from workbench.checkpoint.tokenizer_build import has_tokenizer, write_tokenizer

        if self.tokenizer is not None:
            return write_tokenizer(self.tokenizer, dest, self.chat_template)
        if self.folder is None or not has_tokenizer(self.folder):
            if self.chat_template is not None:
                warn("the chat template is not written: the output has no tokenizer files to put it in.")
            return copy_tokenizer(self.folder, dest) if self.folder is not None else []
        written = copy_tokenizer(self.folder, dest)
        if self.chat_template is not None:
            written += write_chat_template(dest, self.chat_template)
        return sorted(set(written))


def _position(
    value: str | int, inputs: list[Input], offset: int, where: str, base_ok: bool = True
) -> int | None:
    """The input ``value`` names (None: it names none): 'base', a model index, a model's reference."""
    models = len(inputs) - offset
    if value == "base" and base_ok:
        return 0
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        index = int(value)
        if not 0 <= index < models:
            raise RecipeError(f"{where}: there is no models[{index}] (the recipe has {models} model(s)).")
        return offset + index
    for position, model in enumerate(inputs):
        if model.ref == value:
            return position
    return None


def plan_tokenizer(
    request: TokenizerRequest,
    base: Input | None,
    models: Sequence[Input],
    where: Callable[[tuple[Any, ...]], str],
) -> TokenizerPlan | None:
    """Plan the output tokenizer and wrap the inputs' readers (``.reader``) where rows must be
    aligned; None where the recipe leaves tokenizers alone and nothing needs aligning (the engine
    then copies the tokenizer as it always has)."""
    from workbench.checkpoint.chat_templates import resolve_chat_template
    from workbench.checkpoint.sidecars import model_folder
    from workbench.checkpoint.tokenizer_build import fingerprint, has_tokenizer

    inputs: list[Input] = ([base] if base else []) + list(models)
    offset = 1 if base else 0
    at = where(request.source_field)
    union = request.source == "union"
    out_position: int | None = 0
    out_folder: Path
    if request.source is None or request.source in ("base", "union"):
        out_folder = model_folder(inputs[0].path)
    else:
        out_position = _position(request.source, inputs, offset, at)
        if out_position is None:
            given = Path(str(request.source)).expanduser()
            if not given.exists():
                union_too = "union, " if request.source_field == ("tokenizer", "source") else ""
                raise RecipeError(
                    f"{at}: '{request.source}' is not base, {union_too}a model index, one of the recipe's "
                    "models or an existing folder with tokenizer files."
                )
            out_folder = model_folder(given)
        else:
            out_folder = model_folder(inputs[out_position].path)
    if request.copy_from is not None:
        other = _position(request.copy_from, inputs, offset, where(("output", "copy_tokenizer_from")))
        other_folder = model_folder(
            inputs[other].path if other is not None else Path(str(request.copy_from)).expanduser()
        )
        if union or other_folder.resolve() != out_folder.resolve():
            raise RecipeError(
                f"{at}: '{request.source}' and output.copy_tokenizer_from '{request.copy_from}' name different "
                "tokenizers; give one of them (tokenizer.source builds the output's tokenizer)."
            )
    template = None
    warnings: list[str] = []
    if request.chat_template is not None:
        template = resolve_chat_template(request.chat_template, [model_folder(m.path) for m in inputs])
        if template is None:
            warnings.append(
                f"{where(('tokenizer', 'chat_template'))}: 'auto' found no chat template in the input "
                "models; the output keeps its tokenizer's own, if any."
            )
    if not has_tokenizer(out_folder) and not union:
        if request.explicit:
            raise RecipeError(
                f"{at}: {out_folder} has no tokenizer files to build the output's tokenizer from."
            )
        return None if template is None else TokenizerPlan(out_folder, None, template, warnings)
    if not request.explicit:
        prints = {fingerprint(out_folder)} | {fingerprint(m.path) for m in inputs if has_tokenizer(m.path)}
        from workbench.checkpoint.vocabulary import vocabulary_tensors

        shapes = [vocabulary_tensors(m.reader) for m in inputs]
        same = len(prints) == 1 and len({count for count, _ in shapes}) == 1
        if same or not shapes[0][1]:  # nothing differs, or no rows indexed by token (LoRA ΔW inputs)
            return None if template is None else TokenizerPlan(out_folder, None, template, warnings)
    return _align(request, inputs, offset, out_position, out_folder, template, warnings, where)


def _fill(
    source: ZeroRow | ModelRow | ModelTokenRow | None,
    token: str,
    inputs: list[Input],
    offset: int,
    vocabularies: list[dict[str, int]],
    rows: list[int],
    where: str,
) -> Any:
    """The ``vocabulary.Fill`` a ``tokens:`` source names (None: the default rules)."""
    from workbench.checkpoint.vocabulary import Fill

    if source is None:
        return None
    if isinstance(source, ZeroRow):
        return Fill(())
    position = _position(source.model, inputs, offset, where, base_ok=offset == 1)
    if position is None:
        raise RecipeError(
            f"{where}: '{source.model}' is not one of the recipe's models (base, a model index, or a "
            "model's reference as the recipe gives it)."
        )
    model = inputs[position]
    wanted = token if isinstance(source, ModelRow) else source.token
    row = source.token_id if isinstance(source, ModelTokenRow) and source.token_id is not None else None
    if row is None:
        row = vocabularies[position].get(str(wanted))
        if row is None or row >= rows[position]:
            raise RecipeError(f"{where}: {model} has no token {wanted!r} (with a row) in its tokenizer.")
    elif not 0 <= row < rows[position]:
        raise RecipeError(f"{where}: token_id {row} is outside {model}'s {rows[position]} rows.")
    return Fill(((position, row),))


def _align(
    request: TokenizerRequest,
    inputs: list[Input],
    offset: int,
    out_position: int | None,
    out_folder: Path,
    template: str | None,
    warnings: list[str],
    where: Callable[[tuple[Any, ...]], str],
) -> TokenizerPlan | None:
    """Build the output vocabulary and every model's alignment to it; wrap the readers that change."""
    import numpy as np

    from workbench.checkpoint.sidecars import model_folder
    from workbench.checkpoint.tokenizer_build import (
        Tokenizer,
        has_tokenizer,
        load_tokenizer,
        union_tokenizer,
        with_tokens,
    )
    from workbench.checkpoint.vocabulary import AlignedReader, build_alignment, vocabulary_tensors
    from workbench.errors import CheckpointError

    at = where(request.source_field)
    loaded: dict[Path, Tokenizer] = {}

    def tokenizer_of(path: Path) -> Tokenizer | None:
        folder = model_folder(path)
        if not has_tokenizer(folder):
            return None
        if folder not in loaded:
            loaded[folder] = load_tokenizer(folder)
        return loaded[folder]

    tokenizers = [tokenizer_of(m.path) for m in inputs]
    shapes = [vocabulary_tensors(m.reader) for m in inputs]
    rows = [count for count, _ in shapes]
    names = shapes[0][1]
    first = tokenizers[0]
    if request.source == "union":
        if first is None:
            raise RecipeError(
                f"{at}: 'union' starts from the tokenizer of {inputs[0]}, which has no tokenizer files."
            )
        seen, others = {first.folder}, []
        for tokenizer, count in zip(tokenizers[1:], rows[1:]):
            if tokenizer is not None and tokenizer.folder not in seen:
                seen.add(tokenizer.folder)
                others.append((tokenizer, count))
        output = union_tokenizer(first, others, rows[0], warnings.append)
    else:
        chosen = tokenizers[out_position] if out_position is not None else None
        output = chosen if chosen is not None else load_tokenizer(out_folder)
    output = with_tokens(output, list(request.tokens))
    vocabulary = output.vocabulary()
    cache = {id(t): t.vocabulary() for t in tokenizers if t is not None}
    fallback = cache[id(first)] if first is not None else vocabulary
    vocabularies = [cache[id(t)] if t is not None else fallback for t in tokenizers]
    overrides = {
        vocabulary[token]: (
            _fill(
                entry.source,
                token,
                inputs,
                offset,
                vocabularies,
                rows,
                where(("tokenizer", "tokens", token, "source")),
            ),
            entry.force,
        )
        for token, entry in request.tokens.items()
    }
    for model, (count, own_names) in zip(inputs[1:], shapes[1:]):
        for name in names:
            if name not in own_names and name in model.reader:
                raise CheckpointError(
                    f"tensor '{name}' of {model} has {list(model.reader.info(name).shape)} rows where its "
                    f"vocabulary has {count}; its rows cannot be aligned to {inputs[0]}'s."
                )
    readers = [m.reader for m in inputs]
    alignment, nowhere = build_alignment(
        readers,
        names,
        vocabulary,
        vocabularies,
        rows,
        0 if offset else None,
        overrides,
        request.pad_to_multiple_of,
    )
    identity = np.arange(alignment.vocabulary_size)
    changes = []
    for m, model in enumerate(inputs):
        missing = int((alignment.permutation[m] < 0).sum())
        moved = int(((alignment.permutation[m] != identity) & (alignment.permutation[m] >= 0)).sum())
        if missing or moved or rows[m] != alignment.rows or not alignment.own[m].all():
            changes.append(
                f"{model}: {missing} of the output's {alignment.vocabulary_size} tokens missing, {moved} at "
                f"other ids, {rows[m]} rows"
            )
    plan = TokenizerPlan(out_folder, output, template, warnings)
    if not changes:
        return plan if request.explicit or template is not None else None
    if not names:
        warnings.append(f"no embedding or LM-head tensor of {inputs[0]} was recognised: no rows are aligned.")
        return plan
    if not request.explicit:
        warnings.append(
            f"the models' tokenizers differ ({'; '.join(changes)}): the embedding and LM-head rows are "
            f"aligned by token to the output's tokenizer (from {out_folder}) instead of merged by index, "
            "with mergekit's rules for tokens a model lacks (docs/tokenizers.md); set tokenizer.source "
            "(base, union or a model) to choose the vocabulary."
        )
    for model, tokenizer in zip(inputs, tokenizers):
        if tokenizer is None:
            warnings.append(
                f"{model} has no tokenizer files: its rows are taken to be indexed like "
                f"{'the tokenizer of ' + str(inputs[0]) if first is not None else 'the output tokenizer'}."
            )
    if nowhere:
        shown = ", ".join(repr(t) for t in nowhere[:5]) + (", ..." if len(nowhere) > 5 else "")
        warnings.append(
            f"{len(nowhere)} token(s) of the output vocabulary are in no model ({shown}): their rows are zero."
        )
    for m, model in enumerate(inputs):
        model.reader = AlignedReader(model.reader, alignment, m)
    return plan
