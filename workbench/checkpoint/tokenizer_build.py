"""Tokenizer files: the vocabulary a model folder's tokenizer defines, and the output's tokenizer
(a model's, the base's, or the union of all of them, plus added tokens), written into a folder.

Everything works on ``tokenizer.json``, the file every fast tokenizer (and so every tokenizer
mergekit can merge) is saved as: its ``model.vocab`` plus its ``added_tokens`` are exactly the
vocabulary ``tokenizers``' ``get_vocab(with_added_tokens=True)`` and transformers' ``get_vocab()``
return, so reading it needs neither library and gives the same answer in every environment. A
folder with only slow-tokenizer files (``tokenizer.model``, ``vocab.json`` + ``merges.txt``) is
converted once with transformers (the ``eval`` extra), as mergekit's ``AutoTokenizer`` would.

New tokens are appended to ``added_tokens`` with the next free ids, which is what
``add_tokens`` does: a token from another model's vocabulary becomes a plain added token (not
special, normalized), an added token of another model keeps its flags (special, lstrip, ...).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.checkpoint.chat_templates import write_chat_template
from workbench.checkpoint.sidecars import copy_tokenizer, model_folder
from workbench.errors import CheckpointError

#: Files whose presence means a folder has a tokenizer (not just a tokenizer_config.json).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
#: Flags of an added token, as tokenizer.json stores them.
_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
#: ``add_tokens("text")``'s flags: a plain added token.
PLAIN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def has_tokenizer(path: Path) -> bool:
    folder = model_folder(path)
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def fingerprint(path: Path) -> str:
    """A digest of a folder's tokenizer files: equal digests, equal tokenizers (without parsing)."""
    folder = model_folder(path)
    digest = hashlib.sha256()
    for name in TOKENIZER_MARKERS + ("added_tokens.json", "merges.txt"):
        file = folder / name
        if file.is_file():
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


@dataclass
class Tokenizer:
    """One tokenizer, as its ``tokenizer.json`` data."""

    folder: Path
    data: dict[str, Any]
    #: Made by transformers from slow-tokenizer files (the folder has no tokenizer.json).
    converted: bool = False
    #: Entries appended to ``added_tokens`` here (the output's new tokens).
    added_here: list[str] = field(default_factory=list)
    _next_id: int | None = field(default=None, repr=False)

    def vocabulary(self) -> dict[str, int]:
        """token -> id, added tokens included."""
        model = self.data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            result = {str(token): int(index) for token, index in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            result = {str(entry[0]): i for i, entry in enumerate(vocab)}
        else:
            raise CheckpointError(f"{self.folder}/tokenizer.json has no model vocabulary this version reads.")
        for entry in self.added_tokens():
            result[entry["content"]] = entry["id"]
        return result

    def added_tokens(self) -> list[dict[str, Any]]:
        entries = self.data.get("added_tokens") or []
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("content"), str) and isinstance(e.get("id"), int)
            for e in entries
        ):
            raise CheckpointError(f"{self.folder}/tokenizer.json: 'added_tokens' is not a list of tokens.")
        return entries

    def add(self, token: str, flags: dict[str, Any], vocabulary: dict[str, int]) -> None:
        """Append ``token`` as an added token (``vocabulary``, this tokenizer's, is updated): the next
        free id, or the id it already has in the model vocabulary (which makes it an added token)."""
        if self._next_id is None:
            self._next_id = max(vocabulary.values(), default=-1) + 1
        index = vocabulary.get(token)
        if index is None:
            index, self._next_id = self._next_id, self._next_id + 1
        self.data.setdefault("added_tokens", []).append(
            {"id": index, "content": token, **{k: bool(flags.get(k, PLAIN_FLAGS[k])) for k in _FLAGS}}
        )
        vocabulary[token] = index
        self.added_here.append(token)


