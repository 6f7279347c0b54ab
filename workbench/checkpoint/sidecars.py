"""Files that travel with the weights: model config, tokenizer, generation config, chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from workbench.errors import CheckpointError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def model_folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def copy_config(source: Path, dest: Path, out_dtype: str | None, config: dict[str, Any] | None) -> list[str]:
    """Write ``config`` (the reference model's config.json, as its reader gives it: a stacked model
    has its own layer count) with its dtype updated to the output's, and copy generation_config.json."""
    copied = []
    folder = model_folder(source)
    if config is not None:
        data = dict(config)
        if out_dtype is not None:
            for key in ("torch_dtype", "dtype"):
                if key in data or key == "torch_dtype":
                    data[key] = out_dtype
        (dest / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        copied.append("config.json")
    generation = folder / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, dest / generation.name)
        copied.append(generation.name)
    return copied


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy every tokenizer file the source model has; returns the names copied."""
    folder = model_folder(source)
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dest / name)
            copied.append(name)
    return copied


def tokenizer_from_gguf(file: Path, dest: Path) -> list[str]:
    """Tokenizer files built from a GGUF file's metadata (by transformers, which knows every GGUF
    tokenizer type); none without transformers (the ``eval`` extra). Returns the names written."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return []
    before = {p.name for p in dest.iterdir()}
    try:
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(dest)
    except Exception as exc:  # transformers raises anything from ValueError to tokenizers' own errors
        for path in dest.iterdir():
            if path.name not in before:
                path.unlink()
        raise CheckpointError(
            f"{file}: the tokenizer in its metadata could not be converted ({type(exc).__name__}: {exc})."
        ) from None
    return sorted(p.name for p in dest.iterdir() if p.name not in before)
