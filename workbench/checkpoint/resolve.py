"""Turning a model reference from a recipe into a local path.

A reference is a local file or folder, or a Hub id ``org/name[@revision]``. Hub ids are fetched
(only weights, configs and tokenizer files) through huggingface_hub's cache, which also serves them
offline once downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str) -> Path:
    """The local path of a model reference, downloading a Hub model into the cache if needed."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(ref):
        raise CheckpointError(f"model path {ref} does not exist.")
    repo_id, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise CheckpointError(
            f"model '{ref}' is not a local path and could not be fetched from the Hugging Face Hub"
            f" ({type(exc).__name__}: {exc})."
        ) from exc