def _convert(folder: Path) -> dict[str, Any]:
    """tokenizer.json data for a folder with slow-tokenizer files only (transformers converts)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{folder} has no tokenizer.json; converting its slow-tokenizer files needs transformers "
            "(pip install 'merge-workbench[eval]')."
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
        backend = tokenizer.backend_tokenizer
    except Exception as exc:  # transformers raises anything from OSError to sentencepiece's own errors
        raise CheckpointError(
            f"{folder}: its tokenizer files could not be read ({type(exc).__name__}: {exc})."
        ) from None
    data: dict[str, Any] = json.loads(backend.to_str())
    return data


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model folder (or of the folder holding a model file)."""
    folder = model_folder(path)
    file = folder / "tokenizer.json"
    if not file.is_file():
        if not has_tokenizer(folder):
            raise CheckpointError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}).")
        return Tokenizer(folder, _convert(folder), converted=True)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read as JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a tokenizer (a JSON object).")
    tokenizer = Tokenizer(folder, data)
    tokenizer.vocabulary()  # malformed files fail here, naming the file, not half way through a merge
    return tokenizer


def union_tokenizer(
    base: Tokenizer, others: list[tuple[Tokenizer, int]], base_rows: int, warn: Callable[[str], None]
) -> Tokenizer:
    """The base's tokenizer extended with every token of ``others`` ((tokenizer, rows it has in its
    model)): first their vocabulary tokens, in each model's id order, then their added tokens with
    their flags. Tokens at ids the model has no row for are left out, as mergekit does."""
    out = Tokenizer(base.folder, copy.deepcopy(base.data), base.converted)
    vocabulary = out.vocabulary()
    members = [(base, base_rows), *others]
    added: dict[str, dict[str, Any]] = {}
    differing: set[str] = set()
    for tokenizer, rows in members:
        for entry in tokenizer.added_tokens():
            if entry["id"] >= rows:
                continue
            flags = {k: entry.get(k, PLAIN_FLAGS[k]) for k in _FLAGS}
            first = added.setdefault(entry["content"], flags)
            if first != flags and entry["content"] not in differing:
                differing.add(entry["content"])
                warn(
                    f"token {entry['content']!r} is added with other settings in {tokenizer.folder} than in "
                    "an earlier model; the first model's settings are used."
                )
    for tokenizer, rows in others:
        own = tokenizer.vocabulary()
        for token, index in sorted(own.items(), key=lambda item: item[1]):
            if index < rows and token not in added and token not in vocabulary:
                out.add(token, PLAIN_FLAGS, vocabulary)
    present = {entry["content"] for entry in out.added_tokens()}
    for token, flags in added.items():
        if token not in present:
            out.add(token, flags, vocabulary)
    return out


def with_tokens(tokenizer: Tokenizer, tokens: list[str]) -> Tokenizer:
    """``tokenizer`` with ``tokens`` it lacks appended as plain added tokens (a copy if any is)."""
    vocabulary = tokenizer.vocabulary()
    missing = [t for t in tokens if t not in vocabulary]
    if not missing:
        return tokenizer
    out = Tokenizer(tokenizer.folder, copy.deepcopy(tokenizer.data), tokenizer.converted)
    out.added_here = list(tokenizer.added_here)
    for token in missing:
        out.add(token, PLAIN_FLAGS, vocabulary)
    return out


def _update_json(path: Path, update: Callable[[Any], Any]) -> None:
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from None
    path.write_text(json.dumps(update(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(tokenizer: Tokenizer, dest: Path, chat_template: str | None) -> list[str]:
    """The output's tokenizer files in ``dest``: the source folder's files, with tokenizer.json
    rewritten when tokens were added (or it was converted), the added tokens also recorded where
    slow tokenizers and transformers 4 look for them, and the chat template. Returns the names."""
    written = copy_tokenizer(tokenizer.folder, dest)
    if tokenizer.added_here or tokenizer.converted:
        text = json.dumps(tokenizer.data, indent=2, ensure_ascii=False)
        (dest / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
        written.append("tokenizer.json")
        entries = {e["content"]: e for e in tokenizer.added_tokens() if e["content"] in tokenizer.added_here}

        def decoder(config: Any) -> Any:
            table = config.get("added_tokens_decoder") if isinstance(config, dict) else None
            if isinstance(table, dict):
                for entry in entries.values():
                    table[str(entry["id"])] = {k: entry[k] for k in ("content", *_FLAGS)}
            return config

        def legacy(table: Any) -> Any:
            if isinstance(table, dict):
                table.update({token: entry["id"] for token, entry in entries.items()})
            return table

        _update_json(dest / "tokenizer_config.json", decoder)
        _update_json(dest / "added_tokens.json", legacy)
    if chat_template is not None:
        written += write_chat_template(dest, chat_template)
    return sorted(set(written))
